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

from pathlib import Path

from simulations import cohort_study as CS

ARMS = {f"margin {k}": {"stop_margin": k} for k in (1, 2, 3)}
SPARSITY_FLOOR = 0.5


def to_markdown(table: list[dict], arms, folds: list[dict]) -> str:
    lines = CS.arms_table("The stop's back-off, in schedule steps (S38)", table, arms)
    if len(table) > 1:
        lines += CS.loco_lines(f"Leave one cohort out (of the arms whose mean sparsity over the other cohorts is at "
                               f"least {SPARSITY_FLOOR}, the one they score best: mean gain less every point a worst "
                               "user falls more than 2 points below its base):", folds)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = CS.parser("python -m simulations.stop_margin_study", __doc__)
    CS.add_arms(p, ARMS)
    a = p.parse_args(argv)
    arms = CS.chosen_arms(a.arms, ARMS)
    rows = CS.run(a, lambda c, users: CS.run_arms(c, users, arms))
    table = CS.summarize(rows, arms)
    folds = CS.loco(table, arms, SPARSITY_FLOOR) if len(table) > 1 else []
    CS.write(Path(a.out), "stop_margin", rows, table, to_markdown(table, arms, folds))
    CS.bar_plot(table, ["base", *arms], "The stop's back-off in schedule steps", Path(a.out) / "stop_margin.png",
                figsize=(9, 4), fontsize=7)


if __name__ == "__main__":
    main()
