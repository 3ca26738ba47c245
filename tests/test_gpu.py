"""The GPU path gives what the CPU path gives: batches, masks kept on the GPU, personalization.
These run only where CUDA is (the device machine); CI has none, and skips them."""
import copy

import pytest
import torch

from common.engine.prune import fine_prune
from common.model.batches import batches, device_batches
from common.model.mask import Mask
from common.settings import PruneConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@cuda
@pytest.mark.parametrize("first", [None, torch.tensor([7, 2, 30, 11, 5])])
def test_gpu_batches_through_pinned_memory_equal_the_cpu_batches(first):
    x = torch.randn(37, 3, 5, 5)
    got = list(device_batches(x, 8, "cuda", first))
    want = list(batches(x, 8, first))
    assert [len(b) for b in got] == [len(b) for b in want]
    for g, w in zip(got, want):
        assert g.is_cuda and torch.equal(g.cpu(), w)


@cuda
def test_batches_copied_on_a_side_stream_give_the_logits_of_data_already_on_the_gpu():
    """The copies run on a side stream while the model runs: the model must still wait for each
    batch to arrive, and a batch's memory must not be reused under it (a race here gives wrong
    logits, more likely the more and the faster the batches)."""
    import torch.nn as nn

    from common.model.batches import batched_forward

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    m = m.cuda().eval()
    x = torch.randn(2000, 3, 64, 64)
    for _ in range(3):
        assert torch.equal(batched_forward(m, x, 16, "cuda"), batched_forward(m, x.cuda(), 16, "cuda"))


@cuda
def test_a_mask_made_on_the_gpu_stays_there_until_read_and_applies_as_the_cpu_copy(digits_base):
    torch.manual_seed(0)
    dense = Mask.dense(digits_base)
    keep = {k: torch.rand(v.shape) > 0.5 for k, v in dense.layers.items()}
    on_gpu = Mask({k: v.cuda() for k, v in keep.items()})
    assert all(v.is_cuda for v in on_gpu.held().values())
    assert on_gpu.kept() == Mask(keep).kept()
    a = on_gpu.apply(copy.deepcopy(digits_base).cuda())
    b = Mask(keep).apply(copy.deepcopy(digits_base))
    assert all(torch.equal(p.cpu(), q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert on_gpu == Mask(keep) and not on_gpu.layers["conv1"].is_cuda


@cuda
@pytest.mark.parametrize("cfg", [PruneConfig(), PruneConfig(target_sparsity=0.7),
                                 PruneConfig(scoring="channel-usage", target_sparsity=0.5, refit=True),
                                 PruneConfig(head="prototypes")], ids=["default", "fixed", "refit", "prototypes"])
def test_personalizing_on_the_gpu_gives_the_cpu_mask(digits, digits_split, digits_base, cfg):
    _, pool = digits_split
    x = digits.x[pool][:64]
    cpu = fine_prune(copy.deepcopy(digits_base), x, cfg, "cpu")
    gpu = fine_prune(copy.deepcopy(digits_base), x, cfg, "cuda")
    assert abs(cpu.sparsity - gpu.sparsity) < 1e-3
    # float rounding differs between the devices' kernels: a connection scored at the threshold
    # may fall either side (2 of 38,160 on digits at a fixed 0.7, measured on an H200)
    assert cpu.mask.hamming(gpu.mask, normalized=False) <= 0.001 * cpu.mask.total()
    assert cpu.forward_samples == gpu.forward_samples
    assert all(not v.is_cuda for v in gpu.mask.held().values())  # the result holds no GPU memory


@cuda
def test_the_fused_output_statistics_on_the_gpu_equal_pytorchs_reductions(monkeypatch):
    """All hooks on a GPU read each channels_last BatchNorm output once (common/engine/kernels.py): the
    statistics equal those of PyTorch's reductions on the same GPU, counts exactly."""
    pytest.importorskip("triton")
    from common.engine import kernels
    from common.engine.forward import to_layout
    from common.engine.probe import collect_stats
    from common.model.architectures import build_model

    torch.manual_seed(0)
    for shape in [(3, 70, 9, 11), (64, 64, 112, 112), (5, 2048, 7, 7)]:
        y = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
        rows = kernels.fusable(y)
        assert rows is not None and rows.data_ptr() == y.data_ptr()  # a view, no copy
        s, n = kernels.positive_stats(y)  # None (a failure) would fail here, not fall back
        assert not kernels._failed
        assert torch.equal(n, (y > 0).sum((0, 2, 3)))
        assert torch.allclose(s, y.clamp_min(0).double().sum((0, 2, 3)), rtol=1e-5)
    assert kernels.fusable(torch.randn(4, 3, 5, 5, device="cuda")) is None  # NCHW: PyTorch's
    m = to_layout(build_model("resnet18", num_classes=10).cuda().eval(), torch.channels_last)
    x = torch.randn(40, 3, 64, 64)
    fused, lg = collect_stats(m, x, 16, "cuda", outputs=True)
    monkeypatch.setattr(kernels, "fusable", lambda y: None)
    plain, lg2 = collect_stats(m, x, 16, "cuda", outputs=True)
    assert torch.equal(lg, lg2)
    for k, a in plain.layers.items():
        b = fused.layers[k]
        assert torch.equal(a.out_fire, b.out_fire) and a.out_count == b.out_count, k
        assert torch.allclose(a.out_sum, b.out_sum, rtol=1e-5, atol=1e-6), k
