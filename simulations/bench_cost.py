"""What personalization costs, in units of one plain inference pass over the same user's data: the
statistics pass (usage hooks, all hooks, with BatchNorm recalibration), fine-pruning to a fixed
0.7 and with the default label-free stop, beside one epoch of backprop with labels, and where the
default's time goes (the engine's phases). The unit is the model's own pass, in its own layout;
one column gives plain inference in the engine's layout (channels_last for conv nets),
so each ratio can also be read against the faster pass. Results: cost.json, cost.md, cost.csv,
cost.png.

    fineprune bench-cost --fsdd ../shared/data/fsdd --out runs/cost
    fineprune bench-cost --workloads resnet18 --samples 64,256,1024 --out runs/cost_sizes

Several user sizes give a row each and cost_by_samples.png: the probe is at most 128 samples, so
the probes' share of the cost falls as a user's data grows.

Each repeat runs every column once, interleaved, and a column reports its median, so load from
other work on the machine falls on all columns alike. The ResNets carry random weights (no
ImageNet weights can be downloaded here; --resnet-weights takes a local file): their cost does not
depend on the weights except through where the stop rule stops, which the table reports.
`--memory keep` (common/memory.py) measures every column without page faults: with the C
library's default each pass faults its large blocks in again, half of ResNet50's inference pass
on this CPU, and how much depends on what the process freed before.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from common.cli import first_sentence
from common.engine.bn import recalibrate_bn
from common.engine.forward import engine_layout, to_layout
from common.engine.probe import collect_stats
from common.engine.prune import fine_prune
from common.io import atomic_write_png, atomic_write_text
from common.memory import in_force
from common.model.architectures import build_model
from common.model.batches import batched_forward, resolve_device
from common.model.checkpoint import load_checkpoint
from common.model.train import train_supervised
from common.settings import PruneConfig
from simulations.bench_report import PREVIOUS_DEFAULT

WORKLOADS = ("digits", "kws", "resnet18", "resnet50")
MEMORY_NOTE = {"release": "the C library's default, each pass faults its large blocks in again",
               "keep": "freed memory kept in the process, no page faults after the first round"}

# a workload's base -> its checkpoint's metadata, with the vendor record the default's checks read
# (the ResNets carry random weights: no record, so the default adapts their input side only)
VENDOR: dict = {}


def _digits(out: Path, seed: int, n: int | None):
    from simulations.bench_tasks import digits_task

    base, meta, user = digits_task(out, seed, 10, None)[0]
    x, y = user.x, user.y
    VENDOR[id(base)] = meta
    return base, x[:n] if n else x, y[:n] if n else y, "digits CNN, one user of the default federation"


def _kws(out: Path, seed: int, n: int | None, fsdd: str | None):
    from common.data import readers as D
    from simulations.bench_tasks import _cached_pretrain

    if not fsdd or not Path(fsdd).is_dir():
        raise ValueError("the kws workload needs --fsdd DIR (the Free Spoken Digit Dataset)")
    ds = D.load_fsdd(fsdd)
    speaker = sorted(set(ds.groups.tolist()))[0]
    ck = out / "bases" / f"fsdd_without_{speaker}_s{seed}_e0.pt"
    # the benchmark's leave-one-speaker-out base (this speaker is new to it), trained once
    _cached_pretrain(ck, "fsdd", ck, seed=seed, exclude_speaker=speaker, ds=ds)
    base, meta, _ = load_checkpoint(ck)
    VENDOR[id(base)] = meta
    pick = torch.as_tensor((ds.groups == speaker) & (ds.takes >= 5))
    x, y = ds.x[pick], ds.y[pick]
    return base, x[:n] if n else x, y[:n] if n else y, f"KWS on FSDD, new speaker {speaker}, takes 5-49"


def _resnet(arch: str, seed: int, n: int | None, size: int, weights: str | None):
    from common.data import readers as D

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=1000, weights_path=weights)  # the ImageNet head
    ds = D.load_digits()  # real pictures (digits upscaled to size x size, 3 channels), not noise
    n = n or 64
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.x), generator=gen)[:n]
    if n > len(idx):  # more images than digits has: draw the rest again
        idx = torch.cat([idx, torch.randint(len(ds.x), (n - len(idx),), generator=gen)])
    x = torch.nn.functional.interpolate(ds.x[idx], size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)
    return model, x, ds.y[idx], (f"{arch}, {n} digits images upscaled to {size}x{size}, "
                                 f"{'weights ' + Path(weights).name if weights else 'random weights'}")


def load_workload(name: str, out: Path, seed: int = 0, n: int | None = None, fsdd: str | None = None,
                  size: int = 224, weights: str | None = None):
    """(base model, unlabeled x, labels for the backprop column, description)."""
    if name == "digits":
        return _digits(out, seed, n)
    if name == "kws":
        return _kws(out, seed, n, fsdd)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, seed, n, size, weights)
    raise ValueError(f"unknown workload '{name}' (choose from: {', '.join(WORKLOADS)})")


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Step:
    """One measured step: --profile's name for it, its column in the tables, what it does (to the
    model it gets), and which model that is: a fresh copy of the base ("base") or of the base in
    the engine's layout ("engine"), made before the clock starts, or none (it only reads)."""
    key: str
    column: str
    run: Callable
    model: str | None = None


