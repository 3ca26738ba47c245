"""Benchmark: the paper's claims measured side by side with baselines on real data, one command.

    fineprune bench --fsdd ../shared/data/fsdd --out runs/bench

Fixed, seeded protocol. Tasks: digits (users hold 2-3 classes), FSDD leave-one-speaker-out (base
trained on 5 speakers, the 6th is the user), FSDD seen speakers holding 3-4 digits. Every method runs
on the same users; writes results.csv (one row per task x user x method), results.md,
compaction.csv, accuracy_vs_sparsity.png and compute.png.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import baselines as BL
from common import data as D
from common import protocol as P
from common.checkpoint import fingerprint, load_checkpoint
from common.compact import compact
from common.federation import model_bytes
from common.models import prunable_layers
from common.io import atomic_write_csv, atomic_write_png, atomic_write_text
from common.pretrain import pretrain
from common.prune import PruneConfig, fine_prune, personalized_model
from common.summary import build_summary, encode, model_usage_histograms
from common.train import accuracy, time_inference, train_supervised
from simulations import cohorts as CO
from simulations.cohorts import BenchUser

LEVELS = (0.5, 0.7, 0.9)
SCORERS = ("usage", "usage-share", "discriminative", "firing", "magnitude", "random")
WITH_BN = ("usage+bn", "magnitude+bn", "discriminative+bn")  # criteria compared with BatchNorm recalibration, as a device runs them
HEADLINE = ("usage+bn+restrict", "stop")        # our default: what a device runs
BACKPROP = "backprop-5ep (labels)"
DISC = ("discriminative+bn+restrict", "stop")  # pseudo-class-discriminative magnitude, label-free stop
BASELINES = ("adabn", "t3a", "adabn+t3a", "lame", "tent (backprop, no labels)")
TASKS = ("digits", "fsdd-loso", "fsdd-seen", "digits-style", "fsdd-cond", "fsdd-few")
MEMORY_METHODS = {("base", "-"), ("bn-recal", "-"), ("usage", "0.7"), ("usage", "stop"), HEADLINE,
                  (BACKPROP, "-")}


def plan() -> list[tuple[str, str, dict]]:
    """(method, level, PruneConfig kwargs) in run order. Controls at level "stop" prune to the
    sparsity the label-free stop rule reached with `usage` (with BatchNorm recalibration: with
    `usage+bn`), filled in by run_user once known."""
    p = [("bn-recal", "-", dict(target_sparsity=0.0, recalibrate_bn=True)),
         ("restrict", "-", dict(target_sparsity=0.0, restrict_outputs=True))]
    for s in SCORERS:
        for lv in LEVELS:
            p.append((s, str(lv), dict(scoring=s, target_sparsity=lv)))
        p.append((s, "stop", dict(scoring="usage") if s == "usage" else dict(scoring=s, target_sparsity=None)))
    for m in WITH_BN:
        scoring = m.split("+")[0]
        for lv in LEVELS:
            p.append((m, str(lv), dict(scoring=scoring, target_sparsity=lv, recalibrate_bn=True)))
    p.append(("usage+bn", "stop", dict(recalibrate_bn=True)))
    p.append(("magnitude+bn", "stop", dict(scoring="magnitude", recalibrate_bn=True, target_sparsity=None)))
    p.append(("discriminative+bn", "stop", dict(scoring="discriminative", recalibrate_bn=True)))
    p.append((*DISC, dict(scoring="discriminative", recalibrate_bn=True, restrict_outputs=True)))
    p.append((*HEADLINE, dict(recalibrate_bn=True, restrict_outputs=True)))
    # ablation: usage measured on the unadapted base (the engine before adapted statistics)
    p.append(("usage+bn (base stats)", "0.7", dict(target_sparsity=0.7, recalibrate_bn=True, base_stats=True)))
    p.append(("usage+bn (base stats)", "stop", dict(recalibrate_bn=True, base_stats=True)))
    for lv in ("0.7", "stop"):
        p.append(("discriminative+bn+proto", lv, dict(scoring="discriminative", recalibrate_bn=True, head="prototypes",
                                                      target_sparsity=0.7 if lv == "0.7" else None)))
    return p


def baseline_rows(common: dict, base, user: BenchUser) -> list[dict]:
    """The label-free adaptation baselines, scored like every method (no pruning, dense model)."""
    runs = {"adabn": lambda: BL.adabn(base, user.x), "t3a": lambda: BL.t3a(base, user.x),
            "adabn+t3a": lambda: BL.t3a(base, user.x, recalibrate=True), "lame": lambda: BL.lame(base, user.x),
            "tent (backprop, no labels)": lambda: BL.tent(base, user.x)}
    rows = []
    for name in BASELINES:
        a = runs[name]()
        with torch.no_grad():
            acc = (a.predict(user.heldout_x).argmax(1) == user.heldout_y).float().mean().item()
        rows.append(dict(common, method=name, level="-", accuracy=acc, sparsity=0.0, stop_reason="",
                         seconds=a.seconds, forward_passes=a.forward_samples / len(user.x),
                         backward_passes=a.backward_samples / len(user.x), upload_bytes=0, bitmap_bytes=0,
                         peak_mb=None))
    return rows


# ---------------------------------------------------------------- users and bases
def _cached_pretrain(ck: Path, *args, **kw) -> dict | None:
    """Pretrain once per benchmark directory: tasks that share a base (and a rerun) reuse it."""
    if ck.is_file():
        return None
    return pretrain(*args, **kw)


def digits_task(out: Path, seed: int, n_users: int, epochs: int | None, style: bool = False):
    ds = D.load_digits()
    ck = out / "bases" / f"digits_s{seed}_e{epochs or 0}.pt"
    _cached_pretrain(ck, "digits", ck, seed=seed, ds=ds, epochs=epochs)
    base, meta, _ = load_checkpoint(ck)
    if style:
        _, pool = P.vendor_and_pool("digits", ds, seed)
        return [(base, meta, u) for u in CO.image_style_users(ds, pool, seed)]
    _, pool = P.vendor_and_pool("digits", ds, seed)
    sub = ds.subset(pool)
    rng = np.random.default_rng(seed)
    users = []
    for i, g in enumerate(D.partition_class_subsets(sub.y.numpy(), n_users, (2, 3), seed)):
        pers, ev = D.split_heldout(np.asarray(g), 0.3, rng)
        users.append((base, meta, _user(f"user{i}", sub, pers, ev)))
    return users


def _user(uid, ds: D.Dataset, pers, ev) -> BenchUser:
    p, e = torch.as_tensor(np.asarray(pers)), torch.as_tensor(np.asarray(ev))
    return BenchUser(str(uid), ds.x[p], ds.y[p], ds.x[e], ds.y[e])


def fsdd_loso_task(out: Path, ds: D.Dataset, seed: int, epochs: int | None, log, few: bool = False):
    """Leave one speaker out; `few`: that speaker has 24 clips of 4 digits (CO.few_data_user)."""
    users, rng = [], np.random.default_rng(seed)
    for spk in sorted(set(ds.groups.tolist())):
        ck = out / "bases" / f"fsdd_without_{spk}_s{seed}_e{epochs or 0}.pt"
        r = _cached_pretrain(ck, "fsdd", ck, seed=seed, exclude_speaker=spk, ds=ds, epochs=epochs)
        if r:
            log(f"  fsdd base without {spk}: seen-speaker test accuracy {r['test_accuracy']:.3f} "
                f"({r['train_seconds']:.0f} s)")
        user = CO.few_data_user(ds, spk, rng) if few else _user(spk, ds, *P.speaker_user(ds, spk))
        users.append((*load_checkpoint(ck)[:2], user))
    return users


def fsdd_seen_task(out: Path, ds: D.Dataset, seed: int, epochs: int | None, log, conditions: bool = False):
    """The vendor trains on takes 25-49 of every speaker; each speaker is then a user holding 3-4
    digits: takes 5-24 unlabeled, takes 0-4 held out (never seen by the vendor either)."""
    ck = out / "bases" / f"fsdd_seen_s{seed}_e{epochs or 0}.pt"
    r = _cached_pretrain(ck, "fsdd", ck, seed=seed, ds=ds, epochs=epochs, indices=P.seen_speaker_split(ds))
    if r:
        log(f"  fsdd base on takes 25-49: test accuracy {r['test_accuracy']:.3f} ({r['train_seconds']:.0f} s)")
    base, meta, _ = load_checkpoint(ck)
    if conditions:  # the same clean-speech base; users speak under their own acoustic condition
        return [(base, meta, u) for u in CO.speech_condition_users(ds, seed)]
    rng = np.random.default_rng(seed)
    users = []
    for spk in sorted(set(ds.groups.tolist())):
        digits = rng.choice(10, size=int(rng.integers(3, 5)), replace=False)
        pers, ev = (i[np.isin(ds.y.numpy()[i], digits)] for i in P.speaker_user(ds, spk, (P.TEST_TAKES, P.VENDOR_TAKE)))
        users.append((base, meta, _user(f"{spk}:{''.join(map(str, sorted(digits)))}", ds, pers, ev)))
    return users


# ---------------------------------------------------------------- one user, every method
def run_user(task: str, base, user: BenchUser, measure_memory: bool) -> list[dict]:
    base_acc = accuracy(base, user.heldout_x, user.heldout_y)
    infer_s = time_inference(base, user.x)
    n = len(user.x)
    fp, size = fingerprint(base), model_bytes(base)
    common = {"task": task, "user": user.user_id, "n_unlabeled": n, "n_heldout": len(user.heldout_y),
              "accuracy_base": base_acc, "inference_seconds": infer_s}
    rows = [dict(common, method="base", level="-", accuracy=base_acc, sparsity=0.0, stop_reason="",
                 seconds=infer_s, forward_passes=1.0, backward_passes=0.0, upload_bytes=0, bitmap_bytes=0,
                 peak_mb=_peak_mb("inference", base, user.x) if measure_memory else None)]
    stops = {}  # the sparsity each label-free stop reached, for the matched controls
    for method, level, kw in plan():
        if level == "stop" and "target_sparsity" in kw:
            kw = dict(kw, target_sparsity=stops["usage+bn" if method.endswith("+bn") else "usage"])
        cfg = PruneConfig(**kw)
        model = copy.deepcopy(base)
        res = fine_prune(model, user.x, cfg)
        if level == "stop" and "target_sparsity" not in kw:
            stops[method] = round(res.sparsity, 6)
        hist = model_usage_histograms(base, res.stats)
        rows.append(dict(common, method=method, level=level,
                         accuracy=accuracy(personalized_model(model, res), user.heldout_x, user.heldout_y),
                         sparsity=res.sparsity, stop_reason=res.stop_reason, seconds=res.seconds,
                         forward_passes=res.forward_samples / n, backward_passes=0.0,
                         upload_bytes=len(encode(build_summary(res.mask, hist, "sketch", fp, size))),
                         bitmap_bytes=len(encode(build_summary(res.mask, hist, "bitmap", fp, size))),
                         peak_mb=(_peak_mb("prune", base, user.x, cfg=cfg)
                                  if measure_memory and (method, level) in MEMORY_METHODS else None)))
    rows += baseline_rows(common, base, user)
    # the expensive baseline: backprop with the labels a device does not have; in a federation it
    # would upload its weights (or their update), the dense fp32 model
    model = copy.deepcopy(base)
    cost = train_supervised(model, user.x, user.y, epochs=5, lr=5e-4, batch_size=32)
    rows.append(dict(common, method=BACKPROP, level="-", accuracy=accuracy(model, user.heldout_x, user.heldout_y),
                     sparsity=0.0, stop_reason="", seconds=cost["seconds"],
                     forward_passes=cost["forward_samples"] / n, backward_passes=cost["backward_samples"] / n,
                     upload_bytes=size, bitmap_bytes=0,
                     peak_mb=(_peak_mb("backprop", base, user.x, user.y) if measure_memory else None)))
    for r in rows:
        r["x_inference"] = r["seconds"] / infer_s
    return rows


def _peak_mb(kind: str, base, x, y=None, cfg: PruneConfig | None = None) -> float | None:
    """Peak memory one method adds on top of the loaded model and data, in MB. It runs in a fresh
    (spawned) child process: forking a process whose torch thread pool has run deadlocks. The
    child returns free heap to the OS first, so reuse cannot hide growth, and resets the kernel's
    high-water mark (VmHWM) before the run."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_child, (kind, base, x, y, cfg, torch.get_num_threads()))


