"""Refit after structured pruning: the layers that read removed units are re-solved by least
squares on the user's own unlabeled data, which recovers the accuracy structured pruning lost,
keeps every pruned unit pruned (so compaction stays exact), needs no label and no gradient, and is
refused where it cannot apply."""
import copy

import pytest
import torch

from common import data as D
from common.compact import compact
from common.prune import PruneConfig, fine_prune
from common.train import accuracy


def _user(digits, pool, classes=(0, 3, 8)):
    idx = [i for i in pool if int(digits.y[i]) in classes]
    return D.make_users(digits, [idx], 0.3, seed=0)[0]


@pytest.fixture(scope="module")
def pruned(digits, digits_split, _digits_base):
    """Half of each layer's weights of the digits CNN removed as whole units, with and without
    refit (measured: held-out accuracy 0.81 without, 1.0 with; the base 0.987)."""
    user = _user(digits, digits_split[1])
    out = {}
    for refit in (False, True):
        m = copy.deepcopy(_digits_base)
        res = fine_prune(m, user.unlabeled, PruneConfig(scoring="channel-usage", scope="layer",
                                                         target_sparsity=0.5, restrict_outputs=False, refit=refit))
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
    from common.models import prunable_layers

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


@pytest.mark.badinput
def test_refit_without_a_structured_scorer_or_on_a_residual_network_is_refused(tmp_path, capsys):
    from common.cli import main
    from common.models import build_model

    with pytest.raises(ValueError, match="needs a structured scorer"):
        PruneConfig(refit=True).validate()
    with pytest.raises(ValueError, match="chain model"):
        fine_prune(build_model("resnet18", num_classes=10), torch.rand(4, 3, 32, 32),
                   PruneConfig(scoring="firing", target_sparsity=0.3, refit=True, recalibrate_bn=False))
    assert main(["personalize", "--model", str(tmp_path / "none.pt"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "me.pt"), "--refit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "structured scorer" in err[0] and not (tmp_path / "me.pt").exists()
