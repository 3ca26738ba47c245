"""S60: inputs in other units than the base's. Per cohort of the benchmark, the level of each
user's inputs against the vendor's (common/engine/unlike.py: their root mean square over the
vendor record's input_rms); where leave one cohort out puts the bound (the geometric middle between
the farthest level of the other cohorts and the nearest units error, 100x); and each user's inputs
mis-scaled as a units error would scale them (images x0.01 and x255, audio x0.01 and x32768),
personalized by the default with the level check and without it (held-out labels only score).

    python -m simulations.input_level_study --fsdd ../shared/data/fsdd --out runs/input_level
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from pathlib import Path

import torch

from simulations.bench_tasks import COHORTS, STUDY_COHORTS

NEAREST_ERROR = 100.0  # the smallest units error the check is for: percent against fractions
SCALES = {"image": (0.01, 255.0), "audio": (0.01, 32768.0)}


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cohorts", default=",".join(COHORTS + STUDY_COHORTS),
                   help=f"comma-separated subset of: {', '.join(COHORTS + STUDY_COHORTS)}")
    p.add_argument("--fsdd", default=None, help="the FSDD folder (the fsdd cohorts)")
    p.add_argument("--users", type=int, default=0, help="at most this many users per cohort (0: all)")
    p.add_argument("--out", required=True)
    return p


def run_user(base, meta, u, kind: str) -> list[dict]:
    """The user's own level, then each units error's: base, the default without and with the check."""
    from common.engine import unlike as UL
    from common.engine.prune import fine_prune, personalized_model
    from common.model.train import accuracy
    from common.settings import PruneConfig

    rows = [{"user": u.user_id, "scale": 1.0, "level": UL.input_level(u.x, meta)}]
    for s in SCALES[kind]:
        row = {"user": u.user_id, "scale": s, "level": UL.input_level(u.x * s, meta),
               "base": accuracy(base, u.heldout_x * s, u.heldout_y)}
        for arm in ("without", "with"):
            real = UL.input_level
            if arm == "without":  # S60 off: no level is read, the correlation alone decides
                UL.input_level = lambda _x, _meta: None
            try:
                m = copy.deepcopy(base)
                r = fine_prune(m, u.x * s, PruneConfig(), base_meta=meta)
            finally:
                UL.input_level = real
            row[arm] = accuracy(personalized_model(m, r), u.heldout_x * s, u.heldout_y)
            row[f"sparsity_{arm}"], row[f"unlike_{arm}"] = r.sparsity, bool(r.adaptation.get("unlike_base"))
        rows.append(row)
    return rows


def farthest(levels: list[float]) -> float:
    """How far a cohort's levels reach from the vendor's, as a factor either way."""
    return max(max(v, 1 / v) for v in levels)


def loco(own: dict[str, float]) -> list[dict]:
    """Per cohort held out: the bound the others put (the geometric middle of their farthest level
    and NEAREST_ERROR) and whether the held-out cohort's users lie within it."""
    out = []
    for k, f in own.items():
        others = max((g for j, g in own.items() if j != k), default=1.0)
        bound = math.sqrt(others * NEAREST_ERROR)
        out.append({"held_out": k, "farthest": f, "bound": bound, "flagged": f > bound})
    return out


def summary(cohort: str, rows: list[dict]) -> list[dict]:
    out = []
    for s in sorted({r["scale"] for r in rows if r["scale"] != 1.0}):
        rs = [r for r in rows if r["scale"] == s]
        t = {"cohort": cohort, "scale": s, "users": len(rs), "flagged": sum(r["unlike_with"] for r in rs)}
        for k in ("base", "without", "with", "sparsity_without", "sparsity_with"):
            t[k] = statistics.mean(r[k] for r in rs)
        for arm in ("without", "with"):
            t[f"below_{arm}"] = sum(r[arm] - r["base"] < -0.02 for r in rs)
        out.append(t)
    return out


