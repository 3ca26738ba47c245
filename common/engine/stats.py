"""Usage statistics from forward passes only. Hooks keep running sums per prunable layer, so
memory does not grow with the number of samples."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common.engine import kernels
from common.model.architectures import following_batchnorm, prunable_layers


def eta_squared(cls_sum: torch.Tensor, cls_count: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    """Per feature, the correlation ratio: the variance between the classes' means over the total
    variance, in [0, 1] (0 where a feature does not vary). `cls_sum`: (classes, features) sums per
    class, `cls_count`: samples per class, `sq_sum`: (features,) sum of squares over all samples."""
    n = cls_count.sum()
    mean = cls_sum.sum(0) / n
    total = (sq_sum / n - mean ** 2).clamp_min(0)
    seen = cls_count > 0
    mu_c = cls_sum[seen] / cls_count[seen, None]
    between = ((cls_count[seen, None] / n) * (mu_c - mean) ** 2).sum(0)
    return torch.where(total > 1e-12, (between / total.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(total))


@dataclass
class LayerStats:
    in_sq: torch.Tensor          # sum over samples/positions of x_j^2, per input feature/channel
    in_count: int = 0            # how many (sample, position) pairs went into in_sq
    in_total: torch.Tensor = None  # sum over in_samples samples of the input, shaped like one sample's
    in_samples: int = 0
    out_sum: torch.Tensor = None  # sum of post-ReLU output per unit/channel
    out_fire: torch.Tensor = None  # count of post-ReLU output > 0
    out_count: int = 0
    cls_sum: torch.Tensor = None  # fully-connected inputs only: (classes, features) sums per pseudo-class
    cls_count: torch.Tensor = None  # samples per pseudo-class (the model's own argmax)

    def input_mean(self) -> torch.Tensor:
        """The mean input over the user's data, shaped like one sample's (a map for a conv)."""
        return self.in_total / max(self.in_samples, 1)

    def input_norm(self) -> torch.Tensor:
        """RMS of each input feature over the user's data (||x_j|| up to a constant)."""
        return (self.in_sq / max(self.in_count, 1)).sqrt()

    def mean_activation(self) -> torch.Tensor:
        return self.out_sum / max(self.out_count, 1)

    def firing_rate(self) -> torch.Tensor:
        return self.out_fire / max(self.out_count, 1)

    def class_separation(self) -> torch.Tensor | None:
        """Per input feature, the correlation ratio eta = between-pseudo-class variance / total
        variance (0: the feature says nothing about this user's classes, 1: it alone separates
        them); None where per-class sums were not collected."""
        if self.cls_sum is None or self.in_count == 0:
            return None
        return eta_squared(self.cls_sum, self.cls_count, self.in_sq)


@dataclass
class UsageStats:
    layers: dict = field(default_factory=dict)
    samples: int = 0


def _per_channel_dims(t: torch.Tensor) -> list[int]:
    """Dimensions to reduce for per-channel sums of an (N, C, ...) or (N, C) tensor."""
    return [0] + list(range(2, t.dim()))


# A CPU hook reads a channels_last activation in pieces of about this many elements (1 MB of
# float32), as rows (sample, position) of its channels. Reduced whole, every temporary (squares,
# the clamp, the comparison) is as large as the activation (205 MB for ResNet50's 64 x 256 x 56
# x 56) and costs page faults and a trip to memory; a piece's stay in cache (docs/engine_cost.md:
# the measurements, and why this size).
_PIECE = 1 << 18