# Every step, once: the tables' columns, --profile's names and the timed runs all come from here.
# A step that changes its model gets a copy of its own, so the base stays as it was; the copy is
# the benchmark's, not the step's (a device personalizes the model it loaded). The statistics run
# in the engine's layout (channels_last for conv nets), as the engine's passes do.
STEPS = (
    Step("inference", "inference pass", lambda c, _: batched_forward(c.base, c.x, c.batch_size, c.device)),
    Step("inference-engine", "inference pass, engine layout",
         lambda c, _: batched_forward(c.eng, c.x, c.batch_size, c.device)),
    Step("usage", "statistics (usage hooks)",
         lambda c, _: collect_stats(c.eng, c.x, c.batch_size, c.device, outputs=False)),
    Step("all-hooks", "statistics (all hooks)",
         lambda c, _: collect_stats(c.eng, c.x, c.batch_size, c.device, outputs=True)),
    # recalibration rewrites the BatchNorm buffers: a copy's, never the base's
    Step("bn", "statistics + BatchNorm", lambda c, m: recalibrate_bn(m, c.x, c.batch_size, c.device, hooks=False),
         "engine"),
    Step("fixed", "fixed target 0.7",
         lambda c, m: fine_prune(m, c.x, PruneConfig(target_sparsity=0.7, batch_size=c.batch_size), c.device), "base"),
    Step("default", "default (label-free stop)",
         lambda c, m: c.default_runs.append(fine_prune(m, c.x, PruneConfig(batch_size=c.batch_size), c.device,
                                                       base_meta=VENDOR.get(id(c.base)))), "base"),
    # the engine's default before the safe one, timed in the same rounds
    Step("previous-default", "previous default",
         lambda c, m: fine_prune(m, c.x, PruneConfig(**PREVIOUS_DEFAULT, batch_size=c.batch_size), c.device), "base"),
    # backprop in the engine's layout too: the comparison is between methods, not layouts
    Step("backprop", "backprop, 1 epoch",
         lambda c, m: train_supervised(m, c.x, c.y, epochs=1, lr=1e-4, batch_size=32, device=c.device), "engine"),
)
COLUMNS = tuple(s.column for s in STEPS)
STEP_NAMES = {s.key: s.column for s in STEPS}  # --profile's names for the columns (bench-gpu)


