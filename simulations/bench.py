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
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from common.cli import first_sentence
from common.data import readers as D
from common.engine.forward import engine_layout, to_layout
from common.engine.prune import fine_prune, personalized_model
from common.engine.scoring import usage_scores
from common.io import atomic_write_csv, atomic_write_text
from common.model.architectures import prunable_layers
from common.model.checkpoint import fingerprint
from common.model.compact import compact
from common.model.train import accuracy, time_inference
from common.settings import PruneConfig
from common.wire.federation import model_bytes
from common.wire.summary import build_summary, encode, usage_histograms
from simulations import baselines as BL
from simulations.bench_report import (
    BACKPROP,
    DEFAULT,
    DISC,
    HEADLINE,
    LEVELS,
    PREVIOUS_DEFAULT,
    SCORERS,
    SECOND,
    WITH_BN,
    headline,
    personalization_table,
    plot_accuracy_vs_sparsity,
    plot_compute,
    plot_personalization,
    summarize,
    to_markdown,
)
from simulations.bench_tasks import COHORTS, cohort_users
from simulations.cohorts import BenchUser
from simulations.peak_memory import peak_mb

BASELINES = ("adabn", "t3a", "adabn+t3a", "stem-bn+t3a", "lame", "tent (backprop, no labels)")
TASKS = ("digits", "fsdd-loso", "fsdd-seen", "digits-style", "fsdd-cond", "fsdd-few", "resnet-few", "digits-nobn",
         "digits-style-nobn", "resnet-style", "digits-all-nobn")
MEMORY_METHODS = {("base", "-"), ("bn-recal", "-"), ("usage", "0.7"), ("usage", "stop"), DEFAULT, HEADLINE,
                  (BACKPROP, "-")}
# every other row names the engine of before the safe default: full recalibration, the base's
# output layer, no search bound; the default row takes the engine's defaults as they are
BEFORE = {**PREVIOUS_DEFAULT, "scoring": "usage", "recalibrate_bn": False, "restrict_outputs": False}


def plan() -> list[tuple[str, str, dict]]:
    """(method, level, PruneConfig kwargs) in run order. Controls at level "stop" prune to the
    sparsity the label-free stop rule reached with `usage` (with BatchNorm recalibration: with
    `usage+bn`), filled in by run_user once known. Every row names its scorer, BatchNorm
    recalibration and output restriction: a row means the same method whatever the defaults are."""
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
    proto = dict(scoring="discriminative", recalibrate_bn=True, head="prototypes")
    p.append(("discriminative+bn+proto", "0.7", dict(proto, target_sparsity=0.7)))
    p.append(("discriminative+bn+proto", "stop", proto))  # the label-free stop, not a matched control
    return [(*DEFAULT, {}), (*SECOND, dict(confirm="on"))] + [(m, lv, {**BEFORE, **kw}) for m, lv, kw in p]


def baseline_rows(common: dict, base, user: BenchUser) -> list[dict]:
    """The label-free adaptation baselines, scored like every method (no pruning, dense model)."""
    runs = BL.runs(base, user.x)
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


# ---------------------------------------------------------------- one user, every method
def run_user(task: str, base, user: BenchUser, measure_memory: bool, meta: dict | None = None) -> list[dict]:
    base_acc = accuracy(base, user.heldout_x, user.heldout_y)
    infer_s = time_inference(base, user.x)
    n = len(user.x)
    fp, size = fingerprint(base), model_bytes(base)
    common = {"task": task, "user": user.user_id, "n_unlabeled": n, "n_heldout": len(user.heldout_y),
              "accuracy_base": base_acc, "inference_seconds": infer_s}
    rows = [dict(common, method="base", level="-", accuracy=base_acc, sparsity=0.0, stop_reason="",
                 seconds=infer_s, forward_passes=1.0, backward_passes=0.0, upload_bytes=0, bitmap_bytes=0,
                 peak_mb=peak_mb("inference", base, user.x) if measure_memory else None)]
    stops = {}  # the sparsity each label-free stop reached, for the matched controls
    for method, level, kw in plan():
        if level == "stop" and "target_sparsity" in kw:
            kw = dict(kw, target_sparsity=stops["usage+bn" if method.endswith("+bn") else "usage"])
        cfg = PruneConfig(**kw)
        model = copy.deepcopy(base)
        res = fine_prune(model, user.x, cfg, base_meta=meta)
        if level == "stop" and "target_sparsity" not in kw:
            stops[method] = round(res.sparsity, 6)
        hist = usage_histograms(usage_scores(base, res.stats))
        rows.append(dict(common, method=method, level=level,
                         accuracy=accuracy(personalized_model(model, res), user.heldout_x, user.heldout_y),
                         sparsity=res.sparsity, stop_reason=res.stop_reason, seconds=res.seconds,
                         forward_passes=res.forward_samples / n, backward_passes=0.0,
                         upload_bytes=len(encode(build_summary(res.mask, hist, "sketch", fp, size))),
                         bitmap_bytes=len(encode(build_summary(res.mask, hist, "bitmap", fp, size))),
                         peak_mb=(peak_mb("prune", base, user.x, cfg=cfg)
                                  if measure_memory and (method, level) in MEMORY_METHODS else None)))
    # the baselines run in the engine's layout too (channels_last for conv nets), so the
    # cost column compares methods, not memory layouts
    fast = to_layout(copy.deepcopy(base), engine_layout(base))
    rows += baseline_rows(common, fast, user)
    # the expensive baseline: backprop with the labels a device does not have; in a federation it
    # would upload its weights (or their update), the dense fp32 model
    model = copy.deepcopy(fast)
    cost = BL.backprop_ceiling(model, user.x, user.y)
    rows.append(dict(common, method=BACKPROP, level="-", accuracy=accuracy(model, user.heldout_x, user.heldout_y),
                     sparsity=0.0, stop_reason="", seconds=cost["seconds"],
                     forward_passes=cost["forward_samples"] / n, backward_passes=cost["backward_samples"] / n,
                     upload_bytes=size, bitmap_bytes=0,
                     peak_mb=(peak_mb("backprop", base, user.x, user.y) if measure_memory else None)))
    for r in rows:
        r["x_inference"] = r["seconds"] / infer_s
    return rows


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


# ---------------------------------------------------------------- entry point
def run(out: Path, fsdd: str | None, seed: int = 0, digits_users: int = 10, digits_epochs: int | None = None,
        fsdd_epochs: int | None = 12, tasks=TASKS, memory: bool = True,
        log=print) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ds = D.load_fsdd(fsdd) if fsdd and any(t.startswith("fsdd") for t in tasks) else None
    jobs = [(name, lambda name=name: cohort_users(name, out, seed, ds, digits_users, digits_epochs, fsdd_epochs, log))
            for name in COHORTS if name in tasks and (ds is not None or not name.startswith("fsdd"))]
    if not jobs:
        raise ValueError("nothing to run: choose a task (FSDD tasks need --fsdd DIR)")
    rows, comps = [], []
    for task, make in jobs:
        log(f"[{time.perf_counter() - t0:5.0f} s] {task}: pretraining base model(s)")
        users = make()
        for i, (base, meta, user) in enumerate(users):
            rows += run_user(task, base, user, measure_memory=memory and i == 0, meta=meta)
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
    p = p or argparse.ArgumentParser(prog="fineprune bench", description=first_sentence(__doc__))
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
