"""Head auto on a network whose features cannot follow the user (no BatchNorm, S26): prototypes of
pseudo-labels only where the last hidden layer moved no further than the user's class mix; a
covariate-shifted user keeps the base's output layer and is not made worse, a user holding a few
classes keeps the prototypes' gain; S36: an unshifted user holding every class keeps the base's
layer, where prototypes cost; without the vendor's record the base's layer stays; the record
travels checked."""
import copy

import numpy as np
import pytest
import torch

from common.data import partition as PT
from common.engine.adapt import DEEP_SHIFT, vendor_record
from common.engine.hidden_shift import NO_LABEL_SHIFT, hidden_layer, record_for
from common.engine.prune import fine_prune
from common.model.train import accuracy
from common.settings import PruneConfig
from tests.test_safe_default import D, K


def test_covariate_shifted_users_of_a_batchnorm_free_network_keep_the_base_layer_where_prototypes_hurt(
        gaussian_nobn):
    """S26, and S58: where the hidden layer moved beyond the class mix, prototypes only where they
    spread the predictions wider on both halves of the user's data; no user falls below its base,
    where prototypes forced on every user cost one more than 5 points."""
    base, meta, sample = gaussian_nobn
    hurt = []
    for seed in range(4):
        g = torch.Generator().manual_seed(10 + seed)
        a, b = torch.eye(D) + 0.6 * torch.randn(D, D, generator=g), torch.randn(D, generator=g)
        (xu, _), (xh, yh) = sample(list(range(K)), 120, g), sample(list(range(K)), 60, g)
        xu, xh = xu @ a + b, xh @ a + b  # every class, seen through another sensor
        base_acc = accuracy(base, xh, yh)
        model = copy.deepcopy(base)
        res = fine_prune(model, xu, PruneConfig(), base_meta=meta)
        assert res.adaptation["hidden_shift"] >= DEEP_SHIFT
        before, after = res.adaptation["head_spread"]
        assert res.adaptation["head"] == "linear" or after > before
        assert accuracy(model, xh, yh) >= base_acc - 0.02
        forced = copy.deepcopy(base)  # what the check keeps these users from
        fine_prune(forced, xu, PruneConfig(head="prototypes"), base_meta=meta)
        hurt.append(accuracy(forced, xh, yh) - base_acc)
    assert min(hurt) < -0.05, hurt


def test_a_sensor_that_collapses_the_predictions_gets_the_prototypes_that_spread_them_again(gaussian_nobn):
    """S58: a sensor of low gain pulls every input toward one point, and the base's predictions
    onto a few classes; the hidden layer moved beyond the class mix, so S26 alone keeps the base's
    layer, but prototypes spread the predictions wider on both halves of the data: kept, they gain
    where the base's layer does not, and no user falls below its base."""
    from common.engine import heads as HD

    base, meta, sample = gaussian_nobn
    with_head, without = [], []
    for seed in range(4):
        g = torch.Generator().manual_seed(10 + seed)
        (xu, _), (xh, yh) = sample(list(range(K)), 200, g), sample(list(range(K)), 100, g)
        c = torch.randn(D, generator=g)
        xu, xh = 0.4 * xu + c, 0.4 * xh + c
        base_acc = accuracy(base, xh, yh)
        model = copy.deepcopy(base)
        res = fine_prune(model, xu, PruneConfig(), base_meta=meta)
        before, after = res.adaptation["head_spread"]
        assert res.adaptation["hidden_shift"] >= DEEP_SHIFT and res.adaptation["head"] == "prototypes" and after > before
        with_head.append(accuracy(model, xh, yh) - base_acc)
        refused, keep = copy.deepcopy(base), HD.spreads_wider
        HD.spreads_wider = lambda *_a: (False, 0.0, 0.0)  # S26 alone
        try:
            r = fine_prune(refused, xu, PruneConfig(), base_meta=meta)
        finally:
            HD.spreads_wider = keep
        assert r.adaptation["head"] == "linear"
        without.append(accuracy(refused, xh, yh) - base_acc)
    assert min(with_head) >= -0.02 and np.mean(with_head) >= np.mean(without) + 0.05, (with_head, without)


def _few_class_user(digits, pool, classes, seed):
    rng = np.random.default_rng(seed)
    idx = np.asarray([i for i in pool if int(digits.y[i]) in classes])
    own, held = PT.split_heldout(idx, 0.3, rng)
    return digits.x[own], digits.x[held], digits.y[held]


def test_users_holding_a_few_classes_of_a_batchnorm_free_network_keep_the_prototypes(digits, digits_split,
                                                                                      digits_nobn):
    base, meta = digits_nobn
    _, pool = digits_split
    for seed, classes in enumerate([(1, 7), (3, 5, 8), (0, 6, 9)]):
        xu, xh, yh = _few_class_user(digits, pool, classes, seed)
        model = copy.deepcopy(base)
        res = fine_prune(model, xu, PruneConfig(), base_meta=meta)
        assert res.adaptation["head"] == "prototypes", (classes, res.adaptation)
        assert res.adaptation["hidden_shift"] < DEEP_SHIFT
        assert accuracy(model, xh, yh) >= accuracy(base, xh, yh) - 0.02


