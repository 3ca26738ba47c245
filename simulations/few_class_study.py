"""Extreme label shift on the bench's networks: each bench user cut to the first k classes it holds
(k = 1, 2; its unlabeled and held-out samples of those classes only), personalized by the default,
against its base and T3A on the frozen base. Accuracy is scored on the held-out samples and, as a
second and larger reading, on the user's own samples (their labels score only). One JSON line per
user and k, and a table per cohort: where the default's BatchNorm check reads a class mix as a
shift, and whether class-mix recalibration (S43, docs/personalization.md) protects those users.

    python -m simulations.few_class_study digits,resnet-few,fsdd-loso,fsdd-seen \
        --fsdd ../shared/data/fsdd --out runs/few_class
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from common.cli import first_sentence
from common.io import atomic_write_text
from simulations.cohorts import BenchUser


def cut(u: BenchUser, k: int) -> BenchUser | None:
    """The user holding only the first k of its classes (by label order), or None where that
    leaves fewer than 4 unlabeled or 2 held-out samples."""
    keep = torch.unique(u.y)[:k]
    inside, held = torch.isin(u.y, keep), torch.isin(u.heldout_y, keep)
    if int(inside.sum()) < 4 or int(held.sum()) < 2:
        return None
    return BenchUser(f"{u.user_id}|{k}", u.x[inside], u.y[inside], u.heldout_x[held], u.heldout_y[held])


def held(u: BenchUser, ks=("all", 1, 2)) -> list[tuple]:
    """(classes held, the user) for each of `ks`: the user whole ("all") or cut to its first k
    classes, where the cut leaves enough samples (cut)."""
    pairs = [(k, u if k == "all" else cut(u, k)) for k in ks]
    return [(k, v) for k, v in pairs if v is not None]


def measure(base, meta, u: BenchUser) -> dict:
    from common.engine.prune import fine_prune, personalized_model
    from common.model.train import accuracy
    from common.settings import PruneConfig
    from simulations import baselines as BL

    m = copy.deepcopy(base)
    r = fine_prune(m, u.x, PruneConfig(), base_meta=meta)
    pm = personalized_model(m, r)
    t3a = BL.t3a(base, u.x)
    with torch.no_grad():
        t = [float((t3a.predict(a).argmax(1) == b).float().mean()) for a, b in ((u.heldout_x, u.heldout_y), (u.x, u.y))]
    return {"user": u.user_id, "samples": len(u.x), "heldout": len(u.heldout_y),
            "base": [accuracy(base, u.heldout_x, u.heldout_y), accuracy(base, u.x, u.y)],
            "default": [accuracy(pm, u.heldout_x, u.heldout_y), accuracy(pm, u.x, u.y)], "t3a": t,
            "sparsity": round(r.sparsity, 4), "bn": r.adaptation.get("bn"),
            "deep_shift": r.adaptation.get("deep_shift")}


def table(rows: list[dict]) -> str:
    lines = ["| cohort | classes held | users | bn full / class-mix | deep shift (mean) | base: held-out / own | "
             "default | users > 2 below base: held-out / own | worst: held-out / own | T3A |", "|---" * 10 + "|"]
    for c, k in sorted({(r["cohort"], r["k"]) for r in rows}):
        sel = [r for r in rows if (r["cohort"], r["k"]) == (c, k)]
        mean = [statistics.mean(r[a][i] for r in sel) for a in ("base", "default", "t3a") for i in (0, 1)]
        below = [sum(r["default"][i] - r["base"][i] < -0.02 for r in sel) for i in (0, 1)]
        worst = [min(r["default"][i] - r["base"][i] for r in sel) for i in (0, 1)]
        shift = [r["deep_shift"] for r in sel if r["deep_shift"] is not None]
        modes = [sum(r["bn"] == m for r in sel) for m in ("full", "class-mix")]
        lines.append(f"| {c} | {k} | {len(sel)} | {modes[0]} / {modes[1]} | "
                     f"{statistics.mean(shift) if shift else float('nan'):.3f} | {mean[0]:.3f} / {mean[1]:.3f} | "
                     f"{mean[2]:.3f} / {mean[3]:.3f} | {below[0]} / {below[1]} | {worst[0]:+.2f} / {worst[1]:+.2f} | "
                     f"{mean[4]:.3f} / {mean[5]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from common.data import readers as D
    from simulations.bench_tasks import COHORTS, cohort_users

    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("cohorts", help="bench cohorts, comma-separated")
    p.add_argument("--fsdd", default="", help="FSDD directory (the speech cohorts)")
    p.add_argument("--out", required=True, help="output folder (bases cached under OUT/bases)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cohorts = [c for c in a.cohorts.split(",") if c]
    bad = [c for c in cohorts if c not in COHORTS or (c.startswith("fsdd") and not a.fsdd)]
    if bad:
        sys.exit(f"few_class_study: unknown cohort or speech without --fsdd: {', '.join(bad)}")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in cohorts:
        ds = D.load_fsdd(a.fsdd) if c.startswith("fsdd") else None
        for base, meta, u in cohort_users(c, out, a.seed, ds, log=lambda *x: None):
            for k, v in held(u, (1, 2)):
                rows.append({"cohort": c, "k": k, **measure(base, meta, v)})
                print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(out / "few_class.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "few_class.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
