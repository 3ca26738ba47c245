"""How many schedule steps should the stop back off below the last that passed (S38)? The search
keeps the sparsest step its own probe passed, so that verdict is optimistic (S30); one step below a
cliff (S9) can still be past it. Every benchmark user is personalized by the default at stop-margin
1, 2 and 3; the margin is then chosen leave-one-cohort-out among those whose mean sparsity over the
other cohorts stays at least 0.5 (the issue's floor).

    python -m simulations.stop_margin_study --fsdd ../shared/data/fsdd --out runs/stop_margin
    python -m simulations.stop_margin_study --seed 1 --cohorts digits-style,resnet-style --out runs/stop_margin1

Rows per cohort: mean held-out accuracy, sparsity and worst user against its base per arm, and the
leave-one-cohort-out choice (docs/personalization.md, S38).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from simulations import cohort_study as CS
from simulations.stop_rule_study import objective

ARMS = {f"margin {k}": {"stop_margin": k} for k in (1, 2, 3)}
SPARSITY_FLOOR = 0.5


def loco(table: list[dict], arms) -> list[dict]:
    """Per held-out cohort: of the arms whose mean sparsity over the other cohorts reaches the floor,
    the one they score best (mean objective; ties: the sparser), and what it gives the held-out one."""
    out = []
    for held in table:
        rest = [s for s in table if s is not held]
        ok = [a for a in arms if statistics.mean(s[f"{a} sparsity"] for s in rest) >= SPARSITY_FLOOR] or list(arms)
        pick = max(ok, key=lambda a: (round(statistics.mean(objective(s, a) for s in rest), 6),
                                      statistics.mean(s[f"{a} sparsity"] for s in rest)))
        out.append({"held out": held["cohort"], "chosen": pick, "acc": held[pick],
                    "sparsity": held[f"{pick} sparsity"], "worst": held[f"{pick} worst"]})
    return out


def to_markdown(table: list[dict], arms, folds: list[dict]) -> str:
    lines = CS.arms_table("The stop's back-off, in schedule steps (S38)", table, arms)
    if len(table) > 1:
        lines += ["", f"Leave one cohort out (of the arms whose mean sparsity over the other cohorts is at least "
                  f"{SPARSITY_FLOOR}, the one they score best: mean gain less every point a worst user falls more "
                  "than 2 points below its base):", "",
                  "| held out | chosen | acc | sparsity | worst user |", "|---|---|---|---|---|"]
        lines += [f"| {f['held out']} | {f['chosen']} | {f['acc']:.3f} | {f['sparsity']:.2f} | {f['worst']:+.3f} |"
                  for f in folds]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = CS.parser("python -m simulations.stop_margin_study", __doc__)
    CS.add_arms(p, ARMS)
    a = p.parse_args(argv)
    arms = CS.chosen_arms(a.arms, ARMS)
    rows = CS.run(a, lambda c, users: CS.run_arms(c, users, arms))
    table = CS.summarize(rows, arms)
    folds = loco(table, arms) if len(table) > 1 else []
    CS.write(Path(a.out), "stop_margin", rows, table, to_markdown(table, arms, folds))
    CS.bar_plot(table, ["base", *arms], "The stop's back-off in schedule steps", Path(a.out) / "stop_margin.png",
                figsize=(9, 4), fontsize=7)


if __name__ == "__main__":
    main()