def _peak_child(kind, base, x, y, cfg, threads) -> float:
    torch.set_num_threads(threads)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = _status_kb("VmHWM")
    if kind == "inference":
        time_inference(base, x, repeats=1)
    elif kind == "prune":
        fine_prune(copy.deepcopy(base), x, cfg)
    else:  # one epoch of backprop
        train_supervised(copy.deepcopy(base), x, y, epochs=1, batch_size=32)
    return (_status_kb("VmHWM") - start) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------- compaction
def compaction_rows(task, base, meta: dict, user: BenchUser) -> list[dict]:
    """Latency (1 sample, 1 thread) and size of compacted personalized models vs the base."""
    layers = prunable_layers(base)
    widths = tuple(layers[n].weight.shape[0] for n in base.prunable_chain[:-1])
    out = []
    for name, kw in (("usage+bn+restrict@stop", dict(recalibrate_bn=True, restrict_outputs=True)),
                     ("firing@0.3 per layer+bn+restrict", dict(scoring="firing", scope="layer", target_sparsity=0.3,
                                                               recalibrate_bn=True, restrict_outputs=True))):
        model = copy.deepcopy(base)
        res = fine_prune(model, user.x, PruneConfig(**kw))
        small, _, new_kw = compact(model, res.mask, meta["arch"], meta["arch_kwargs"])
        one = user.x[:1]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one edge CPU core, one sample
        lat = {k: min(_latency(m, one) for _ in range(5)) for k, m in (("base", base), ("compact", small))}
        torch.set_num_threads(threads)
        same = torch.equal(model(user.x[:64]).argmax(1), small(user.x[:64]).argmax(1))
        out.append({"task": task, "user": user.user_id, "method": name, "sparsity": res.sparsity,
                    "accuracy": accuracy(personalized_model(model, res), user.heldout_x, user.heldout_y),
                    "widths_base": str(widths), "widths_compact": str(tuple(new_kw["widths"])),
                    "latency_ms_base": lat["base"] * 1e3, "latency_ms_compact": lat["compact"] * 1e3,
                    "bytes_base": _state_bytes(base), "bytes_compact": _state_bytes(small),
                    "same_predictions": same})
    return out


