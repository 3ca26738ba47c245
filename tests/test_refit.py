"""Refit after structured pruning: the layers that read removed units are re-solved by least
squares on the user's own unlabeled data, which recovers the accuracy structured pruning lost,
keeps every pruned unit pruned (so compaction stays exact), needs no label and no gradient, and is
refused where it cannot apply."""
import copy

import pytest
import torch

from common.data import partition as PT
from common.engine.prune import fine_prune
from common.model.compact import compact
from common.model.train import accuracy
from common.settings import PruneConfig
from simulations.bench_report import PREVIOUS_DEFAULT


def _user(digits, pool, classes=(0, 3, 8)):
    idx = [i for i in pool if int(digits.y[i]) in classes]
    return PT.make_users(digits, [idx], 0.3, seed=0)[0]


@pytest.fixture(scope="module")
def pruned(digits, digits_split, _digits_base):
    """Half of each layer's weights of the digits CNN removed as whole units, with and without
    refit (measured: held-out accuracy 0.81 without, 1.0 with; the base 0.987)."""
    user = _user(digits, digits_split[1])
    out = {}
    for refit in (False, True):
        m = copy.deepcopy(_digits_base)
        # the engine of before the safe default (full recalibration, the base's output layer): the
        # safe default's input-side recalibration and rebuilt head recover most of this user alone
        res = fine_prune(m, user.unlabeled, PruneConfig(**{**PREVIOUS_DEFAULT, "restrict_outputs": False},
                                                         scoring="channel-usage", scope="layer",
                                                         target_sparsity=0.5, refit=refit))
        out[refit] = (m, res)
    return user, out


def test_refit_recovers_the_accuracy_structured_pruning_lost(pruned, _digits_base):
    user, out = pruned
    base = accuracy(_digits_base, user.heldout_x, user.heldout_y)
    plain = accuracy(out[False][0], user.heldout_x, user.heldout_y)
    refit = accuracy(out[True][0], user.heldout_x, user.heldout_y)
    # measured: 0.5 structured sparsity costs this user accuracy; refit gives it back
    assert plain < base - 0.05, (plain, base)
    assert refit >= base - 0.03 and refit > plain + 0.05, (refit, plain, base)
    assert out[True][1].mask == out[False][1].mask  # refit changes weights, never the mask
    assert "refit" in out[True][1].phases and out[True][1].forward_samples > out[False][1].forward_samples


def test_after_refit_pruned_units_stay_pruned_and_compaction_is_exact(pruned):
    _, out = pruned
    model, res = out[True]
    from common.model.architectures import prunable_layers

    for name, layer in prunable_layers(model).items():
        assert torch.all(layer.weight[~res.mask.layers[name]] == 0)  # nothing pruned came back
    small, _, _ = compact(copy.deepcopy(model), res.mask, "smallcnn", {})
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), model.eval()(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def test_refit_uses_forward_passes_only(digits, digits_split, digits_base, monkeypatch):
    """No gradient is ever computed: backward would raise."""
    user = _user(digits, digits_split[1])

    def no_backward(*a, **k):
        raise AssertionError("refit ran a backward pass")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    res = fine_prune(digits_base, user.unlabeled, PruneConfig(scoring="firing", target_sparsity=0.3, refit=True))
    assert res.sparsity > 0.25


def test_in_a_resnet_refit_removes_only_block_internal_units_and_restores_the_outputs():
    """In a ResNet only units with one reader go (conv1 inside each block; the residual stream
    stays), the layer that reads them is refit, the outputs come back toward the unpruned model's,
    and the dependency-graph compaction is exact and halves the parameters."""
    from common.model.architectures import build_model, reader_links
    from common.model.compact_graph import compact_graph

    torch.manual_seed(0)
    base = build_model("resnet18", num_classes=10).eval()
    x = torch.rand(24, 3, 32, 32)
    with torch.no_grad():
        want = base(x)
    out = {}
    import common.engine.prune as engine

    for refit in (False, True):
        m = copy.deepcopy(base)
        cfg = PruneConfig(scoring="channel-usage", scope="layer", target_sparsity=0.5, refit=True,
                          recalibrate_bn=False, restrict_outputs=False, head="linear")  # the outputs: the base's
        real = engine.refit_consumers
        if not refit:  # the same mask without its refit
            engine.refit_consumers = lambda *a, **k: {"samples": 0}
        try:
            res = fine_prune(m, x, cfg)
        finally:
            engine.refit_consumers = real
        with torch.no_grad():
            out[refit] = (float((m(x) - want).pow(2).mean() / want.pow(2).mean()), m, res)
    m, res = out[True][1], out[True][2]
    gone = {k for k, v in res.mask.dead_units().items() if v.any()}
    assert gone == {p for p, _ in reader_links(m)} and all(k.endswith("conv1") for k in gone)
    assert out[True][0] < 0.5 * out[False][0], (out[True][0], out[False][0])
    small, _, _ = compact_graph(m, res.mask, {"kind": "image", "image_size": 32, "channels": 3})
    with torch.no_grad():
        assert torch.allclose(small(x), m(x), atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in base.parameters())


@pytest.mark.badinput
def test_refit_without_a_structured_scorer_is_refused_in_one_line(tmp_path, capsys):
    from common.cli import main
    from common.engine.prune import check_config

    with pytest.raises(ValueError, match="needs a structured scorer"):
        check_config(PruneConfig(refit=True))
    assert main(["personalize", "--model", str(tmp_path / "none.pt"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "me.pt"), "--refit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "structured scorer" in err[0] and not (tmp_path / "me.pt").exists()


def test_refit_and_channel_usage_refuse_a_model_without_single_reader_layers_in_one_clear_error():
    """A model that is neither a chain model nor ResNet blocks has no unit with one known reader:
    personalizing with refit, refitting directly and scoring by channel-usage each say so before
    any pass, naming what needed them."""
    import torch.nn as nn

    from common.engine.refit import refit_consumers
    from common.engine.scoring import get_scorer
    from common.model.mask import Mask

    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.randn(8, 1, 8, 8)
    msg = "needs layers whose units have one reader"
    with pytest.raises(ValueError, match=f"refit {msg}"):
        fine_prune(m, x, PruneConfig(scoring="channel-usage", target_sparsity=0.5, refit=True))
    with pytest.raises(ValueError, match=f"refit {msg}"):
        refit_consumers(m, m, Mask.dense(m), x)
    with pytest.raises(ValueError, match=f"channel-usage {msg}"):
        get_scorer("channel-usage")(m, None)
