"""Does pruning lose less when each pruned connection's mean contribution is put back (S19,
`compensate`), when the kept mask's BatchNorm statistics are paired estimates (S23: the statistics
pass's, moved by what the mask changes on the probe), and when candidates keep the input side's
statistics from the statistics pass instead of re-estimating them on the probe (S20, not the
default)? Every benchmark user is personalized by the default (S19 and S23) and its variants, at
the label-free stop and at a fixed 0.7, beside the same adaptation with nothing pruned (what
pruning costs), and scored on held-out labels.

    python -m simulations.compensation_study --fsdd ../shared/data/fsdd --out runs/compensation

Rows per cohort: mean accuracy and sparsity per arm, and each arm's worst user against its base
(docs/personalization.md, S19, S20 and S23).
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

from common.engine import probe as PR
from common.engine.prune import fine_prune
from common.model.train import accuracy
from common.settings import PruneConfig
from simulations import cohort_study as CS

# arm -> the PruneConfig fields it changes from the default ("_keep": candidates keep the input
# side's statistics from the statistics pass, probe.KEEP_INPUT_SIDE, S20; paired_bn False: the kept
# mask's statistics are the probe's own, not paired estimates, S23)
ARMS = {
    "unpruned": {"target_sparsity": 0.0},
    "default (S19 + S23)": {},
    "neither (the previous default)": {"compensate": "off", "paired_bn": False},
    "S19 only": {"paired_bn": False},
    "S23 only": {"compensate": "off"},
    "input side kept (S20)": {"_keep": True, "paired_bn": False},
    "0.7": {"target_sparsity": 0.7},
    "0.7 without compensate": {"target_sparsity": 0.7, "compensate": "off"},
    "0.7 input side kept": {"target_sparsity": 0.7, "_keep": True},
}


def run_cohort(name: str, users, arms: dict) -> list[dict]:
    rows = []
    for base, meta, u in users:
        row = {"cohort": name, "user": u.user_id, "n": len(u.x), "base": accuracy(base, u.heldout_x, u.heldout_y)}
        for arm, change in arms.items():
            model = copy.deepcopy(base)
            change = dict(change)
            PR.KEEP_INPUT_SIDE = change.pop("_keep", False)
            try:
                res = fine_prune(model, u.x, PruneConfig(**change), base_meta=meta)
            finally:
                PR.KEEP_INPUT_SIDE = False
            row[arm] = accuracy(model, u.heldout_x, u.heldout_y)
            row[f"{arm} sparsity"] = round(res.sparsity, 4)
            row[f"{arm} bn"] = res.adaptation.get("bn")
        rows.append(row)
        print(f"  {name} {u.user_id} (n={row['n']}): base {row['base']:.3f}, "
              + ", ".join(f"{a} {row[a]:.3f}@{row[a + ' sparsity']:.2f}" for a in arms), flush=True)
    return rows


def summarize(rows: list[dict], arms) -> list[dict]:
    out = []
    for c in dict.fromkeys(r["cohort"] for r in rows):
        sel = [r for r in rows if r["cohort"] == c]
        s = {"cohort": c, "users": len(sel), "base": statistics.mean(r["base"] for r in sel)}
        for a in arms:
            s[a] = statistics.mean(r[a] for r in sel)
            s[f"{a} sparsity"] = statistics.mean(r[f"{a} sparsity"] for r in sel)
            s[f"{a} worst"] = min(r[a] - r["base"] for r in sel)
        out.append(s)
    return out


def to_markdown(table: list[dict], arms) -> str:
    lines = ["# Mean-preserving pruning (S19), paired BatchNorm statistics (S23) and the input side kept from the "
             "statistics pass (S20): mean held-out accuracy (sparsity; worst user vs its base)", "",
             "| cohort | users | base | " + " | ".join(arms) + " |", "|---|---|---|" + "---|" * len(arms)]
    for s in table:
        cells = [f"{s[a]:.3f} ({s[a + ' sparsity']:.2f}; {s[a + ' worst']:+.3f})" for a in arms]
        lines.append(f"| {s['cohort']} | {s['users']} | {s['base']:.3f} | " + " | ".join(cells) + " |")
    if len(table) > 1:
        cells = [f"{statistics.mean(s[a] for s in table):.3f} ({statistics.mean(s[a + ' sparsity'] for s in table):.2f}; "
                 f"{min(s[a + ' worst'] for s in table):+.3f})" for a in arms]
        lines.append(f"| mean of cohorts | | {statistics.mean(s['base'] for s in table):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = CS.parser("python -m simulations.compensation_study", __doc__)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of: {', '.join(ARMS)}")
    a = p.parse_args(argv)
    names = [k.strip() for k in a.arms.split(",") if k.strip()]
    if bad := [k for k in names if k not in ARMS]:
        raise SystemExit(f"unknown arm '{bad[0]}' (choose from: {', '.join(ARMS)})")
    arms = {k: ARMS[k] for k in names}
    rows = CS.run(a, lambda c, users: run_cohort(c, users, arms))
    table = summarize(rows, arms)
    CS.write(Path(a.out), "compensation", rows, table, to_markdown(table, arms))
    CS.bar_plot(table, ["base", *arms], "Pruning with and without the pruned connections' mean put back",
                Path(a.out) / "compensation.png", figsize=(9, 4), fontsize=7)


if __name__ == "__main__":
    main()
