"""S54's study: where head auto's gate fires (nothing moved past the input side, whose move a class
mix of few classes explains: a pure label shift), the base's output layer with its prior moved
toward the class mix EM estimates (to the power tau) against the prototypes it replaced; each
cohort's users whole and cut to their first one and two classes, with the leave-one-cohort-out
choice of tau. Users the gate does not fire for get the same model under every tau arm.

    python -m simulations.prior_head_study --cohorts digits,resnet-few --seed 0 --out runs/prior_head
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from simulations import cohort_study as CS

# an arm: a PruneConfig change, and "prior_power" for the label-shift head's tau
ARMS = {
    "prototypes": {"head": "prototypes"},
    "tau 1": {"prior_power": 1.0},
    "tau 0.5": {"prior_power": 0.5},
    "tau 0.25": {"prior_power": 0.25},
    "tau 0.1": {"prior_power": 0.1},
}


@contextlib.contextmanager
def prior_power(change: dict):
    """Takes "prior_power" out of an arm's `change` and sets the label-shift head's tau for the
    arm's run, restoring it after."""
    from common.engine import heads as H

    tau, before = change.pop("prior_power", None), H.PRIOR_POWER
    if tau is not None:
        H.PRIOR_POWER = float(tau)
    try:
        yield
    finally:
        H.PRIOR_POWER = before


def with_cuts(users) -> list:
    """Each user whole and cut to its first one and two classes (where that leaves enough)."""
    from simulations.few_class_study import held

    return [(base, meta, v) for base, meta, u in users for _, v in held(u)]


def main(argv=None) -> list[dict]:
    p = CS.parser("python -m simulations.prior_head_study", __doc__)
    CS.add_arms(p, ARMS)
    a = p.parse_args(argv)
    arms = CS.chosen_arms(a.arms, ARMS)
    rows = CS.run(a, lambda c, users: CS.run_arms(c, with_cuts(users), arms, setup=prior_power))
    table = CS.summarize(rows, arms)
    lines = CS.arms_table("The label-shift head's tau against prototypes", table, arms)
    if len(table) > 1:
        lines += CS.loco_lines("Leave one cohort out (the thresholds' objective):", CS.loco(table, arms))
    CS.write(Path(a.out), "prior_head", rows, table, "\n".join(lines) + "\n")
    CS.bar_plot(table, ["base", *arms], "S54: the label-shift head's tau", Path(a.out) / "prior_head.png",
                figsize=(9, 4), fontsize=7)
    return rows


if __name__ == "__main__":
    main()