def test_unshifted_users_holding_every_class_of_a_batchnorm_free_network_keep_the_base_layer(gaussian_nobn):
    """S36: features that did not move and pseudo-labels spread over nearly every class leave a
    rebuilt layer nothing to learn but the base's errors; nothing then adapts the model, so its stop
    is judged on the second probe too (S35)."""
    base, meta, sample = gaussian_nobn
    for seed in range(4):
        g = torch.Generator().manual_seed(50 + seed)
        (xu, _), (xh, yh) = sample(list(range(K)), 120, g), sample(list(range(K)), 100, g)
        model = copy.deepcopy(base)
        res = fine_prune(model, xu, PruneConfig(), base_meta=meta)
        a = res.adaptation
        assert a["hidden_shift"] < DEEP_SHIFT and a["label_spread"] >= NO_LABEL_SHIFT
        assert a["head"] == "linear" and a["nothing_adapts"] and not a["head_gated"]
        assert any("second_probe" in h for h in res.history)
        assert accuracy(model, xh, yh) >= accuracy(base, xh, yh) - 0.02


def test_every_class_unshifted_on_the_batchnorm_free_digits_cnn_prototypes_cost_and_the_base_layer_does_not(
        digits, digits_split, digits_nobn):
    base, meta = digits_nobn
    _, pool = digits_split
    rng = np.random.default_rng(0)
    kept, forced, bases = [], [], []
    for _ in range(4):
        idx = torch.as_tensor(rng.choice(np.asarray(pool), 190, replace=False))
        xu, xh, yh = digits.x[idx[40:]], digits.x[idx[:40]], digits.y[idx[:40]]
        bases.append(accuracy(base, xh, yh))
        model = copy.deepcopy(base)
        res = fine_prune(model, xu, PruneConfig(), base_meta=meta)
        assert res.adaptation["head"] == "linear" and res.adaptation["label_spread"] >= NO_LABEL_SHIFT
        kept.append(accuracy(model, xh, yh))
        other = copy.deepcopy(base)  # today's choice for these users before S36: prototypes (15 per class)
        fine_prune(other, xu, PruneConfig(head="prototypes"), base_meta=meta)
        forced.append(accuracy(other, xh, yh))
    assert np.mean(kept) >= np.mean(bases) - 0.01
    assert np.mean(forced) < np.mean(kept), (forced, kept, bases)


def test_without_the_vendors_record_a_batchnorm_free_network_keeps_the_base_layer(digits, digits_split, digits_nobn):
    base, meta = digits_nobn
    _, pool = digits_split
    xu, _, _ = _few_class_user(digits, pool, (1, 7), 0)
    res = fine_prune(copy.deepcopy(base), xu, PruneConfig(), base_meta={k: v for k, v in meta.items()
                                                                          if k != "hidden_record"})
    assert res.adaptation["head"] == "linear" and res.adaptation["hidden_shift"] is None
    # a record of another model's layer is no record
    res = fine_prune(copy.deepcopy(base), xu, PruneConfig(),
                     base_meta=dict(meta, hidden_record=dict(meta["hidden_record"], layer="conv2")))
    assert res.adaptation["head"] == "linear"


def test_a_batchnorm_network_that_recalibrates_is_not_checked_but_one_that_does_not_is(digits_base, digits,
                                                                                       digits_split):
    vend, pool = digits_split
    meta = vendor_record(digits_base, digits.x[vend], digits.y[vend])
    xu, _, _ = _few_class_user(digits, pool, (1, 7), 0)
    res = fine_prune(copy.deepcopy(digits_base), xu, PruneConfig(), base_meta=meta)
    assert "hidden_shift" not in res.adaptation  # its features follow the user (bn-adapt auto)
    res = fine_prune(copy.deepcopy(digits_base), xu, PruneConfig(recalibrate_bn=False), base_meta=meta)
    assert "hidden_shift" in res.adaptation


def test_the_record_names_the_last_hidden_layer_and_fits_only_it(digits_nobn):
    base, meta = digits_nobn
    rec = meta["hidden_record"]
    assert rec["layer"] == hidden_layer(base) == "fc1"
    assert len(rec["mean"]) == len(rec["var"]) == len(rec["spread"]) == base.fc1.out_features
    assert all(0 <= v <= 1 for v in rec["spread"]) and all(v >= 0 for v in rec["var"])
    assert record_for(base, meta) is not None
    assert record_for(base, dict(meta, hidden_record=dict(rec, mean=rec["mean"][:-1]))) is None
    assert record_for(base, None) is None


@pytest.mark.badinput
@pytest.mark.parametrize("record", [
    {"layer": "fc1", "mean": [0.0, 1.0], "var": [1.0, 1.0], "spread": [0.5, 1.5]},   # spread above 1
    {"layer": "fc1", "mean": [0.0, 1.0], "var": [-1.0, 1.0], "spread": [0.5, 0.5]},  # negative variance
    {"layer": "fc1", "mean": [0.0], "var": [1.0, 1.0], "spread": [0.5, 0.5]},        # lengths differ
    {"layer": "fc1", "mean": [0.0] * 70_000, "var": [1.0] * 70_000, "spread": [0.5] * 70_000},
    {"layer": "fc1", "mean": [float("nan")], "var": [1.0], "spread": [0.5]},
    {"layer": "x" * 300, "mean": [0.0], "var": [1.0], "spread": [0.5]},
    {"layer": "fc1", "mean": [0.0], "var": [1.0], "spread": [0.5], "extra": 1},
    "everything",
])
def test_a_malformed_hidden_record_from_the_other_side_is_refused(record):
    from common.model.checkpoint import CheckpointError, check_model_meta

    meta = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10, "batchnorm": False}, "task": "digits",
            "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1}}
    assert check_model_meta(meta)["arch_kwargs"]["batchnorm"] is False
    with pytest.raises(CheckpointError, match="hidden_record"):
        check_model_meta(dict(meta, hidden_record=record))
    with pytest.raises(CheckpointError, match="batchnorm"):
        check_model_meta(dict(meta, arch_kwargs={"num_classes": 10, "batchnorm": "no"}))

