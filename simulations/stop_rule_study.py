"""Does a stop rule that also watches the probability the pruned model moves off the reference's
class stop before the held-out flips that argmax agreement on a probe of 32-128 samples cannot see
(S22)? Every benchmark user is personalized by the default, and by the default whose stop rule also
requires the mean drop of the reference class's probability on the probe to stay within tau, for
several tau; tau is then chosen leave-one-cohort-out (on every cohort but the one it is judged on).

    python -m simulations.stop_rule_study --fsdd ../shared/data/fsdd --out runs/stop_rule

Rows per cohort: mean held-out accuracy, sparsity and worst user against its base per arm, and the
leave-one-cohort-out choice (docs/personalization.md, S22).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine.stop import RULES, Agreement, register
from simulations import cohort_study as CS

TAUS = (0.005, 0.01, 0.02, 0.04)


def soft_drop(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over the probe of how much probability the pruned model took off the class the
    reference predicts (0 where it gave the class more)."""
    y = ref_logits.argmax(1, keepdim=True)
    p_ref = F.softmax(ref_logits.float(), 1).gather(1, y)
    p = F.softmax(logits.float(), 1).gather(1, y)
    return (p_ref - p).clamp_min(0).mean().item()


def _soft_rule(tau: float):
    class SoftAgreement(Agreement):
        """Agreement, and the reference class's probability dropped by at most tau on average: the
        value is the agreement where the drop is within tau, else minus the drop (fails)."""

        def value(self, logits, stats):
            drop = soft_drop(self.ref_logits, logits)
            return super().value(logits, stats) if drop <= tau else -drop

    return SoftAgreement


for _t in TAUS:
    if f"soft-{_t:g}" not in RULES:
        register(f"soft-{_t:g}")(_soft_rule(_t))

ARMS = {"default (agreement)": {}, **{f"soft {t:g}": {"stop_rule": f"soft-{t:g}"} for t in TAUS}}


def main(argv=None):
    CS.arms_study(argv, "python -m simulations.stop_rule_study", __doc__, ARMS, "stop_rule",
                  "The stop rule with the reference class's probability watched (S22)",
                  "The stop rule with and without the reference class's probability watched",
                  "Leave one cohort out (the arm the other cohorts score best: mean gain less every point a worst "
                  "user falls more than 2 points below its base):")


if __name__ == "__main__":
    main()
