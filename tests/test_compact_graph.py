"""Compaction of residual networks through Torch-Pruning's dependency graph: the compact ResNet
computes what the masked one computes, its file rebuilds from the stored pruning history, and a
malformed history is refused."""
import copy

import pytest
import torch

from common.model.architectures import build_model, prunable_layers
from common.model.compact_graph import compact_graph, rebuild
from common.model.mask import Mask

FEATS = {"kind": "image", "image_size": 32, "channels": 3}


def _randomized(arch):
    torch.manual_seed(0)
    m = build_model(arch, num_classes=10).eval()
    for mod in m.modules():  # BatchNorm statistics and affines away from their identity defaults
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m


def _channel_mask(m, frac=0.5, seed=1):
    """Half the units of every layer but the output lose all incoming connections, and 30% of
    the remaining connections go: residual stream channels die only where every writer agrees."""
    g = torch.Generator().manual_seed(seed)
    mask = Mask.dense(m)
    last = list(mask.layers)[-1]
    for n, k in mask.layers.items():
        if n != last:
            k[torch.rand(k.shape[0], generator=g) < frac] = False
            k &= torch.rand(k.shape, generator=g) > 0.3
    return mask


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_compact_resnet_computes_what_the_masked_one_computes(arch):
    m = _randomized(arch)
    mask = _channel_mask(m)
    masked = copy.deepcopy(m)
    mask.apply(masked)
    small, small_mask, history = compact_graph(m, mask, FEATS)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5)
    params = lambda net: sum(p.numel() for p in net.parameters())
    assert params(small) < 0.6 * params(m) and history
    assert all(small_mask.layers[n].shape == layer.weight.shape for n, layer in prunable_layers(small).items())
    assert small_mask.sparsity() < mask.sparsity()  # the removed channels were the pruned ones
    again = rebuild(build_model(arch, num_classes=10).eval(), history, FEATS)
    again.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_a_compacted_resnet_personalization_round_trips_through_its_checkpoint(tmp_path):
    from client.personalize import personalize
    from common.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from common.settings import PruneConfig

    base = _randomized("resnet18")
    meta = {"arch": "resnet18", "arch_kwargs": {"num_classes": 10}, "task": "imagefolder",
            "classes": [str(i) for i in range(10)], "features": FEATS}
    save_checkpoint(tmp_path / "base.pt", base, meta)
    x = torch.rand(24, 3, 32, 32)
    cfg = PruneConfig(scoring="firing", target_sparsity=0.5, restrict_outputs=False, recalibrate_bn=False)
    personalize(base, meta, x, cfg, tmp_path / "masked.pt")
    personalize(base, meta, x, cfg, tmp_path / "compact.pt", do_compact=True)
    masked, _, _ = load_checkpoint(tmp_path / "masked.pt")
    small, smeta, _ = load_checkpoint(tmp_path / "compact.pt")
    assert smeta["pruning_history"]
    with torch.no_grad():
        assert torch.allclose(small(x[:4]), masked(x[:4]), atol=1e-4)
    assert (tmp_path / "compact.pt").stat().st_size < (tmp_path / "base.pt").stat().st_size
    blob = torch.load(tmp_path / "compact.pt", weights_only=True)
    for bad in ([["no.such.layer", True, [0]]], [["conv1", True, [10**9]]], "rm -rf"):
        blob["pruning_history"] = bad
        torch.save(blob, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "bad.pt")