def _cpu_nhwc_pieces(t: torch.Tensor):
    """A CPU (N, C, H, W) tensor in channels_last as views (rows, C) of its (N*H*W, C) layout,
    about _PIECE elements each, to reduce over rows; None for any other tensor (a GPU reduces it
    whole, in one kernel)."""
    if t.is_cuda or not kernels.is_nhwc(t):
        return None
    return kernels.as_rows(t).split(max(1, _PIECE // t.shape[1]))  # views: no copy


# On a GPU a statistics pass is partly bound by the host: each torch call a hook makes costs
# host time (10-30 us) whether or not the GPU is busy, and ResNet50 runs 54 input hooks a batch.
# There each hook makes one reduction per batch and keeps it; the squares and float64 sums
# follow once per _FOLD batches. The kept reductions are each sample's norms per channel, a few
# tens of MB for ResNet50, however many samples the user has (docs/engine_cost.md).
_FOLD = 16


def _deferred(t: torch.Tensor) -> bool:
    """Whether a hook keeps its per-batch reductions to fold later (a GPU) or adds them now."""
    return t.is_cuda


def _sample_norms(x: torch.Tensor) -> torch.Tensor:
    """(samples or 1, channels): each sample's norm over its positions, per input channel; the
    norm over the batch for an (N, features) input. One reduction, no copy."""
    if kernels.is_nhwc(x):  # a view as (N, H*W, C): flatten(2) would copy the whole input first
        n, c = x.shape[:2]
        return torch.linalg.vector_norm(x.permute(0, 2, 3, 1).reshape(n, -1, c), dim=1)
    if x.dim() > 2:
        return torch.linalg.vector_norm(x.flatten(2), dim=2)
    return torch.linalg.vector_norm(x, dim=0, keepdim=True)


class _Pending:
    """A layer's per-batch reductions kept on the GPU until folded into its LayerStats."""

    def __init__(self, st: LayerStats):
        self.st, self.norms, self.sums, self.fires = st, [], [], []

    def fold(self):
        st = self.st
        if self.norms:
            st.in_sq += torch.cat(self.norms).double().pow(2).sum(0)
        if self.sums:
            st.out_sum += torch.stack(self.sums).double().sum(0)
            st.out_fire += torch.stack(self.fires).double().sum(0)
        self.norms, self.sums, self.fires = [], [], []


class StatsCollector:
    """Context manager: attach hooks, run forward passes, read `.stats`."""

    def __init__(self, model: nn.Module, outputs: bool = True, classes: bool = False, means: bool | set = False):
        """outputs=False skips mean activation and firing rate (only the firing scorer and the
        drift rule need them), which makes the pass noticeably cheaper. classes=True also sums
        each fully-connected layer's inputs per pseudo-class (the model's argmax for the batch);
        means=True (or a set of layer names: theirs) each layer's inputs over the samples."""
        self.model, self.layers = model, prunable_layers(model)
        mean_of = self.layers.keys() if means is True else (means or ())  # the layers whose inputs are summed
        bn_after = following_batchnorm(model)
        mods = dict(model.named_modules())
        self.stats = UsageStats()
        self.handles = []
        self._pending = {}  # fully-connected layer -> this batch's inputs, until the batch's predictions are known
        self._kept = []  # per layer, the reductions a GPU keeps until folded
        for name, layer in self.layers.items():
            w = layer.weight
            st = LayerStats(in_sq=torch.zeros(w.shape[1], dtype=torch.float64, device=w.device),
                            out_sum=torch.zeros(w.shape[0], dtype=torch.float64, device=w.device),
                            out_fire=torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
            self.stats.layers[name] = st
            kept = _Pending(st)
            self._kept.append(kept)
            self.handles.append(layer.register_forward_pre_hook(self._in_hook(st, kept, name in mean_of)))
            if classes and isinstance(layer, nn.Linear):
                st.cls_sum = torch.zeros(0, w.shape[1], dtype=torch.float64, device=w.device)
                st.cls_count = torch.zeros(0, dtype=torch.float64, device=w.device)
                self._pending[name] = None
            # Firing is judged after the layer's BatchNorm when it has one (conv -> bn -> relu).
            if outputs:
                out_mod = mods[bn_after[name]] if name in bn_after else layer
                self.handles.append(out_mod.register_forward_hook(self._out_hook(st, kept)))

        if self._pending:
            for name in self._pending:
                self.handles.append(self.layers[name].register_forward_pre_hook(self._keep_hook(name)))
            self.handles.append(model.register_forward_hook(self._class_hook))

    def _keep_hook(self, name):
        def hook(_mod, args):
            self._pending[name] = args[0].detach().flatten(1)
        return hook

    def _class_hook(self, _mod, _args, out):
        """After a batch: its predictions are the pseudo-classes its fully-connected inputs join."""
        pred = out.detach().argmax(1)
        for name, x in self._pending.items():
            st = self.stats.layers[name]
            c = out.shape[1]
            if st.cls_sum.shape[0] < c:
                st.cls_sum = torch.zeros(c, st.cls_sum.shape[1], dtype=torch.float64, device=st.cls_sum.device)
                st.cls_count = torch.zeros(c, dtype=torch.float64, device=st.cls_sum.device)
            st.cls_sum.index_add_(0, pred.to(st.cls_sum.device), x.double())
            st.cls_count += torch.bincount(pred, minlength=c).to(st.cls_count)
            self._pending[name] = None

    @staticmethod
    def _in_hook(st: LayerStats, kept: _Pending, means: bool):
        def hook(_mod, args):
            x = args[0].detach()
            st.in_count += x.numel() // x.shape[1]
            if means:  # the mean input as one sample's map (compensate); channels_last: as its rows
                t = (x.permute(0, 2, 3, 1).sum(0).permute(2, 0, 1) if kernels.is_nhwc(x) else x.sum(0)).double()
                st.in_total, st.in_samples = t if st.in_total is None else st.in_total + t, st.in_samples + len(x)
            # float32 sums over at most a piece's rows or a sample's positions, added up in float64
            if _deferred(x):  # a GPU: one reduction now, the rest every _FOLD batches
                kept.norms.append(_sample_norms(x))
                if len(kept.norms) >= _FOLD:
                    kept.fold()
                return
            pieces = _cpu_nhwc_pieces(x)
            if pieces is not None:  # channels_last on the CPU: the squares of a piece at a time
                for p in pieces:
                    st.in_sq += torch.square(p).sum(0).double()
            else:
                # NCHW: over each sample's positions first; a reduction over (N, H, W) at once
                # strides across the layout and costs several times as long. An (N, features)
                # input gives one row, the batch's norm
                st.in_sq += _sample_norms(x).double().pow(2).sum(0)
        return hook

    @staticmethod
    def _out_hook(st: LayerStats, kept: _Pending):
        def hook(_mod, _args, out):
            y = out.detach()
            st.out_count += y.numel() // y.shape[1]
            # counted in int32 (exact: a batch has far fewer than 2^31 positions per channel); a
            # bool tensor's default int64 sum cost ResNet50 in channels_last about 0.3 of an
            # inference pass more (all output hooks 0.66-0.76 -> 0.40 passes over the plain pass)
            pieces = _cpu_nhwc_pieces(y)
            if pieces is not None:  # channels_last on the CPU: a cache-sized piece at a time
                for p in pieces:
                    st.out_sum += p.clamp_min(0).sum(0).double()
                    st.out_fire += (p > 0).sum(0, dtype=torch.int32).double()
                return
            fused = kernels.positive_stats(y)  # a GPU in channels_last: one read (common/engine/kernels.py)
            if fused is not None:
                pos, fire = fused
            else:
                dims = _per_channel_dims(y)
                pos, fire = y.clamp_min(0).sum(dims), (y > 0).sum(dims, dtype=torch.int32)
            if _deferred(y):  # a GPU: added up every _FOLD batches
                kept.sums.append(pos)
                kept.fires.append(fire)
                if len(kept.sums) >= _FOLD:
                    kept.fold()
            else:
                st.out_sum += pos.double()
                st.out_fire += fire.double()
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for kept in self._kept:
            kept.fold()
