import pytest
import torch

from common.engine.prune import fine_prune
from common.model.architectures import build_model, prunable_layers
from common.model.compact import compact
from common.model.mask import Mask, MaskError
from common.settings import PruneConfig


def random_mask(model, p=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(m.weight.shape, generator=g) > p for n, m in prunable_layers(model).items()})


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = build_model("kws", num_classes=7)  # odd sizes: bit packing must not pad into data
    mask = random_mask(model)
    mask.save(tmp_path / "m.mask")
    back = Mask.load(tmp_path / "m.mask")
    assert back == mask
    assert all(torch.equal(back.layers[k], v) for k, v in mask.layers.items())
    assert Mask.from_bytes(mask.to_bytes()).to_bytes() == mask.to_bytes()


def test_corrupt_or_truncated_mask_is_rejected():
    data = random_mask(build_model("smallcnn")).to_bytes()
    for bad in (b"junk", data[:-10], data[:20], b"FPMASK1\n" + b"\xff" * 20):
        with pytest.raises(MaskError):
            Mask.from_bytes(bad)


def test_counts_jaccard_hamming_diff():
    a = Mask({"l": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)})
    b = Mask({"l": torch.tensor([[1, 0, 0, 1]], dtype=torch.bool)})
    assert a.sparsity() == 0.5 and a.layer_sparsity() == {"l": 0.5}
    assert a.jaccard(b) == pytest.approx(1 / 3)  # pruned sets {2,3} and {1,2}
    assert a.hamming(b) == 0.5 and a.hamming(b, normalized=False) == 2
    assert a.diff(b) == {"l": {"only_self": 1, "only_other": 1}}
    assert a.jaccard(a) == 1.0
    with pytest.raises(MaskError):
        a.jaccard(Mask({"l": torch.ones(1, 5, dtype=torch.bool)}))


def test_apply_zeros_weights_and_silences_dead_units():
    model = build_model("smallcnn")
    mask = Mask.dense(model)
    mask.layers["conv1"][2] = False
    mask.apply(model)
    assert model.conv1.weight[2].abs().sum() == 0 and model.conv1.bias[2] == 0
    assert model.bn1.weight[2] == 0 and model.bn1.bias[2] == 0
    assert Mask.from_model(model).layers["conv1"][2].sum() == 0
    with pytest.raises(MaskError):
        Mask({"conv1": mask.layers["conv1"]}).apply(model)


@pytest.mark.parametrize("arch,shape", [("smallcnn", (32, 1, 8, 8)), ("kws", (16, 8000))])
def test_compaction_is_exact_smaller_and_keeps_unstructured_mask(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(*shape)
    res = fine_prune(model, x, PruneConfig(scoring="firing", target_sparsity=0.5, recalibrate_bn=False, restrict_outputs=False))
    kwargs = {"num_classes": 10}
    small, small_mask, kw = compact(model, res.mask, arch, kwargs)
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    # connections out of removed units carried nothing; the rest of the mask survives compaction
    assert 0 < small_mask.kept() <= res.mask.kept()
    assert Mask.from_model(small).kept() <= small_mask.kept()
    full = [m.weight.shape[0] for m in prunable_layers(model).values()][:-1]
    assert all(a <= b for a, b in zip(kw["widths"], full)) and list(kw["widths"]) != full


def test_compaction_refuses_non_chain_models():
    model = build_model("resnet18", num_classes=4)
    with pytest.raises(MaskError, match="chain models"):
        compact(model, Mask.dense(model), "resnet18", {})
