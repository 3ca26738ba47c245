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

from simulations import cohort_study as CS

ARMS = {f"margin {k}": {"stop_margin": k} for k in (1, 2, 3)}
SPARSITY_FLOOR = 0.5


def main(argv=None):
    CS.arms_study(argv, "python -m simulations.stop_margin_study", __doc__, ARMS, "stop_margin",
                  "The stop's back-off, in schedule steps (S38)", "The stop's back-off in schedule steps",
                  f"Leave one cohort out (of the arms whose mean sparsity over the other cohorts is at least "
                  f"{SPARSITY_FLOOR}, the one they score best: mean gain less every point a worst user falls more "
                  "than 2 points below its base):", SPARSITY_FLOOR)


if __name__ == "__main__":
    main()
