import pytest
import torch
import torch.nn as nn

from common.engine.probe import collect_stats
from common.engine.scoring import SCORERS, get_scorer, register
from common.engine.stats import StatsCollector
from common.model.architectures import build_model


def test_input_norm_and_firing_match_manual_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(70, 5)
    stats, _ = collect_stats(model, x, batch_size=16, device="cpu")  # several batches: running sums
    st0 = stats.layers["0"]
    assert torch.allclose(st0.input_norm(), x.pow(2).mean(0).sqrt().double(), atol=1e-6)
    h = model[0](x)
    assert torch.allclose(st0.firing_rate(), (h > 0).double().mean(0), atol=1e-6)
    assert torch.allclose(st0.mean_activation(), torch.relu(h).double().mean(0), atol=1e-5)
    assert torch.allclose(stats.layers["2"].input_norm(), torch.relu(h).pow(2).mean(0).sqrt().double(), atol=1e-5)


def test_conv_stats_count_positions_and_memory_is_constant():
    model = build_model("smallcnn", num_classes=10)
    with StatsCollector(model) as col:
        model(torch.rand(8, 1, 8, 8))
        sizes = [t.numel() for st in col.stats.layers.values() for t in (st.in_sq, st.out_sum, st.out_fire)]
        model(torch.rand(64, 1, 8, 8))
        assert sizes == [t.numel() for st in col.stats.layers.values() for t in (st.in_sq, st.out_sum, st.out_fire)]
    assert col.stats.layers["conv1"].in_count == 72 * 64  # samples x 8x8 positions
    assert not col.handles  # hooks removed on exit
    assert not model.conv1._forward_pre_hooks


def test_firing_is_measured_after_batchnorm():
    model = build_model("smallcnn", num_classes=10).eval()
    with torch.no_grad():
        model.bn1.bias.fill_(-100.0)  # every conv1 channel is off after BN+ReLU
        model.bn1.bias[3] = 100.0     # except channel 3
    stats, _ = collect_stats(model, torch.rand(20, 1, 8, 8), 8, "cpu")
    rate = stats.layers["conv1"].firing_rate()
    assert rate[3] == 1.0 and rate.sum() == 1.0


def test_usage_score_is_weight_times_input_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 2))
    x = torch.randn(40, 6) * torch.arange(1, 7)
    stats, _ = collect_stats(model, x, 40, "cpu")
    s = get_scorer("usage")(model[0].weight, stats.layers["0"])
    assert torch.allclose(s, model[0].weight.abs() * x.pow(2).mean(0).sqrt(), atol=1e-5)


def test_scorer_registry_plugin_and_unknown_name():
    @register("half_magnitude")
    def half(w, st=None, gen=None):
        return w.abs() / 2
    try:
        assert get_scorer("half_magnitude") is half
    finally:
        SCORERS.pop("half_magnitude")
    with pytest.raises(ValueError, match="unknown scoring 'nope'"):
        get_scorer("nope")