def _state_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


@torch.no_grad()
def _latency(model, x, n=50):
    model.eval()
    t0 = time.perf_counter()
    for _ in range(n):
        model(x)
    return (time.perf_counter() - t0) / n


# ---------------------------------------------------------------- tables and plots
def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for key in dict.fromkeys((r["method"], r["level"]) for r in rows if r["task"] == task):
            rs = [r for r in rows if r["task"] == task and (r["method"], r["level"]) == key]
            mem = [r["peak_mb"] for r in rs if r["peak_mb"] is not None]
            out.append({"task": task, "method": key[0], "level": key[1], "users": len(rs),
                        **{k: float(np.mean([r[k] for r in rs])) for k in
                           ("accuracy_base", "accuracy", "sparsity", "seconds", "x_inference", "forward_passes",
                            "backward_passes", "upload_bytes")},
                        "accuracy_min": float(np.min([r["accuracy"] for r in rs])),
                        "delta_min": float(np.min([r["accuracy"] - r["accuracy_base"] for r in rs])),
                        "peak_mb": float(np.mean(mem)) if mem else None})
    return out


def headline(summary: list[dict]) -> list[dict]:
    """Per task: the label-free stop vs the paper's ~70% / ~90%, the winner at 70%, and costs."""
    out = []
    for task in dict.fromkeys(s["task"] for s in summary):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        at70 = {m: get[(m, "0.7")]["accuracy"] for m in SCORERS + WITH_BN if (m, "0.7") in get}
        stop, bp = get[HEADLINE], get[(BACKPROP, "-")]
        out.append({"task": task, "base_accuracy": get[("base", "-")]["accuracy"],
                    "stop_accuracy": stop["accuracy"], "stop_sparsity": stop["sparsity"],
                    "winner_at_0.7": max(at70, key=at70.get), "accuracy_at_0.7": at70,
                    "stop_x_inference": stop["x_inference"], "backprop_x_inference": bp["x_inference"],
                    "backprop_over_stop_time": bp["seconds"] / stop["seconds"],
                    "target_0.7_x_inference": get[("usage", "0.7")]["x_inference"],
                    "backprop_over_target_0.7_time": bp["seconds"] / get[("usage", "0.7")]["seconds"],
                    "backprop_accuracy": bp["accuracy"]})
    return out


