"""Can the statistics pass alone say where the label-free stop stops? If a number computed from
the scores (no probe pass) located the agreement rule's stop, the default would cost what a fixed
target costs (one statistics pass and one recalibration: 1.1-1.2x an inference pass on the
ResNets instead of 2.2-2.4x). For every user of the benchmark's cohorts this records the default's
stop and held-out accuracy, the held-out accuracy of the kept model at every step of the schedule,
and each proxy along the schedule; then, leaving one cohort out at a time, it sets the proxy's
threshold to its median at the agreement stop on the other cohorts and stops the held-out
cohort's users there. `level` (the sparsity itself: a fixed target learned the same way) is the
comparison a proxy has to beat. Results: stop_proxy.json, stop_proxy.md, stop_proxy.png.

    python -m simulations.stop_proxy --fsdd ../shared/data/fsdd --out runs/stop_proxy --bases runs/bench
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common.cli import first_sentence
from common.engine.prune import fine_prune, personalized_model
from common.engine.select import compute_scores, masker, schedule
from common.io import atomic_write_png, atomic_write_text
from common.model.mask import Mask
from common.model.train import accuracy
from common.settings import PruneConfig
from simulations.bench_report import PREVIOUS_DEFAULT


def _energy(scores: dict, mask: Mask) -> list[float]:
    """Per layer, the share of sum(score^2) the mask removes: with usage scores (|w_ij| times the
    RMS of input j) that is the layer's output energy removed, inputs taken as uncorrelated."""
    out = []
    for k, s in scores.items():
        s2 = s.double() ** 2
        out.append(float(s2[~mask.layers[k]].sum() / s2.sum().clamp_min(1e-30)))
    return out


def _mass_removed(scores: dict, mask: Mask) -> float:
    return float(sum(s.double()[~mask.layers[k]].sum() for k, s in scores.items())
                 / sum(s.double().sum() for s in scores.values()))


# proxy name -> (the step: scores, mask, sparsity, per-layer energy removed) -> a value that grows
# with the sparsity (nested masks)
PROXIES = {
    "energy, worst layer": lambda sc, m, lv, e: max(e),
    "energy, layer mean": lambda sc, m, lv, e: float(np.mean(e)),
    "score mass removed": lambda sc, m, lv, e: _mass_removed(sc, m),
    "signal lost through depth": lambda sc, m, lv, e: 1.0 - float(np.prod([1 - v ** 0.5 for v in e])),
    "sparsity, worst layer": lambda sc, m, lv, e: max(1 - float(v.float().mean()) for v in m.layers.values()),
    "level (a fixed target)": lambda sc, m, lv, e: lv,
}


def user_curves(base, x, hx, hy, step: float = 0.1, max_sparsity: float = 0.95) -> dict:
    """The default's stop and accuracy; accuracy and every proxy at each step of the schedule."""
    levels = schedule(step, max_sparsity)
    cfg = PruneConfig(**PREVIOUS_DEFAULT, step=step, max_sparsity=max_sparsity)  # the engine this study measured
    model = copy.deepcopy(base)
    res = fine_prune(model, x, cfg)
    stop_acc = accuracy(personalized_model(model, res), hx, hy)
    # the masks along the schedule come from the default's own scores
    scores = compute_scores(base, res.stats, cfg.scoring, cfg.seed)
    at = masker(scores, Mask.dense(base), cfg.scope, False, single=True)
    acc, prox = [], {p: [] for p in PROXIES}
    for lv in levels:
        m = at(lv)
        energy = _energy(scores, m)  # read by three proxies: computed once per step
        for p, f in PROXIES.items():
            prox[p].append(f(scores, m, lv, energy))
        pruned = copy.deepcopy(base)
        r = fine_prune(pruned, x, PruneConfig(**PREVIOUS_DEFAULT, step=step, max_sparsity=max_sparsity,
                                              target_sparsity=lv))
        acc.append(accuracy(personalized_model(pruned, r), hx, hy))
    # the step the rule kept (the restriction's rows add a little sparsity on top of it)
    stop = max([i for i, lv in enumerate(levels) if lv <= res.sparsity + 1e-6], default=-1)
    return {"levels": levels, "stop": stop, "stop_sparsity": res.sparsity, "stop_accuracy": stop_acc,
            "accuracy": acc, "proxies": prox, "probes": len(res.history)}


def _stop_at(row: dict, proxy: str, tau: float) -> int:
    return max([i for i, v in enumerate(row["proxies"][proxy]) if v <= tau], default=-1)


