"""Paired BatchNorm statistics (S23): the kept mask's statistics are the statistics pass's (all of
the user's data) moved by what the mask changes on the probe, so the probe's sampling error
cancels; the unpruned reference's probe statistics come free from the statistics pass where the
probe is its first batch."""
import copy

import pytest
import torch
import torch.nn as nn

from common.engine import probe as PR
from common.engine.bn import bn_layers, recalibrate_bn
from common.engine.prune import fine_prune
from common.model.mask import Mask
from common.settings import PruneConfig


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 64, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _base_and_data(seed: int, n: int = 400):
    torch.manual_seed(seed)
    base = _BNNet()
    with torch.no_grad():  # a base trained elsewhere: statistics of other data than the user's
        recalibrate_bn(base, torch.randn(256, 1, 8, 8), 256)
    x = torch.randn(n, 1, 8, 8) * 1.5 + 0.4  # the user's data: shifted and wider
    return base.eval(), x


@pytest.mark.parametrize("mode", ["full", "stem"])
def test_the_folded_reference_statistics_are_what_a_probe_pass_of_the_unpruned_model_estimates(mode):
    base, x = _base_and_data(0)
    seen = []
    real = PR.Probe.folded_reference

    def spy(self, first_bn):
        real(self, first_bn)
        folded = self.ref_bn
        self.reference(Mask.dense(self.model))  # the pass the fold saves, run here to compare
        seen.append((folded, self.ref_bn))
        self.ref_bn = folded

    PR.Probe.folded_reference = spy
    try:
        fine_prune(copy.deepcopy(base), x, PruneConfig(bn_adapt=mode, head="linear"))
    finally:
        PR.Probe.folded_reference = real
    folded, passed = seen[0]
    assert folded is not None and len(folded) == 4  # mean and variance of bn1 and bn2
    for k in folded:
        assert torch.allclose(folded[k], passed[k], rtol=1e-5, atol=1e-6), k


def _kept_error(base, x, paired: bool, **change):
    """The kept model's BatchNorm statistics against those the same pruned model has on all of
    the user's data (squared mean error in units of the true variance, summed over channels)."""
    model = copy.deepcopy(base)
    res = fine_prune(model, x, PruneConfig(bn_adapt="full", head="linear", paired_bn=paired, **change))
    truth = copy.deepcopy(base)
    res.mask.apply(truth)
    recalibrate_bn(truth, x, 256)
    err = sum(float(((a.running_mean - b.running_mean) ** 2 / b.running_var).sum())
              for a, b in zip(bn_layers(model), bn_layers(truth)))
    return err, res.sparsity


@pytest.mark.parametrize("target", [None, 0.5])
def test_paired_statistics_are_closer_than_the_probes_own_to_the_kept_models_on_all_the_data(target):
    """At the label-free stop and at a fixed target (whose reference statistics come from the
    statistics pass too: the probe is put first though no rule reads the reference's logits)."""
    wins = 0
    for seed in range(3):
        base, x = _base_and_data(seed)
        paired, s1 = _kept_error(base, x, True, target_sparsity=target)
        own, s2 = _kept_error(base, x, False, target_sparsity=target)
        assert s1 == s2 > 0  # the same mask: pairing changes only the statistics it is kept with
        wins += paired < own
    assert wins == 3


def test_a_user_whose_mask_keeps_everything_keeps_the_statistics_pass_statistics():
    """Nothing pruned: the paired estimate of the unpruned model is the statistics pass's itself."""
    from common.engine.stop import RULES, StopRule, register

    if "test-always-fails" not in RULES:
        @register("test-always-fails")
        class _Fails(StopRule):
            def value(self, logits, stats):
                return 0.0

            def passes(self, v):
                return False

    base, x = _base_and_data(1)
    model = copy.deepcopy(base)
    res = fine_prune(model, x, PruneConfig(bn_adapt="full", head="linear", stop_rule="test-always-fails"))
    assert res.sparsity == 0 and "nothing pruned" in res.stop_reason
    ref = copy.deepcopy(base)  # the statistics pass: the probe's batch first, then the rest
    recalibrate_bn(ref, x, 256, first=PR.probe_pick(PruneConfig(), len(x)))
    for a, b in zip(bn_layers(model), bn_layers(ref)):
        # the same pass up to float rounding (the engine runs it in channels_last)
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-4)


@pytest.mark.parametrize("bn_adapt", ["full", "stem"])
def test_a_target_of_zero_keeps_the_statistics_of_all_the_users_data_not_the_probes(bn_adapt):
    """Nothing cut at a fixed target of 0: the model is the adaptation alone, its BatchNorm
    statistics the statistics pass's over all of the user's data (once, a probe pass's: a quarter
    of the data, the probe's sampling error in the kept model)."""
    base, x = _base_and_data(2)
    model = copy.deepcopy(base)
    res = fine_prune(model, x, PruneConfig(bn_adapt=bn_adapt, head="linear", target_sparsity=0.0))
    assert res.sparsity == 0
    ref, probe_only = copy.deepcopy(base), copy.deepcopy(base)
    if bn_adapt == "full":
        recalibrate_bn(ref, x, 256)
        recalibrate_bn(probe_only, x[PR.probe_pick(PruneConfig(), len(x))], 256)
        pairs = zip(bn_layers(model), bn_layers(ref), bn_layers(probe_only))
    else:  # the input side's statistics: its first layer follows the user, over all of the data
        pairs = zip(bn_layers(model)[:1], bn_layers(ref)[:1], bn_layers(probe_only)[:1])
    for kept, whole, probe in pairs:
        if bn_adapt == "full":
            assert torch.allclose(kept.running_mean, whole.running_mean, atol=1e-5)
            assert torch.allclose(kept.running_var, whole.running_var, rtol=1e-4)
            assert not torch.allclose(kept.running_mean, probe.running_mean, atol=1e-3)
        else:
            assert not torch.equal(kept.running_mean, base.bn1.running_mean)  # it followed the user
    assert res.forward_samples == len(x)  # one statistics pass, no probe pass