def to_markdown(folds: list[dict], table: list[dict], bound: float) -> str:
    lines = [f"Levels of the users' own inputs against the vendor's, and the bound each leave-one-cohort-out fold "
             f"puts (the geometric middle of the other cohorts' farthest level and {NEAREST_ERROR:g}x); the engine's "
             f"bound is {bound:g}x.", "", "| cohort held out | its farthest level | the fold's bound | flagged |",
             "|---|---|---|---|"]
    lines += [f"| {f['held_out']} | {f['farthest']:.2f}x | {f['bound']:.1f}x | {'yes' if f['flagged'] else 'no'} |"
              for f in folds]
    lines += ["", "The same users' inputs mis-scaled as a units error would: mean held-out accuracy, sparsity, users "
              "more than 2 points below their base; the default without the level check and with it.", "",
              "| cohort | scale | users | told (unlike) | base | without | with | sparsity without -> with | "
              "below base without -> with |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['cohort']} | x{t['scale']:g} | {t['users']} | {t['flagged']} | {t['base']:.3f} | "
              f"{t['without']:.3f} | {t['with']:.3f} | {t['sparsity_without']:.2f} -> {t['sparsity_with']:.2f} | "
              f"{t['below_without']} -> {t['below_with']} |" for t in table]
    return "\n".join(lines) + "\n"


def plot(own: dict[str, float], bound: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(own)
    ax.barh(names, [own[n] for n in names], color="tab:blue", label="farthest level of the cohort's own users")
    ax.axvline(bound, color="tab:red", label=f"bound {bound:g}x")
    ax.axvline(NEAREST_ERROR, color="tab:gray", ls="--", label=f"nearest units error {NEAREST_ERROR:g}x")
    ax.set_xscale("log")
    ax.set_xlabel("input level against the vendor's (factor, either way)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> dict:
    from common.data import readers as D
    from common.engine.unlike import LEVEL_BOUND
    from common.io import atomic_write_png, atomic_write_text
    from simulations.bench_tasks import cohort_users

    a = build_parser(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    cohorts = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    if bad := [c for c in cohorts if c not in COHORTS + STUDY_COHORTS]:
        raise SystemExit(f"unknown cohort '{bad[0]}' (choose from: {', '.join(COHORTS + STUDY_COHORTS)})")
    if any(c.startswith("fsdd") for c in cohorts) and not a.fsdd:
        raise SystemExit("the fsdd cohorts need --fsdd (the FSDD folder)")
    torch.set_num_threads(1)
    out = Path(a.out)
    (out / "bases").mkdir(parents=True, exist_ok=True)
    fsdd = D.load_fsdd(a.fsdd) if a.fsdd and any(c.startswith("fsdd") for c in cohorts) else None
    rows, table, own = {}, [], {}
    for cohort in cohorts:
        users = cohort_users(cohort, out, 0, fsdd if cohort.startswith("fsdd") else None, log=lambda *_: None)
        users = users[:a.users] if a.users else users
        kind = "audio" if cohort.startswith("fsdd") else "image"
        got = [r for base, meta, u in users for r in run_user(base, meta, u, kind)]
        rows[cohort] = got
        own[cohort] = farthest([r["level"] for r in got if r["scale"] == 1.0])
        table += summary(cohort, got)
        print(f"{cohort}: own levels within {own[cohort]:.2f}x; " + "; ".join(
            f"x{t['scale']:g} told {t['flagged']} of {t['users']}, {t['without']:.3f} -> {t['with']:.3f}, sparsity "
            f"{t['sparsity_without']:.2f} -> {t['sparsity_with']:.2f}" for t in table if t["cohort"] == cohort),
            flush=True)
    folds = loco(own)
    atomic_write_text(out / "input_level.json", json.dumps({"bound": LEVEL_BOUND, "loco": folds, "table": table,
                                                            "rows": rows}, indent=1))
    atomic_write_text(out / "input_level.md", to_markdown(folds, table, LEVEL_BOUND))
    atomic_write_png(out / "input_level.png", plot(own, LEVEL_BOUND))
    return {"loco": folds, "table": table}


if __name__ == "__main__":
    main()
