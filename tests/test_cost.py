"""What the engine's passes cost, and that the speed work changed no result: the engine's report
of where its time went, the stop rule's reference taken from the statistics pass (no probe pass
of its own), no recalibration pass at the end when nothing but the restriction goes, batches
weighed by their samples, the model handed back in its own layout. (The measured ratios are the
benchmark's, not tests': speed is never asserted here.)"""
import copy
from pathlib import Path

import pytest
import torch

from common.data import partition as PT
from common.engine.bn import recalibrate_bn
from common.engine.probe import probe_pick, probe_samples
from common.engine.prune import fine_prune
from common.engine.restrict import apply_restriction
from common.settings import PruneConfig
from simulations.bench_report import PREVIOUS_DEFAULT

ROOT = Path(__file__).resolve().parents[1]


def _user(digits, pool, classes):
    idx = [i for i in pool if int(digits.y[i]) in classes]
    return PT.make_users(digits, [idx], 0.3, seed=0)[0]


def test_the_engine_reports_where_its_time_went(digits, digits_split, digits_base):
    user = _user(digits, digits_split[1], (0, 3, 8))
    res = fine_prune(copy.deepcopy(digits_base), user.unlabeled, PruneConfig())
    assert {"statistics pass", "probe passes", "selection", "mask apply"} <= set(res.phases)
    assert "reference probe" not in res.phases  # the statistics pass gave it (one batch, or the probe first)
    assert all(res.phases[p] > 0 for p in ("statistics pass", "probe passes", "selection"))
    # the phases are laps of one clock: together they are the whole call, nothing counted twice
    assert sum(res.phases.values()) == pytest.approx(res.seconds, rel=0.05, abs=2e-3)
    fixed = fine_prune(copy.deepcopy(digits_base), user.unlabeled, PruneConfig(target_sparsity=0.5))
    assert "probe passes" not in fixed.phases and "final recalibration" in fixed.phases


def test_when_nothing_may_go_the_kept_model_has_the_statistics_pass_batchnorm(digits, digits_split, digits_base):
    """When the rule accepts no step, only the restricted output rows go: they feed no
    BatchNorm, so the kept model keeps the statistics the statistics pass estimated on all of the
    user's data, and no recalibration pass follows."""
    user = _user(digits, digits_split[1], (0, 3, 8))
    n = len(user.unlabeled)
    # one 90% step: no digits model keeps every answer (the engine of before the safe default)
    cfg = PruneConfig(**PREVIOUS_DEFAULT, tolerance=0.0, step=0.9, max_sparsity=0.95)
    res = fine_prune(copy.deepcopy(digits_base), user.unlabeled, cfg)
    assert res.restricted_classes is not None and not any(h["passed"] for h in res.history)
    assert res.mask == apply_restriction(digits_base, res.mask.__class__.dense(digits_base), res.restricted_classes)
    assert res.forward_samples == n + probe_samples(cfg, n) * len(res.history)
    assert "final recalibration" not in res.phases
    full = copy.deepcopy(digits_base)
    recalibrate_bn(full, user.unlabeled, 256)
    kept = copy.deepcopy(digits_base)
    fine_prune(kept, user.unlabeled, cfg)
    probe_only = copy.deepcopy(digits_base)
    recalibrate_bn(probe_only, user.unlabeled[probe_pick(cfg, n)], 256)
    # the means of all samples (bn2's input was normalized per batch: probe, then the rest)
    for name, tol in (("bn1", 1e-6), ("bn2", 1e-3)):
        assert torch.allclose(getattr(kept, name).running_mean, getattr(full, name).running_mean, atol=tol)
        assert not torch.allclose(getattr(probe_only, name).running_mean, getattr(full, name).running_mean, atol=tol)
        # the variances average the two batches': the spread between the batch means is left
        # out, as in any multi-batch recalibration
        assert torch.allclose(getattr(kept, name).running_var, getattr(full, name).running_var, rtol=0.05)


