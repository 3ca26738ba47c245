"""Where the stop rule failed, the default keeps two schedule steps below the last that passed
(S38): the search keeps the sparsest step its own probe passed, so that verdict is optimistic (S30),
and one step below a cliff can still be past it (a ResNet18 few-class user at 64x64: one step back
lost 2 of 28 held-out images, two lost none). A step the search probed already, one further down,
is kept instead, for no probe pass of its own."""
import copy

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


def test_no_back_off_at_the_devices_own_bound_and_at_a_bound_a_prior_raised_never_below_its_own():
    """P8: where a prior's evidence raised the search bound past the device's own, the steps past its
    own passed only its probe; the search backs off there as where the rule fails, but never below
    the device's own bound, which its own data justify (and which is a step of the schedule)."""
    from common.engine.search import own_step, prior_margin

    def margin(levels, last_ok, m, own_bound):
        return prior_margin(last_ok, m, own_step(levels, own_bound))

    own = [0.1, 0.19, 0.271, 0.344, 0.41]  # the device's own schedule: bound 0.41
    assert margin(own, 4, 2, 0.41) == 0 and margin(own, 4, 2, None) == 0
    raised = [0.1, 0.19, 0.271, 0.33, 0.344, 0.41, 0.469, 0.515]  # a prior raised 0.33 to 0.515
    assert margin(raised, 7, 2, 0.33) == 2  # two steps back: 0.41, still past its own bound
    assert margin(raised, 4, 2, 0.33) == 1  # one step past its own bound: back to it
    assert margin(raised, 3, 2, 0.33) == 0  # at its own bound


def test_a_prior_that_raises_the_bound_never_leaves_a_device_sparser_than_two_steps_short_of_it(
        digits, digits_split, digits_base):
    """A prior worth many samples: the device searches past its own bound, and where its probe
    passes every step there, it keeps a step at least two below the raised bound, and never one below
    its own bound."""
    from common.engine.prior import Prior

    x = digits.x[torch.as_tensor(digits_split[1][:40])]
    alone = fine_prune(copy.deepcopy(digits_base), x, PruneConfig())
    assert "reached the search bound" in alone.stop_reason, alone.stop_reason
    shares = {k: (~v).float() for k, v in alone.mask.layers.items()}  # everyone pruned as it did
    r = fine_prune(copy.deepcopy(digits_base), x, PruneConfig(), prior=Prior(shares, samples=1000.0, voters=10))
    own = search_bound(PruneConfig(), len(x))
    assert r.sparsity >= alone.sparsity - 0.01 and r.sparsity >= own - 0.01
    assert "reached the search bound" in r.stop_reason and "backed off" in r.stop_reason, r.stop_reason
    assert r.sparsity < max(h["sparsity"] for h in r.history if h["passed"]) - 0.01  # not the raised bound
