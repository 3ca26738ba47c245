"""Does pruning lose less when each pruned connection's mean contribution is put back (S19,
`compensate`), when the kept mask's BatchNorm statistics are paired estimates (S23: the statistics
pass's, moved by what the mask changes on the probe), and when candidates keep the input side's
statistics from the statistics pass instead of re-estimating them on the probe (S20, not the
default)? Every benchmark user is personalized by the default (S19 and S23) and its variants, at
the label-free stop and at a fixed 0.7 (with and without paired statistics there, S25), beside the
same adaptation with nothing pruned (what pruning costs; since S25 with the statistics pass's own
statistics), and scored on held-out labels.

    python -m simulations.compensation_study --fsdd ../shared/data/fsdd --out runs/compensation

Rows per cohort: mean accuracy and sparsity per arm, and each arm's worst user against its base
(docs/personalization.md, S19, S20, S23 and S25).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from common.engine import probe as PR
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
    "0.7 probe's own statistics": {"target_sparsity": 0.7, "paired_bn": False},
    "0.7 without compensate": {"target_sparsity": 0.7, "compensate": "off"},
    "0.7 input side kept": {"target_sparsity": 0.7, "_keep": True},
}


@contextlib.contextmanager
def _keep_input_side(change: dict):
    """An arm's "_keep": candidates keep the input side's statistics (probe.KEEP_INPUT_SIDE, S20)."""
    PR.KEEP_INPUT_SIDE = change.pop("_keep", False)
    try:
        yield
    finally:
        PR.KEEP_INPUT_SIDE = False


def to_markdown(table: list[dict], arms) -> str:
    return "\n".join(CS.arms_table("Mean-preserving pruning (S19), paired BatchNorm statistics (S23) and the input "
                                   "side kept from the statistics pass (S20)", table, arms)) + "\n"


def main(argv=None):
    p = CS.parser("python -m simulations.compensation_study", __doc__)
    CS.add_arms(p, ARMS)
    a = p.parse_args(argv)
    arms = CS.chosen_arms(a.arms, ARMS)
    rows = CS.run(a, lambda c, users: CS.run_arms(c, users, arms, _keep_input_side))
    table = CS.summarize(rows, arms)
    CS.write(Path(a.out), "compensation", rows, table, to_markdown(table, arms))
    CS.bar_plot(table, ["base", *arms], "Pruning with and without the pruned connections' mean put back",
                Path(a.out) / "compensation.png", figsize=(9, 4), fontsize=7)


if __name__ == "__main__":
    main()
