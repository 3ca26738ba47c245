"""Label-free stop rules (common/engine/stop.py): each judges a pruned model's outputs against the
unpruned reference on the probe, passes within its tolerance and fails beyond it, and the registry
refuses a rule it does not know."""
import pytest
import torch

from common.engine.stop import RULES, make_rule


def _logits(classes: list[int], confidence: float = 4.0) -> torch.Tensor:
    out = torch.zeros(len(classes), 10)
    out[torch.arange(len(classes)), torch.tensor(classes)] = confidence
    return out


REF = _logits([i % 10 for i in range(50)])


def test_agreement_is_the_share_of_the_probe_predicted_as_the_reference_predicts():
    rule = make_rule("agreement", 0.02, REF, None)
    same, one_off = REF.clone(), REF.clone()
    one_off[0] = _logits([3])[0]  # sample 0: reference says 0, this says 3
    assert rule.value(same, None) == 1.0 and rule.passes(rule.value(same, None))
    assert rule.value(one_off, None) == pytest.approx(0.98) and rule.passes(0.98)
    two_off = one_off.clone()
    two_off[1] = _logits([5])[0]
    assert not rule.passes(rule.value(two_off, None))  # 0.96 < 1 - 0.02


def test_confidence_and_entropy_fail_when_the_pruned_model_grows_unsure():
    unsure = _logits([i % 10 for i in range(50)], confidence=0.5)
    for name in ("confidence", "entropy"):
        rule = make_rule(name, 0.05, REF, None)
        assert rule.passes(rule.value(REF.clone(), None)), name
        assert not rule.passes(rule.value(unsure, None)), name


def test_none_always_passes_and_an_unknown_rule_is_refused():
    rule = make_rule("none", 0.0, REF, None)
    assert rule.passes(rule.value(-REF, None))
    with pytest.raises(ValueError, match="unknown stop rule 'vibes'"):
        make_rule("vibes", 0.02, REF, None)


def test_each_rule_says_whether_it_needs_activation_statistics():
    assert RULES["drift"].needs_stats and not RULES["agreement"].needs_stats