@pytest.mark.parametrize("batch_size", [256, 16])
def test_the_reference_from_the_statistics_pass_is_what_a_probe_pass_outputs(digits, digits_split, digits_base,
                                                                           batch_size):
    """The statistics pass takes the probe first, in batches of its own: in train mode each batch
    is normalized by its own statistics, so those logits are, bit for bit, what a recalibrating
    probe pass of the unpruned model outputs, the reference the stop rule needs; the other
    samples' logits come back in their places."""
    x = _user(digits, digits_split[1], (0, 3, 8)).unlabeled
    pick = probe_pick(PruneConfig(), len(x))
    assert 0 < len(pick) < len(x)
    lg, _ = recalibrate_bn(copy.deepcopy(digits_base), x, batch_size, hooks=False, first=pick)
    probe_pass, _ = recalibrate_bn(copy.deepcopy(digits_base), x[pick], batch_size)
    assert torch.equal(lg[pick], probe_pass)
    rest = torch.ones(len(x), dtype=torch.bool)
    rest[pick] = False
    others, _ = recalibrate_bn(copy.deepcopy(digits_base), x[rest], batch_size)
    assert torch.equal(lg[rest], others)


def test_a_rule_that_reads_statistics_still_gets_a_reference_probe(digits, digits_split, digits_base):
    user = _user(digits, digits_split[1], (0, 3, 8))
    n = len(user.unlabeled)
    cfg = PruneConfig(**PREVIOUS_DEFAULT, stop_rule="drift", tolerance=0.05)
    res = fine_prune(copy.deepcopy(digits_base), user.unlabeled, cfg)
    assert "reference probe" in res.phases
    assert res.forward_samples == n + probe_samples(cfg, n) * (1 + len(res.history))


def test_recalibration_weighs_batches_by_their_samples(digits, digits_base):
    """The running statistics are those of all the samples, however the batches fall: 70 samples
    in batches of 64 and 6 give the mean of all 70 (PyTorch's cumulative average, momentum None,
    weighs the 6 as much as the 64)."""
    x = digits.x[:70]
    model = copy.deepcopy(digits_base)
    recalibrate_bn(model, x, 64)
    with torch.no_grad():
        h = digits_base.conv1(x)
        by_batch = (h[:64].mean((0, 2, 3)) + h[64:].mean((0, 2, 3))) / 2
    assert torch.allclose(model.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(by_batch, h.mean((0, 2, 3)), atol=1e-3)  # the equal weighting is measurably off


def test_a_user_one_sample_past_the_probe_still_personalizes():
    """33 images, a probe of 32: taking the probe first would leave the 33rd in a batch of its
    own, which BatchNorm cannot normalize over ResNet18's 1x1 maps at 32x32; the engine then
    takes a reference probe instead."""
    from common.model.architectures import build_model

    torch.manual_seed(0)
    x = torch.randn(33, 3, 32, 32)
    res = fine_prune(build_model("resnet18", num_classes=10), x, PruneConfig(**PREVIOUS_DEFAULT))
    assert "reference probe" in res.phases and res.forward_samples == 33 + 32 * (1 + len(res.history))
    # the default, on a base without the vendor's record: the input side only, from the start, with
    # no check to pay for
    res = fine_prune(build_model("resnet18", num_classes=10), x, PruneConfig())
    assert res.adaptation["bn"] == "stem" and not res.adaptation["vendor_record"]
    # a step kept that the search never probed gets statistics of its own: one probe pass (S29, S38)
    kept_unprobed = all(abs(h["sparsity"] - res.sparsity) > 1e-3 for h in res.history)
    assert "reference probe" in res.phases
    assert res.forward_samples == 33 + 32 * (1 + len(res.history) + kept_unprobed)


def test_the_engine_hands_the_model_back_in_its_own_layout(digits, digits_split, digits_base):
    """Passes run in channels_last on the CPU; the personalized model comes back contiguous,
    as it came, and predicts what its mask and statistics say."""
    user = _user(digits, digits_split[1], (0, 3, 8))
    model = copy.deepcopy(digits_base)
    res = fine_prune(model, user.unlabeled, PruneConfig(target_sparsity=0.5))
    assert all(p.is_contiguous() for p in model.parameters())  # conv2's weight in channels_last is not
    for name, keep in res.mask.layers.items():
        w = dict(model.named_modules())[name].weight
        assert not bool(w[~keep].any()) and bool(w[keep].ne(0).any())


class _ViewNet(torch.nn.Module):
    """A user's model that flattens with .view(): fine in NCHW, an error in channels_last."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_cannot_run_in_channels_last_is_personalized_in_its_own_layout(digits):
    torch.manual_seed(0)
    x = digits.x[:60]
    model = _ViewNet()
    twin = copy.deepcopy(model)
    res = fine_prune(model, x, PruneConfig(target_sparsity=0.5))
    assert res.sparsity >= 0.5 and all(p.is_contiguous() for p in model.parameters())
    with pytest.raises(RuntimeError):  # the trial the engine makes before choosing the layout
        twin.to(memory_format=torch.channels_last)(x[:2])


