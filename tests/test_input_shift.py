"""S57: on a network without BatchNorm, the first layer's channel means follow the user (its bias
moved to the vendor's class means under the user's class mix): styled users of the BatchNorm-free
digits CNN gain where the default without it did not; a user holding one class of unshifted data is
moved by almost nothing where a class-blind target would move it far; a BatchNorm network, a base
without the record and recalibrate-bn off move nothing; the record travels checked."""
import copy

import numpy as np
import pytest
import torch

from common.engine import input_shift as IS
from common.engine.prune import fine_prune
from common.model.checkpoint import CheckpointError, check_model_meta
from common.model.train import accuracy
from common.settings import PruneConfig
from simulations.cohorts import apply_image, image_style
from tests.test_safe_default import K


def _styled_users(digits, pool, names=("contrast", "thick", "contrast", "thick"), n=110, held=40):
    rng = np.random.default_rng(57)
    users = []
    for name in names:
        style = image_style(name, rng)
        idx = rng.choice(pool, n, replace=False)
        p, e = torch.as_tensor(idx[held:]), torch.as_tensor(idx[:held])
        users.append((apply_image(digits.x[p], style), apply_image(digits.x[e], style), digits.y[e]))
    return users


def _personalized(base, x, meta, shift=True, **cfg):
    model = copy.deepcopy(base)
    before = IS.applies
    if not shift:
        IS.applies = lambda _m, _meta: False
    try:
        res = fine_prune(model, x, PruneConfig(**cfg), base_meta=meta)
    finally:
        IS.applies = before
    return model, res


def test_styled_users_of_a_batchnorm_free_cnn_gain_where_the_default_without_the_first_layer_did_not(
        digits, digits_split, digits_nobn):
    base, meta = digits_nobn
    gains, without_gains = [], []
    for xu, xh, yh in _styled_users(digits, digits_split[1]):
        b = accuracy(base, xh, yh)
        model, res = _personalized(base, xu, meta)
        assert res.adaptation["first_layer_follows"] and res.adaptation["first_layer_shift"] > 0
        gains.append(accuracy(model, xh, yh) - b)
        without_gains.append(accuracy(_personalized(base, xu, meta, shift=False)[0], xh, yh) - b)
    assert min(gains) >= -0.025  # one held-out image of 40 at most
    assert np.mean(gains) >= np.mean(without_gains) + 0.04 and np.mean(gains) >= 0.04


def test_a_user_holding_one_class_is_moved_by_its_class_means_not_toward_the_vendors_average(gaussian_nobn):
    base, meta, sample = gaussian_nobn
    vendor = IS.record_for(base, meta)
    counts = torch.tensor(meta["class_counts"], dtype=torch.float32)
    for c in (0, 3, 7):
        g = torch.Generator().manual_seed(100 + c)
        (xu, _), (xh, yh) = sample([c], 60, g), sample([c], 40, g)
        delta, _ = IS.shift(copy.deepcopy(base), xu, meta)
        user = vendor[c] - delta * (1 + IS.EVIDENCE / len(xu))  # what the user's first layer averaged
        blind = (counts / counts.sum()) @ vendor - user  # a target blind to the class mix
        assert delta.norm() < 0.25 * blind.norm()
        model, _ = _personalized(base, xu, meta)
        assert accuracy(model, xh, yh) >= accuracy(base, xh, yh) - 0.02


def test_a_shifted_sensor_is_taken_out_of_the_first_layers_means(gaussian_nobn):
    base, meta, sample = gaussian_nobn
    g = torch.Generator().manual_seed(5)
    (xu, _), (xh, yh) = sample(list(range(K)), 200, g), sample(list(range(K)), 100, g)
    offset = 1.5 * torch.randn(xu.shape[1], generator=g)  # every input moved by one offset
    model, res = _personalized(base, xu + offset, meta)
    first = next(iter(model.children()))
    # the first layer's move undoes most of what the offset adds to its outputs
    moved = first.bias.detach() - next(iter(base.children())).bias.detach()
    added = first.weight.detach() @ offset
    assert (moved + added).norm() < 0.35 * added.norm()
    assert accuracy(model, xh + offset, yh) >= accuracy(base, xh + offset, yh) + 0.05


def test_batchnorm_networks_bases_without_the_record_and_recalibration_off_move_no_first_layer(
        digits, digits_split, digits_base, digits_nobn):
    x = digits.x[torch.as_tensor(digits_split[1][:80])]
    model, res = _personalized(digits_base, x, None)
    assert not res.adaptation["first_layer_follows"]
    base, meta = digits_nobn
    for m, cfg in ((None, {}), ({k: v for k, v in meta.items() if k != "first_layer_means"}, {}),
                   (dict(meta, first_layer_means=dict(meta["first_layer_means"], layer="fc1")), {}),
                   (meta, {"recalibrate_bn": False})):
        a, res = _personalized(base, x, m, **cfg)
        b, _ = _personalized(base, x, m, shift=False, **cfg)
        assert not res.adaptation["first_layer_follows"]
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_first_layer_moves_by_its_bias_alone_and_keeps_the_mask_and_shapes(digits, digits_split, digits_nobn):
    base, meta = digits_nobn
    xu = _styled_users(digits, digits_split[1], names=("contrast",))[0][0]
    model, res = _personalized(base, xu, meta, target_sparsity=0.0)
    before, after = base.state_dict(), model.state_dict()
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["conv1.bias"]


@pytest.mark.parametrize("bad", [
    {"layer": "conv1"},
    {"layer": "conv1", "mean": [[0.0, 1.0], [0.0]]},
    {"layer": "conv1", "mean": [[0.0, float("nan")]]},
    {"layer": 3, "mean": [[0.0]]},
    {"layer": "conv1", "mean": [], "extra": 1},
    [[0.0]],
])
def test_a_malformed_first_layer_record_is_refused(bad):
    meta = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10, "batchnorm": False}, "task": "digits",
            "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1},
            "first_layer_means": bad}
    with pytest.raises(CheckpointError, match="first_layer_means"):
        check_model_meta(meta)