def _steps(base, x, y, device: str, batch_size: int, default_runs: list):
    """(column -> (what it does to a model, the model it gets: made before the clock starts, or
    None); the base in the engine's layout). `base` is on `device`, in eval mode; the default's
    results are appended to `default_runs`."""
    eng = to_layout(copy.deepcopy(base), engine_layout(base))
    ctx = SimpleNamespace(base=base, eng=eng, x=x, y=y, device=device, batch_size=batch_size,
                          default_runs=default_runs)
    copies = {"base": lambda: copy.deepcopy(base), "engine": lambda: copy.deepcopy(eng), None: None}
    runs = {s.column: ((lambda m, s=s: s.run(ctx, m)), copies[s.model]) for s in STEPS}
    return runs, eng


def _warm_up(base, eng, x, y, device: str, batch_size: int):
    """Allocator, cuDNN autotune and the optimizer's first step, before anything is timed."""
    batched_forward(eng, x[:batch_size], batch_size, device)
    batched_forward(base, x[:batch_size], batch_size, device)
    # the optimizer's first step: its lazy imports took 1 s, 600 digits inference passes
    train_supervised(copy.deepcopy(eng), x[:2], y[:2], epochs=1, batch_size=2, device=device)


def measure(base, x, y, device: str = "cpu", repeats: int = 3, batch_size: int = 256, log=print) -> dict:
    """Median seconds per column over `repeats` interleaved rounds, the default's phases and how
    far its stop rule pruned."""
    base = base.to(device).eval()
    default_runs = []
    runs, eng = _steps(base, x, y, device, batch_size, default_runs)
    _warm_up(base, eng, x, y, device, batch_size)
    secs = {k: [] for k in runs}
    peak = {k: 0.0 for k in runs}
    cuda = device.startswith("cuda")
    for r in range(repeats):
        for k, (fn, setup) in runs.items():
            if k == "backprop, 1 epoch" and r > 1:
                continue  # the slowest column: measured twice at most (the first and second round)
            model = setup() if setup else None
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # restrict-outputs' doubt about a class, once per run
                warnings.simplefilter("ignore")
                fn(model)
            _sync(device)
            secs[k].append(time.perf_counter() - t0)
            if cuda:
                peak[k] = max(peak[k], torch.cuda.max_memory_allocated() / 2 ** 20)
        log(f"  round {r + 1}/{repeats}: inference {secs['inference pass'][-1]:.3f} s, default "
            f"{secs['default (label-free stop)'][-1]:.3f} s")
    med = {k: statistics.median(v) for k, v in secs.items()}
    inf = med["inference pass"]
    mid = sorted(default_runs, key=lambda r: r.seconds)[len(default_runs) // 2]
    return {"seconds": med, "x_inference": {k: v / inf for k, v in med.items()},
            "rounds_seconds": secs,  # every round, for the spread behind each median
            "default_phases_x": {k: v / inf for k, v in sorted(mid.phases.items(), key=lambda kv: -kv[1])},
            "default_sparsity": mid.sparsity, "default_forward_passes": mid.forward_samples / len(x),
            "default_probes": len(mid.history), "samples": len(x),
            "peak_gpu_mb": peak if cuda else None}


def parse_steps(text: str) -> list[str]:
    """--profile's comma-separated step names (STEP_NAMES), checked; [] for an empty text."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if bad := [t for t in names if t not in STEP_NAMES]:
        raise ValueError(f"unknown step(s) to profile: {', '.join(bad)} (choose from: {', '.join(STEP_NAMES)})")
    return list(dict.fromkeys(names))


def profile(base, x, y, device: str, batch_size: int, names: list[str], rows: int = 40) -> dict:
    """Each named step run once more under torch.profiler, after a first run of its own (cuDNN's
    autotune, the allocator, lazy imports stay out of the profile): name -> {"table": the
    operators by self time (device time on a GPU, then host time), "ops": the top `rows` as numbers
    (ms), "seconds": the step's wall time under the profiler, "device_busy_seconds": a GPU's kernel
    time in it}. What a GPU pass spends beyond its convolutions (a hook's reductions, kernel
    launches, host waits) shows here, operator by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    base = base.to(device).eval()
    runs, _ = _steps(base, x, y, device, batch_size, [])
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {}
    for name in names:
        fn, setup = runs[STEP_NAMES[name]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(setup() if setup else None)  # the step's own first run
            model = setup() if setup else None
            _sync(device)
            t0 = time.perf_counter()
            with torch_profile(activities=acts) as prof:
                fn(model)
                _sync(device)
            sec = time.perf_counter() - t0
        avg = prof.key_averages()
        events = sorted(avg, key=lambda e: -getattr(e, key))
        # on a GPU the host's side too: a pass whose kernels leave the GPU idle is bound by the
        # host's launches and hook code, which only the CPU table shows
        table = avg.table(sort_by=key, row_limit=rows)
        if cuda:
            table = (f"By self device time:\n{table}\n\nBy self CPU time (the host):\n"
                     f"{avg.table(sort_by='self_cpu_time_total', row_limit=rows)}")
        out[name] = {"seconds": sec,
                     # the GPU's kernel time, against the step's wall time: how busy the host kept it
                     "device_busy_seconds": sum(e.self_device_time_total for e in avg) / 1e6 if cuda else None,
                     "table": table,
                     "ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                              "self_device_ms": e.self_device_time_total / 1e3 if cuda else None}
                             for e in events[:rows]]}
    return out


def to_markdown(results: dict, meta: dict) -> str:
    lines = [f"Cost in one plain inference pass over the same data (median of {meta['repeats']} interleaved rounds; "
             f"{meta['device']}, {meta['threads']} thread(s), memory {meta.get('memory', 'release')}: "
             f"{MEMORY_NOTE[meta.get('memory', 'release')]}). 5 epochs of backprop = 5 x the 1-epoch column.", "",
             "| workload | samples | " + " | ".join(COLUMNS[1:]) + " | default vs 5 epochs backprop |",
             "|---|---|" + "---|" * (len(COLUMNS)) ]
    for name, r in results.items():
        xi = r["x_inference"]
        cheaper = 5 * xi["backprop, 1 epoch"] / xi["default (label-free stop)"]
        lines.append(f"| {name} | {r['samples']} | " + " | ".join(f"{xi[c]:.2f}x" for c in COLUMNS[1:])
                     + f" | {cheaper:.1f}x cheaper |")
    lines += ["", "Where the default's time goes (x one inference pass; the stop rule's sparsity and probes):", ""]
    for name, r in results.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["default_phases_x"].items() if v >= 0.005)
        lines.append(f"- **{name}** (sparsity {r['default_sparsity']:.2f}, {r['default_probes']} probes, "
                     f"{r['default_forward_passes']:.2f} samples' passes): {parts}")
    lines += ["", "Workloads:", ""] + [f"- {name}: {r['description']}" for name, r in results.items()]
    return "\n".join(lines) + "\n"


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(results)
    w = 0.8 / (len(COLUMNS) - 1)
    for i, c in enumerate(COLUMNS[1:]):
        ax.bar(np.arange(len(names)) + i * w, [results[n]["x_inference"][c] for n in names], w, label=c)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)) + w * (len(COLUMNS) - 2) / 2, names)
    ax.set_ylabel("x one inference pass")
    ax.set_title("Cost of personalization (dashed: the 1.5x target)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def parse_samples(text: str) -> list[int]:
    """`--samples`: one count or several, comma-separated, each >= 0 (0: the workload's own)."""
    try:
        sizes = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--samples takes whole numbers, comma-separated (got '{text}')") from None
    if not sizes or any(n < 0 for n in sizes):
        raise ValueError(f"--samples takes counts >= 0 (0: the workload's own), comma-separated (got '{text}')")
    return list(dict.fromkeys(sizes))


def plot_by_samples(results: dict):
    """The fixed target, the default and the statistics pass against the user's samples, one
    line per workload, with the targets (1.2x fixed, 1.5x default) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    by = {}
    for r in results.values():
        by.setdefault(r["workload"], []).append(r)
    styles = {"statistics + BatchNorm": ":", "fixed target 0.7": "--", "default (label-free stop)": "-"}
    for i, (name, rows) in enumerate(by.items()):
        rows = sorted(rows, key=lambda r: r["samples"])
        for col, ls in styles.items():
            ax.plot([r["samples"] for r in rows], [r["x_inference"][col] for r in rows], ls, marker="o",
                    color=f"C{i}", label=f"{name}: {col}")
    ax.axhline(1.2, color="gray", lw=0.8, ls="--")
    ax.axhline(1.5, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["samples"] for r in results.values()})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("user's samples")
    ax.set_ylabel("x one inference pass")
    ax.set_title("Cost against the user's data (gray: 1.5x default, 1.2x fixed target)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fineprune bench-cost", description=first_sentence(__doc__))
    p.add_argument("--workloads", default="digits,kws,resnet18,resnet50",
                   help=f"comma-separated, from: {', '.join(WORKLOADS)} (kws needs --fsdd)")
    p.add_argument("--fsdd", help="Free Spoken Digit Dataset directory (the kws workload)")
    p.add_argument("--samples", default="0", help="user's samples per workload, or several comma-separated (a "
                   "row each, and cost_by_samples.png): 0 is the workload's own (digits one user, kws 450 clips, "
                   "resnets 64 images); digits and kws have no more than their user's")
    p.add_argument("--size", type=int, default=224, help="ResNet input size (default 224)")
    p.add_argument("--resnet-weights", help="local weights file for the ResNet workloads (optional)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each column reports its median")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--out", default="runs/cost")
    return p


def main(args) -> dict:
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not names or (bad := [w for w in names if w not in WORKLOADS]):
        raise ValueError(f"unknown workload(s): {', '.join(bad) if names else '(none)'} "
                         f"(choose from: {', '.join(WORKLOADS)})")
    sizes = parse_samples(args.samples)
    if args.repeats < 1 or args.size < 32:
        raise ValueError("--repeats must be >= 1 and --size >= 32")
    if "kws" in names and not (args.fsdd and Path(args.fsdd).is_dir()):
        raise ValueError(f"the kws workload needs --fsdd DIR with the Free Spoken Digit Dataset (got {args.fsdd})")
    device = resolve_device(args.device)
    out = Path(args.out)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for name in names:
        seen = set()
        for n in sizes:
            base, x, y, desc = load_workload(name, out, 0, n or None, args.fsdd, args.size, args.resnet_weights)
            if len(x) in seen:  # a user with fewer samples than asked: measured once at what it has
                log(f"bench-cost: {name} has {len(x)} samples, not {n}: measured already")
                continue
            seen.add(len(x))
            key = name if len(sizes) == 1 else f"{name}@{len(x)}"
            log(f"bench-cost: {key} ({len(x)} samples) ...")
            results[key] = {**measure(base, x, y, device, args.repeats, log=log), "description": desc,
                            "workload": name}
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "repeats": args.repeats, "memory": in_force()}
    atomic_write_text(out / "cost.json", json.dumps({"meta": meta, "results": results}, indent=2))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["workload", "samples", *(f"{c} (x)" for c in COLUMNS[1:]), "default sparsity", "default probes"])
    for name, r in results.items():
        w.writerow([name, r["samples"], *(round(r["x_inference"][c], 3) for c in COLUMNS[1:]),
                    round(r["default_sparsity"], 4), r["default_probes"]])
    atomic_write_text(out / "cost.csv", buf.getvalue())
    md = to_markdown(results, meta)
    atomic_write_text(out / "cost.md", md)
    atomic_write_png(out / "cost.png", plot(results))
    made = {"results": str(out / "cost.md"), "plot": str(out / "cost.png")}
    if len(sizes) > 1:
        atomic_write_png(out / "cost_by_samples.png", plot_by_samples(results))
        made["by_samples"] = str(out / "cost_by_samples.png")
    print(md, file=sys.stderr)
    return made


if __name__ == "__main__":
    main(build_parser().parse_args())