PERSONALIZATION = [("base", "-"), ("adabn", "-"), ("t3a", "-"), ("lame", "-"), ("adabn+t3a", "-"),
                   ("tent (backprop, no labels)", "-"), HEADLINE, ("usage+bn (base stats)", "0.7"),
                   ("usage+bn", "0.7"), ("magnitude+bn", "0.7"), ("discriminative+bn", "0.7"),
                   ("discriminative+bn", "stop"), DISC, ("discriminative+bn+proto", "0.7"),
                   ("discriminative+bn+proto", "stop"), (BACKPROP, "-")]


def personalization_table(summary) -> list[dict]:
    """Per task, one row per method of the personalization comparison: mean accuracy, sparsity,
    the worst user's change from the base, and the margin over the best label-free baseline."""
    out = []
    for task in dict.fromkeys(s["task"] for s in summary):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        best = max(get[(b, "-")]["accuracy"] for b in ("adabn", "t3a", "lame", "adabn+t3a"))
        for key in PERSONALIZATION:
            s = get[key]
            out.append({"task": task, "method": key[0], "level": key[1], "accuracy": s["accuracy"],
                        "sparsity": s["sparsity"], "worst_user_delta": s["delta_min"],
                        "over_best_baseline": s["accuracy"] - best, "x_inference": s["x_inference"]})
    return out