@pytest.mark.parametrize("piece", [1 << 18, 100])
def test_channels_last_statistics_read_in_pieces_equal_the_whole_reduction(monkeypatch, piece):
    """On the CPU a channels_last activation is reduced a piece of rows at a time (the whole
    tensor's temporaries cost page faults). However it is cut, even into pieces smaller than one
    sample's map, every statistic is the one a reduction of the whole tensor gives: the counts
    exactly, the sums to float rounding."""
    from common.engine import stats as S
    from common.engine.forward import to_layout

    torch.manual_seed(1)
    m = to_layout(build_model("resnet18", num_classes=10).eval(), torch.channels_last)
    x = torch.randn(5, 3, 48, 48)
    y = to_layout(nn.Conv2d(3, 8, 3), torch.channels_last)(x).detach()
    pieces = S._cpu_nhwc_pieces(y)
    assert pieces is not None and torch.equal(torch.cat(pieces), y.permute(0, 2, 3, 1).reshape(-1, 8))
    assert S._cpu_nhwc_pieces(y.contiguous()) is None and S._cpu_nhwc_pieces(y[:, :, 0]) is None
    monkeypatch.setattr(S, "_PIECE", 1 << 30)  # one piece: the whole tensor
    whole, lg = collect_stats(m, x, 4, "cpu", outputs=True)
    monkeypatch.setattr(S, "_PIECE", piece)
    cut, lg2 = collect_stats(m, x, 4, "cpu", outputs=True)
    assert torch.equal(lg, lg2)
    assert len(S._cpu_nhwc_pieces(y)) == (1 if piece > 1 << 17 else -(-y.numel() // (piece // 8 * 8)))
    for k, w in whole.layers.items():
        c = cut.layers[k]
        assert torch.equal(w.out_fire, c.out_fire) and w.in_count == c.in_count, k
        assert torch.allclose(w.in_sq, c.in_sq, rtol=1e-5), k
        assert torch.allclose(w.out_sum, c.out_sum, rtol=1e-5, atol=1e-6), k


def test_statistics_in_channels_last_equal_those_in_the_models_own_layout():
    """The engine runs conv nets in channels_last; the usage hook reads that layout through a
    view, and every statistic matches the NCHW pass."""
    from common.engine.forward import engine_layout, to_layout

    torch.manual_seed(0)
    m = build_model("resnet18", num_classes=10).eval()
    x = torch.randn(6, 3, 64, 64)
    assert engine_layout(m) is torch.channels_last
    assert engine_layout(nn.Sequential(nn.Linear(4, 2))) is None
    ref, lg = collect_stats(m, x, 4, "cpu", outputs=True)
    cl = to_layout(build_model("resnet18", num_classes=10).eval(), torch.channels_last)
    cl.load_state_dict(m.state_dict())
    assert cl.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got, lg2 = collect_stats(cl, x, 4, "cpu", outputs=True)
    assert torch.allclose(lg, lg2, atol=1e-4)
    for k, r in ref.layers.items():
        g = got.layers[k]
        assert r.in_count == g.in_count and r.out_count == g.out_count
        assert torch.allclose(r.in_sq, g.in_sq, rtol=1e-4, atol=1e-6 * float(r.in_sq.max())), k
        assert torch.allclose(r.out_sum, g.out_sum, rtol=1e-4, atol=1e-3), k


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_statistics_kept_per_batch_and_folded_later_equal_those_added_every_batch(monkeypatch, layout):
    """On a GPU each hook keeps one reduction per batch and folds them into the sums every few
    batches and when the pass ends (the hooks' host time is what a GPU pass waits on). The same
    arithmetic run here on the CPU gives every statistic the per-batch path gives: counts
    exactly, sums to float64 rounding, also when folding happens mid-pass (every 2 batches of 7)
    and for fully-connected inputs."""
    from common.engine import stats as S
    from common.engine.forward import to_layout

    torch.manual_seed(2)
    m = build_model("resnet18", num_classes=10).eval()
    if layout == "channels_last":
        to_layout(m, torch.channels_last)
    x = torch.randn(13, 3, 40, 40)
    now, lg = collect_stats(m, x, 2, "cpu", outputs=True)
    monkeypatch.setattr(S, "_deferred", lambda t: True)
    monkeypatch.setattr(S, "_FOLD", 2)
    folded, lg2 = collect_stats(m, x, 2, "cpu", outputs=True)
    assert torch.equal(lg, lg2)
    for k, a in now.layers.items():
        b = folded.layers[k]
        assert a.in_count == b.in_count and a.out_count == b.out_count, k
        assert torch.equal(a.out_fire, b.out_fire), k
        tol = 1e-12 if layout == "nchw" or k == "fc" else 1e-5
        assert torch.allclose(a.in_sq, b.in_sq, rtol=tol), k
        assert torch.allclose(a.out_sum, b.out_sum, rtol=tol, atol=1e-12), k
    assert now.layers["fc"].in_sq.abs().sum() > 0


def test_the_fused_output_statistics_kernel_gives_pytorchs_sums_and_counts():
    """On a GPU the output hook reads each channels_last activation once, in a Triton kernel.
    Interpreted here on the CPU: every channel's count of positive values is exact and its sum
    of them matches PyTorch's, for row and channel counts that fill no tile exactly, with zeros
    and negatives; a CPU tensor is never sent to it by the hook."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = """
import torch
from common.engine.kernels import positive_sum_count
torch.manual_seed(0)
for r, c in [(1, 1), (5, 3), (64, 65), (2500, 130), (3, 300)]:
    y = torch.randn(r, c)
    y[y.abs() < 0.2] = 0.0
    s, n = positive_sum_count(y)
    assert n.dtype == torch.int64 and s.dtype == torch.float64
    assert torch.equal(n, (y > 0).sum(0)), (r, c)
    assert torch.allclose(s, y.clamp_min(0).double().sum(0), rtol=1e-6, atol=1e-6), (r, c)
try:
    positive_sum_count(torch.randn(4, 3).t())
    raise SystemExit("a strided tensor was accepted")
except ValueError:
    pass
print("kernel ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "kernel ok" in out.stdout, out.stderr[-2000:]
    from common.engine import kernels
    from common.engine.forward import to_layout

    y = to_layout(nn.Conv2d(3, 8, 3), torch.channels_last)(torch.randn(2, 3, 9, 9)).detach()
    assert kernels.fusable(y) is None  # on the CPU the hook reduces in cache-sized pieces


def test_a_fused_kernel_that_cannot_run_is_reported_once_and_the_statistics_still_come(monkeypatch):
    """Triton needs a working CUDA toolchain where it runs. If the kernel cannot be built or
    launched, the first attempt warns once, the hook reduces with PyTorch, and the kernel is not
    tried again in that process. (The GPU is stood in for: the kernel is made to apply on the
    CPU and to fail.)"""
    import warnings

    from common.engine import kernels

    torch.manual_seed(3)
    m = build_model("smallcnn", num_classes=10).eval()
    x = torch.randn(20, 1, 8, 8)
    want, _ = collect_stats(m, x, 8, "cpu", outputs=True)
    calls = []

    def broken(rows):
        calls.append(rows.shape)
        raise RuntimeError("ptxas not found")

    monkeypatch.setattr(kernels, "_failed", [])
    monkeypatch.setattr(kernels, "fusable", lambda y: None if kernels._failed else y.flatten(2).transpose(1, 2))
    monkeypatch.setattr(kernels, "positive_sum_count", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = collect_stats(m, x, 8, "cpu", outputs=True)
    assert len(calls) == 1 and len(kernels._failed) == 1
    assert [str(w.message) for w in caught if "fused output statistics" in str(w.message)] == [
        "fused output statistics unavailable on this GPU (RuntimeError: ptxas not found); using PyTorch's reductions"]
    for k, a in want.layers.items():
        assert torch.equal(a.out_fire, got.layers[k].out_fire) and torch.equal(a.out_sum, got.layers[k].out_sum), k