def leave_one_cohort_out(rows: list[dict], proxy: str) -> dict:
    """Per held-out cohort: the threshold from the other cohorts (the proxy's median at their
    agreement stop), and what stopping there does against the agreement stop, user by user."""
    cohorts = list(dict.fromkeys(r["cohort"] for r in rows))
    out = {}
    for c in cohorts:
        train = [r["proxies"][proxy][r["stop"]] for r in rows if r["cohort"] != c and r["stop"] >= 0]
        if not train:
            continue
        tau = float(np.median(train))
        d_acc, d_sp, near = [], [], []
        for r in (r for r in rows if r["cohort"] == c):
            i = _stop_at(r, proxy, tau)
            # stopping before the first step keeps the dense model; its accuracy is taken at the
            # first step (within a point of it on these users), and so is a rule that kept nothing
            d_acc.append(r["accuracy"][max(i, 0)] - r["stop_accuracy"])
            d_sp.append((r["levels"][i] if i >= 0 else 0.0) - (r["levels"][r["stop"]] if r["stop"] >= 0 else 0.0))
            near.append(abs(i - r["stop"]) <= 1)
        out[c] = {"tau": tau, "mean_d_accuracy": float(np.mean(d_acc)), "worst_d_accuracy": float(min(d_acc)),
                  "mean_d_sparsity": float(np.mean(d_sp)), "within_one_step": float(np.mean(near)), "users": len(d_acc)}
    return out


def summarize(rows: list[dict]) -> dict:
    table = {}
    for p in PROXIES:
        per = leave_one_cohort_out(rows, p)
        n = sum(v["users"] for v in per.values())
        table[p] = {"cohorts": per,
                    "mean_d_accuracy": sum(v["mean_d_accuracy"] * v["users"] for v in per.values()) / max(n, 1),
                    "worst_d_accuracy": min((v["worst_d_accuracy"] for v in per.values()), default=0.0),
                    "within_one_step": sum(v["within_one_step"] * v["users"] for v in per.values()) / max(n, 1),
                    "at_stop": {c: float(np.median([r["proxies"][p][r["stop"]] for r in rows
                                                     if r["cohort"] == c and r["stop"] >= 0] or [np.nan]))
                                for c in dict.fromkeys(r["cohort"] for r in rows)}}
    return table


def to_markdown(table: dict, rows: list[dict]) -> str:
    cohorts = list(dict.fromkeys(r["cohort"] for r in rows))
    lines = ["Leave one cohort out: a proxy's threshold is its median at the agreement stop on the other cohorts. "
             "Each cell: mean accuracy change / worst user's change / mean sparsity change against the agreement "
             "stop (held-out labels, used only to score).", "",
             "| proxy | " + " | ".join(cohorts) + " | mean change | worst user | users within one step of the rule's stop |",
             "|---|" + "---|" * (len(cohorts) + 3)]
    for p, t in table.items():
        cells = [(f"{t['cohorts'][c]['mean_d_accuracy']:+.3f} / {t['cohorts'][c]['worst_d_accuracy']:+.2f} / "
                  f"{t['cohorts'][c]['mean_d_sparsity']:+.2f}") if c in t["cohorts"] else "-" for c in cohorts]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {t['mean_d_accuracy']:+.3f} | {t['worst_d_accuracy']:+.2f} | "
                     f"{t['within_one_step']:.2f} |")
    lines += ["", "The proxy's median at the agreement stop, per cohort (a proxy that located the stop would "
              "read about the same everywhere):", "",
              "| proxy | " + " | ".join(cohorts) + " |", "|---|" + "---|" * len(cohorts)]
    for p, t in table.items():
        lines.append(f"| {p} | " + " | ".join(f"{t['at_stop'][c]:.3g}" for c in cohorts) + " |")
    lines += ["", "The agreement stop per cohort (mean held-out accuracy, mean sparsity, mean probes): " + ", ".join(
        f"{c} {np.mean([r['stop_accuracy'] for r in rows if r['cohort'] == c]):.3f} at "
        f"{np.mean([r['stop_sparsity'] for r in rows if r['cohort'] == c]):.2f}, "
        f"{np.mean([r['probes'] for r in rows if r['cohort'] == c]):.1f} probes" for c in cohorts)]
    return "\n".join(lines) + "\n"


