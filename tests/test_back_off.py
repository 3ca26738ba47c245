"""Where the stop rule failed, the default keeps two schedule steps below the last that passed
(S38): the search keeps the sparsest step its own probe passed, so that verdict is optimistic (S30),
and one step below a cliff can still be past it (a ResNet18 few-class user at 64x64: one step back
lost 2 of 28 held-out images, two lost none). A step the search probed already, one further down,
is kept instead, for no probe pass of its own."""
import torch

from common.engine.prune import fine_prune
from common.engine.search import back_off, search_bound
from common.engine.select import schedule
from common.settings import PruneConfig


def test_the_default_backs_off_two_steps():
    assert PruneConfig().stop_margin == 2


def test_back_off_keeps_margin_steps_below_the_last_that_passed_or_a_probed_one_a_step_further():
    levels = [0.1 * (k + 1) for k in range(8)]

    def kept(last_ok, probed):
        mask, _, _ = back_off(last_ok, 2, {k: k for k in probed}, lambda level: round(level * 10) - 1, levels,
                              "dense", "failed", [])
        return mask

    assert kept(5, [5, 7]) == 3  # bisection probed 5 and 7: step 3 is selected afresh
    assert kept(5, [2, 5, 7]) == 2  # step 2 was probed (it passed): no probe pass to keep it
    assert kept(1, [1, 3]) == "dense"  # fewer than two steps below: nothing pruned


def test_where_the_rule_failed_a_real_user_keeps_at_least_two_steps_below_the_last_that_passed(
        digits, digits_split, digits_base):
    x = digits.x[torch.as_tensor(digits_split[1][:150])]
    cfg = PruneConfig(tolerance=0.0, evidence_samples=0, confirm="off")  # to 0.95, no flip: the rule fails
    r = fine_prune(digits_base, x, cfg)
    assert "past tolerance" in r.stop_reason, r.stop_reason
    levels = schedule(cfg.step, search_bound(cfg, len(x)))
    passed = max((h["sparsity"] for h in r.history if h["passed"]), default=None)
    if passed is None:
        assert r.sparsity == 0.0
        return
    i = min(range(len(levels)), key=lambda k: abs(levels[k] - passed))
    assert r.sparsity <= levels[i - 2] + 0.01 if i >= 2 else r.sparsity == 0.0
    assert i < 2 or r.sparsity >= levels[i - 3] - 0.01
