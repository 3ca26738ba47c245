"""Mean-preserving pruning: with `compensate`, each unit of the pruned model keeps the unpruned
model's mean pre-activation on the user's data (through its bias, or through the statistics of a
BatchNorm that is not re-estimated), a unit with nothing left stays silent, and the statistics
pass's mean input is the data's."""
import copy

import torch
import torch.nn as nn

from common.engine.forward import forward_pass
from common.engine.prune import fine_prune
from common.model.architectures import prunable_layers
from common.model.mask import Mask
from common.settings import PruneConfig


class _Net(nn.Module):
    """A conv with a bias (strided, padded), a bias-less conv before a BatchNorm, and two linear
    layers: every way a lost mean can be put back."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 16, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _layer_means(model, x):
    """Each prunable layer's mean output per unit on x, read as it leaves the layer."""
    out, hooks = {}, []
    for name, layer in prunable_layers(model).items():
        hooks.append(layer.register_forward_hook(
            lambda m, _a, y, name=name: out.__setitem__(name, y.detach().transpose(0, 1).flatten(1).mean(1))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_the_statistics_pass_records_the_mean_input_as_one_samples_map():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(37, 1, 8, 8) + 0.5
    _, stats = forward_pass(model, x, 10, hooks=False, means=True)
    assert torch.allclose(stats.layers["conv1"].input_mean().float(), x.mean(0), atol=1e-6)
    assert stats.layers["fc1"].input_mean().shape == (8 * 16,)
    _, plain = forward_pass(model, x, 10, hooks=False)
    assert plain.layers["conv1"].in_total is None  # only where asked: compensate's pass pays for it


def _layer_inputs(model, x):
    out, hooks = {}, []
    for name, layer in prunable_layers(model).items():
        hooks.append(layer.register_forward_pre_hook(lambda m, a, name=name: out.__setitem__(name, a[0].detach())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def _unit_mean(layer, x):
    with torch.no_grad():
        return layer(x).transpose(0, 1).flatten(1).mean(1)


def test_a_compensated_pruned_layer_keeps_each_units_mean_output_on_the_users_data():
    """A fixed 60% cut without recalibration: fed the unpruned model's inputs, each pruned layer
    with a bias (conv1, strided and padded; fc1; fc2) gives every unit the unpruned mean output,
    and conv2 (no bias) moves its BatchNorm's running mean by what it lost; without compensate
    the means move. Through the whole model the means stay closer to the unpruned model's."""
    torch.manual_seed(0)
    base, x = _Net().eval(), torch.randn(200, 1, 8, 8).abs()
    inputs, dense = _layer_inputs(base, x), _layer_means(base, x)
    models = {}
    for comp in (False, True):
        m = copy.deepcopy(base)
        r = fine_prune(m, x, PruneConfig(target_sparsity=0.6, recalibrate_bn=False, compensate="on" if comp else "off", head="linear"))
        assert r.sparsity > 0.5
        models[comp] = m
    m, plain = models[True], models[False]
    for name in ("conv1", "fc1", "fc2"):
        want = _unit_mean(getattr(base, name), inputs[name])
        assert torch.allclose(_unit_mean(getattr(m, name), inputs[name]), want, atol=1e-4), name
    assert (_unit_mean(plain.fc1, inputs["fc1"]) - _unit_mean(base.fc1, inputs["fc1"])).abs().max() > 0.01
    lost = _unit_mean(base.conv2, inputs["conv2"]) - _unit_mean(m.conv2, inputs["conv2"])
    assert torch.allclose(base.bn2.running_mean - m.bn2.running_mean, lost, atol=1e-4)
    assert torch.equal(plain.bn2.running_mean, base.bn2.running_mean)

    def err(model):
        got = _layer_means(model, x)
        return sum((got[k] - dense[k]).abs().mean() for k in ("fc1", "fc2"))
    assert err(m) < 0.5 * err(plain)


def test_a_unit_with_no_connection_left_stays_silent():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(64, 1, 8, 8).abs()
    mask = Mask.dense(model)
    mask.layers["fc1"][3] = False  # every connection of fc1's unit 3
    mask.layers["fc1"][5, :60] = False
    from common.engine import compensate as CP
    from common.engine.bn import bn_layers

    _, stats = forward_pass(model, x, 64, hooks=False, means=True)
    targets = CP.plan(model, stats, {k: v.clone() for k, v in model.state_dict().items()})
    before = model.fc1.bias.clone()
    dead = {}
    mask.apply(model, None, dead)
    CP.put_back(targets, CP.lost_means(targets, dead), bn_layers(model), None, [False] * len(bn_layers(model)))
    assert model.fc1.bias[3] == 0.0
    assert model.fc1.bias[5] != before[5]
    assert torch.equal(model.fc1.bias[:3], before[:3])


def test_under_full_recalibration_compensation_changes_nothing_a_batchnorm_recentres(digits, digits_split,
                                                                                 digits_base):
    """Every BatchNorm layer re-estimated on the pruned model: a lost mean before one is absorbed,
    so a fixed cut with and without compensate predicts the same; only the layers with no
    BatchNorm after them (fc1) differ."""
    pool = torch.as_tensor(digits_split[1][:120])
    x = digits.x[pool]
    outs = []
    for comp in (False, True):
        m = copy.deepcopy(digits_base)
        fine_prune(m, x, PruneConfig(target_sparsity=0.5, bn_adapt="full", compensate="on" if comp else "off", head="linear"))
        outs.append(m)
    a, b = outs
    for bn in ("bn1", "bn2"):
        # the BatchNorm's normalized output is the same: its running mean moved by the bias moved
        la, lb = getattr(a, bn), getattr(b, bn)
        conv = {"bn1": "conv1", "bn2": "conv2"}[bn]
        moved = getattr(b, conv).bias - getattr(a, conv).bias
        assert torch.allclose(lb.running_mean - la.running_mean, moved, atol=1e-4)
    assert not torch.allclose(a.fc1.bias, b.fc1.bias)


def test_the_mean_a_convolution_loses_is_the_convolution_of_the_mean_input_in_any_layout_and_grouping():
    """Each unit's mean pre-activation, one matrix-vector product over its weights, equals the
    convolution of the data averaged over samples and output positions: strided, padded, grouped,
    1-d, and with a channels_last kernel."""
    from common.engine import compensate as CP

    torch.manual_seed(0)
    for conv, shape in ((nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (9, 4, 7, 5)),
                        (nn.Conv2d(4, 8, (3, 2), padding=(2, 0), dilation=(1, 2), groups=2, bias=False), (9, 4, 6, 6)),
                        (nn.Conv1d(3, 5, 4, stride=3, padding=2, bias=False), (9, 3, 11))):
        x = torch.randn(*shape) + 0.3
        want = conv(x).detach().transpose(0, 1).flatten(1).mean(1)
        for w in (conv.weight.detach(), conv.weight.detach().to(memory_format=torch.channels_last)
                  if conv.weight.dim() == 4 else conv.weight.detach()):
            taps = CP._taps(conv, x.mean(0), w)
            assert torch.allclose(CP._unit_means(w, taps), want, atol=1e-5), (conv, w.is_contiguous())


def test_compensate_is_on_by_default_at_the_stop_and_at_a_fixed_target_and_the_report_says_so():
    torch.manual_seed(0)
    base, x = _Net().eval(), torch.randn(64, 1, 8, 8).abs()
    fixed = fine_prune(copy.deepcopy(base), x, PruneConfig(target_sparsity=0.5, recalibrate_bn=False))
    stop = fine_prune(copy.deepcopy(base), x, PruneConfig(recalibrate_bn=False))
    off = fine_prune(copy.deepcopy(base), x, PruneConfig(recalibrate_bn=False, compensate="off"))
    assert fixed.adaptation["compensated"] is True
    assert stop.adaptation["compensated"] is (stop.sparsity > 0) and stop.sparsity > 0
    assert off.adaptation["compensated"] is False
    assert stop.stats.layers["fc1"].in_total is not None and off.stats.layers["fc1"].in_total is None


def test_under_full_recalibration_only_layers_no_batchnorm_recentres_are_compensated():
    """A BatchNorm re-estimated in full on the pruned model centres the layer before it itself:
    its lost mean is neither computed nor collected (the statistics pass sums the inputs of the
    layers no BatchNorm follows only)."""
    from common.engine import probe as PR

    torch.manual_seed(0)
    base, x = _Net().eval(), torch.randn(64, 1, 8, 8).abs()
    seen = []
    real = PR.Probe.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append([t.name for t in self.targets])

    PR.Probe.__init__ = spy
    try:
        full = fine_prune(copy.deepcopy(base), x, PruneConfig(bn_adapt="full", target_sparsity=0.5))
        stem = fine_prune(copy.deepcopy(base), x, PruneConfig(bn_adapt="stem", target_sparsity=0.5))
    finally:
        PR.Probe.__init__ = real
    assert seen[0] == ["conv1", "fc1", "fc2"]  # conv2's bn2 is re-estimated: conv2 is not compensated
    assert "conv2" in seen[1]  # bn2 past the input side keeps the base's statistics: conv2's mean goes there
    assert full.stats.layers["conv2"].in_total is None and full.stats.layers["fc1"].in_total is not None
    assert stem.stats.layers["conv2"].in_total is not None


def test_where_candidates_keep_the_input_sides_statistics_a_biasless_layer_still_gets_its_mean_back():
    """probe.KEEP_INPUT_SIDE (S20's arm): no pass re-estimates anything, so a bias-less conv's lost
    mean must go into its BatchNorm's running mean itself, not into a prior no pass reads."""
    from common.engine import probe as PR

    torch.manual_seed(0)
    base, x = _Net().eval(), torch.randn(120, 1, 8, 8).abs()
    inputs = _layer_inputs(base, x)
    PR.KEEP_INPUT_SIDE = True
    try:
        m = copy.deepcopy(base)
        fine_prune(m, x, PruneConfig(target_sparsity=0.6, bn_adapt="stem", compensate="on", head="linear"))
    finally:
        PR.KEEP_INPUT_SIDE = False
    lost = _unit_mean(base.conv2, inputs["conv2"]) - _unit_mean(m.conv2, inputs["conv2"])
    assert lost.abs().max() > 1e-3
    # bn2 is past the input side: it keeps the statistics pass's statistics, shifted by what conv2 lost
    from common.engine.adapt import stem_profile
    from common.engine.bn import bn_prior, recalibrate_bn

    ref = copy.deepcopy(base)
    recalibrate_bn(ref, x, 256, profile=stem_profile(ref), prior=bn_prior(ref))
    assert torch.allclose(ref.bn2.running_mean - m.bn2.running_mean, lost, atol=1e-4)