def _grouped_bars(ax, rows: list[dict], keys: list, value: str):
    """One group of bars per task, one bar per (method, level) key."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    width = 0.85 / len(keys)
    for i, key in enumerate(keys):
        vals = [next(r[value] for r in rows if r["task"] == t and (r["method"], r["level"]) == key) for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=f"{key[0]} {key[1] if key[1] != '-' else ''}")
    ax.set_xticks(np.arange(len(tasks)) + width * (len(keys) - 1) / 2, tasks)


def plot_personalization(table, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["method"], r["level"]) for r in table))
    tasks = list(dict.fromkeys(r["task"] for r in table))
    fig, ax = plt.subplots(figsize=(max(9, 2.2 * len(tasks)), 4.5))
    _grouped_bars(ax, table, keys, "accuracy")
    ax.set_ylabel("mean held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Personalization: label-free baselines, fine-pruning and the backprop ceiling")
    ax.legend(fontsize=6, ncol=3, loc="lower left")
    atomic_write_png(path, fig)


def to_markdown(summary, heads, comps, wall: float) -> str:
    lines = ["| task | method | level | acc | sparsity | worst user vs base | vs best of AdaBN/T3A/LAME/AdaBN+T3A "
             "| x one inference pass |", "|" + "---|" * 8]
    for r in personalization_table(summary):
        lines.append(f"| {r['task']} | {r['method']} | {r['level']} | {r['accuracy']:.3f} | {r['sparsity']:.2f} | "
                     f"{r['worst_user_delta']:+.3f} | {r['over_best_baseline']:+.3f} | {r['x_inference']:.2f} |")
    lines += ["", "| task | method | sparsity level | users | acc (base) | acc | min user acc | sparsity | s/user | "
             "x one inference pass | fwd passes | bwd passes | upload B | peak MB |", "|" + "---|" * 14]
    for s in summary:
        pk = f"{s['peak_mb']:.1f}" if s["peak_mb"] is not None else ""
        lines.append(f"| {s['task']} | {s['method']} | {s['level']} | {s['users']} | {s['accuracy_base']:.3f} | "
                     f"{s['accuracy']:.3f} | {s['accuracy_min']:.3f} | {s['sparsity']:.3f} | {s['seconds']:.3f} | "
                     f"{s['x_inference']:.2f} | {s['forward_passes']:.2f} | {s['backward_passes']:.1f} | "
                     f"{s['upload_bytes']:.0f} | {pk} |")
    lines += ["", "| task | base acc | label-free stop (usage+bn+restrict): acc @ sparsity | winner at 70% | "
              "stop: x inference | backprop / stop time | usage@0.7: x inference | backprop / usage@0.7 time | "
              "backprop acc |", "|" + "---|" * 9]
    for h in heads:
        lines.append(f"| {h['task']} | {h['base_accuracy']:.3f} | {h['stop_accuracy']:.3f} @ {h['stop_sparsity']:.3f} "
                     f"| {h['winner_at_0.7']} ({h['accuracy_at_0.7'][h['winner_at_0.7']]:.3f}) | "
                     f"{h['stop_x_inference']:.2f} | {h['backprop_over_stop_time']:.1f}x | "
                     f"{h['target_0.7_x_inference']:.2f} | {h['backprop_over_target_0.7_time']:.1f}x | "
                     f"{h['backprop_accuracy']:.3f} |")
    if comps:
        lines += ["", "| task | compacted model | sparsity | acc | widths base -> compact | latency ms (1 sample, "
                  "1 thread) | bytes | same predictions |", "|" + "---|" * 8]
        for c in comps:
            lines.append(f"| {c['task']} | {c['method']} | {c['sparsity']:.3f} | {c['accuracy']:.3f} | "
                         f"{c['widths_base']} -> {c['widths_compact']} | {c['latency_ms_base']:.3f} -> "
                         f"{c['latency_ms_compact']:.3f} | {c['bytes_base']} -> {c['bytes_compact']} | "
                         f"{c['same_predictions']} |")
    lines += ["", f"Wall time of the whole benchmark: {wall:.0f} s on {torch.get_num_threads()} CPU threads."]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_sparsity(summary, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        start = {m: get[("bn-recal", "-")] for m in WITH_BN}
        for m in SCORERS + WITH_BN:
            pts = [start.get(m, get[("base", "-")])] + [get[(m, str(lv))] for lv in LEVELS]
            line, = ax.plot([p["sparsity"] for p in pts], [p["accuracy"] for p in pts], "o-", label=m)
            st = get[(m, "stop")]
            ax.plot(st["sparsity"], st["accuracy"], "*", ms=12, color=line.get_color())
        h = get[HEADLINE]
        ax.plot(h["sparsity"], h["accuracy"], "kP", ms=11, label="usage+bn+restrict, label-free stop")
        ax.axhline(get[(BACKPROP, "-")]["accuracy"], color="grey", ls="--", label="backprop 5 ep (labels)")
        ax.axhline(get[("base", "-")]["accuracy"], color="black", ls=":", label="base model")
        ax.set_title(f"{task} (stars: label-free stop / matched)")
        ax.set_xlabel("sparsity of prunable weights")
        ax.set_ylabel("mean held-out accuracy")
        ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=7, loc="lower left")
    atomic_write_png(path, fig)


def plot_compute(summary, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = [("base", "-"), ("bn-recal", "-"), ("usage", "0.7"), ("usage", "stop"), HEADLINE, (BACKPROP, "-")]
    fig, ax = plt.subplots(figsize=(9, 4))
    _grouped_bars(ax, summary, show, "x_inference")
    ax.set_yscale("log")
    ax.set_ylabel("wall time / one inference pass (log)")
    ax.set_title("Compute per user, in units of one plain inference pass over the same data")
    ax.legend(fontsize=7)
    atomic_write_png(path, fig)


# ---------------------------------------------------------------- entry point
def run(out: Path, fsdd: str | None, seed: int = 0, digits_users: int = 10, digits_epochs: int | None = None,
        fsdd_epochs: int | None = 12, tasks=TASKS, memory: bool = True,
        log=print) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    jobs = []
    if "digits" in tasks:
        jobs.append(("digits", lambda: digits_task(out, seed, digits_users, digits_epochs)))
    if "digits-style" in tasks:
        jobs.append(("digits-style", lambda: digits_task(out, seed, digits_users, digits_epochs, style=True)))
    if fsdd and any(t.startswith("fsdd") for t in tasks):
        ds = D.load_fsdd(fsdd)
        for name, make in (("fsdd-loso", lambda: fsdd_loso_task(out, ds, seed, fsdd_epochs, log)),
                           ("fsdd-seen", lambda: fsdd_seen_task(out, ds, seed, fsdd_epochs, log)),
                           ("fsdd-cond", lambda: fsdd_seen_task(out, ds, seed, fsdd_epochs, log, conditions=True)),
                           ("fsdd-few", lambda: fsdd_loso_task(out, ds, seed, fsdd_epochs, log, few=True))):
            if name in tasks:
                jobs.append((name, make))
    if not jobs:
        raise ValueError("nothing to run: choose a task (FSDD tasks need --fsdd DIR)")
    rows, comps = [], []
    for task, make in jobs:
        log(f"[{time.perf_counter() - t0:5.0f} s] {task}: pretraining base model(s)")
        users = make()
        for i, (base, _, user) in enumerate(users):
            rows += run_user(task, base, user, measure_memory=memory and i == 0)
            log(f"[{time.perf_counter() - t0:5.0f} s] {task}: user {user.user_id} done ({i + 1}/{len(users)})")
        if task in ("digits", "fsdd-loso", "fsdd-seen"):
            comps += compaction_rows(task, *users[0])
    summary = summarize(rows)
    heads = headline(summary)
    wall = time.perf_counter() - t0
    atomic_write_csv(out / "results.csv", rows)
    if comps:
        atomic_write_csv(out / "compaction.csv", comps)
    md = to_markdown(summary, heads, comps, wall)
    atomic_write_text(out / "results.md", md)
    plot_accuracy_vs_sparsity(summary, out / "accuracy_vs_sparsity.png")
    plot_compute(summary, out / "compute.png")
    table = personalization_table(summary)
    atomic_write_csv(out / "personalization.csv", table)
    plot_personalization(table, out / "personalization.png")
    result = {"summary": summary, "headline": heads, "compaction": comps, "wall_seconds": wall}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=float))
    return result


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fineprune bench", description=__doc__.splitlines()[0])
    p.add_argument("--fsdd", help="FSDD directory (e.g. ../shared/data/fsdd); without it, digits only")
    p.add_argument("--out", default="runs/bench", help="directory for results.csv/.md/.json and plots")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of: " + ", ".join(TASKS))
    p.add_argument("--digits-users", type=int, default=10)
    p.add_argument("--fsdd-epochs", type=int, default=12, help="pretraining epochs of the FSDD bases (default 12)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args) -> dict:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown bench task(s): {', '.join(sorted(unknown))} (choose from: {', '.join(TASKS)})")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    res = run(Path(args.out), args.fsdd, args.seed, args.digits_users, fsdd_epochs=args.fsdd_epochs, tasks=tasks,
              memory=not args.no_memory, log=lambda s: print(s, file=sys.stderr, flush=True))
    print((Path(args.out) / "results.md").read_text(), file=sys.stderr)
    return {"results": str(Path(args.out) / "results.md"), "headline": res["headline"],
            "wall_seconds": res["wall_seconds"]}


if __name__ == "__main__":
    main(build_parser().parse_args())