def plot(table: dict, rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = list(dict.fromkeys(r["cohort"] for r in rows))
    names = [p for p in PROXIES if p != "level (a fixed target)"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), names):
        for j, c in enumerate(cohorts):
            v = [r["proxies"][p][r["stop"]] for r in rows if r["cohort"] == c and r["stop"] >= 0]
            ax.scatter(v, [j] * len(v), s=14)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_title(p, fontsize=8)
    np.atleast_1d(axes)[0].set_yticks(range(len(cohorts)), cohorts, fontsize=8)
    fig.suptitle("Each proxy at the agreement rule's stop, per user (one threshold would need one column)", fontsize=9)
    fig.tight_layout()
    return fig


def cohort_users(out: Path, fsdd: str | None, names: list[str]):
    """(cohort, base, user) for the benchmark's cohorts, bases pretrained once under out/bases."""
    from common.data import readers as D
    from simulations.bench_tasks import digits_task, fsdd_loso_task, fsdd_seen_task

    ds = D.load_fsdd(fsdd) if fsdd and any(n.startswith("fsdd") for n in names) else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    make = {"digits": lambda: digits_task(out, 0, 10, None),
            "digits-style": lambda: digits_task(out, 0, 10, None, style=True),
            "fsdd-loso": lambda: fsdd_loso_task(out, ds, 0, 12, log),
            "fsdd-seen": lambda: fsdd_seen_task(out, ds, 0, 12, log),
            "fsdd-cond": lambda: fsdd_seen_task(out, ds, 0, 12, log, conditions=True),
            "fsdd-few": lambda: fsdd_loso_task(out, ds, 0, 12, log, few=True)}
    for n in names:
        for base, _meta, user in make[n]():
            yield n, base, user


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m simulations.stop_proxy", description=first_sentence(__doc__))
    p.add_argument("--fsdd", help="Free Spoken Digit Dataset directory (the fsdd cohorts)")
    p.add_argument("--cohorts", default="digits,digits-style,fsdd-loso,fsdd-seen,fsdd-cond,fsdd-few")
    p.add_argument("--users", type=int, default=0, help="at most this many users per cohort (0: all)")
    p.add_argument("--out", default="runs/stop_proxy")
    p.add_argument("--bases", help="directory whose bases/ holds the pretrained bases (the benchmark's: runs/bench); "
                                   "default --out, where missing ones are pretrained")
    return p


def main(args) -> dict:
    known = ("digits", "digits-style", "fsdd-loso", "fsdd-seen", "fsdd-cond", "fsdd-few")
    names = [c.strip() for c in args.cohorts.split(",") if c.strip()]
    if not names or (bad := [c for c in names if c not in known]):
        raise ValueError(f"unknown cohort(s): {', '.join(bad) if names else '(none)'} (choose from: {', '.join(known)})")
    if any(c.startswith("fsdd") for c in names) and not (args.fsdd and Path(args.fsdd).is_dir()):
        raise ValueError(f"the fsdd cohorts need --fsdd DIR with the Free Spoken Digit Dataset (got {args.fsdd})")
    torch.set_num_threads(1)
    out = Path(args.out)
    rows, seen, t0 = [], {}, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # restrict-outputs' doubt about a class, once per run
        for cohort, base, user in cohort_users(Path(args.bases) if args.bases else out, args.fsdd, names):
            if args.users and seen.get(cohort, 0) >= args.users:
                continue
            seen[cohort] = seen.get(cohort, 0) + 1
            r = user_curves(base, user.x, user.heldout_x, user.heldout_y)
            rows.append({"cohort": cohort, "user": user.user_id, "samples": len(user.x), **r})
            print(f"[{time.perf_counter() - t0:5.0f} s] {cohort} {user.user_id}: stop {r['stop_sparsity']:.2f}, "
                  f"accuracy {r['stop_accuracy']:.3f}", file=sys.stderr, flush=True)
    table = summarize(rows)
    atomic_write_text(out / "stop_proxy.json", json.dumps({"summary": table, "users": rows}, indent=1))
    md = to_markdown(table, rows)
    atomic_write_text(out / "stop_proxy.md", md)
    atomic_write_png(out / "stop_proxy.png", plot(table, rows))
    print(md, file=sys.stderr)
    return {"results": str(out / "stop_proxy.md"), "plot": str(out / "stop_proxy.png"), "users": len(rows)}


if __name__ == "__main__":
    try:
        print(json.dumps(main(build_parser().parse_args()), indent=2))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
