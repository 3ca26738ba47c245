"""Forward passes only: one batched pass over a user's data (optionally with usage hooks or the
penultimate features), and BatchNorm recalibration, which is a forward pass in train mode."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.models import prunable_layers
from common.stats import StatsCollector


def _first_order(n: int, first: torch.Tensor) -> torch.Tensor:
    """Sample order of a pass that takes `first` first: those indices, then the rest in order."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[first] = False
    return torch.cat([first, torch.nonzero(rest).flatten()])


def _selections(n: int, batch_size: int, first: torch.Tensor | None = None):
    """What each batch takes of n samples: slices in order; with `first` (sample indices), those
    samples come first, in batches of their own, then the rest in order (index tensors)."""
    if first is None:
        for i in range(0, n, batch_size):
            yield slice(i, i + batch_size)
        return
    order = _first_order(n, first)
    for part in (order[:len(first)], order[len(first):]):
        for i in range(0, len(part), batch_size):
            yield part[i:i + batch_size]


def batches(x: torch.Tensor, batch_size: int, first: torch.Tensor | None = None):
    """x in batches of `batch_size`; with `first` (sample indices), those samples come first, in
    batches of their own, then the rest in order."""
    for sel in _selections(len(x), batch_size, first):
        yield x[sel]


# A GPU pass keeps the host at most this many batches ahead of the model: enough for the host
# to gather and copy the next batch (4-5 ms for ResNet50's 64 images at 224) while the GPU runs
# the queued ones (about 9 ms each on an H100), with the batches' memory bounded at a few however
# large the user's data is
_IN_FLIGHT = 3


def _copy_stream(device) -> torch.cuda.Stream:
    """The side stream a device's batches are copied on, one per device for the process."""
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _COPY_STREAMS:
        _COPY_STREAMS[idx] = torch.cuda.Stream(idx)
    return _COPY_STREAMS[idx]


_COPY_STREAMS: dict = {}


def device_batches(x: torch.Tensor, batch_size: int, device: str, first: torch.Tensor | None = None):
    """batches(x, ...) on `device`. To a GPU from the CPU each batch is gathered straight into
    pinned memory and copied without the host waiting: a pageable copy blocks the host for the
    whole transfer (0.068 s of ResNet50's 0.219 s pass over 1,000 images at 224 on an H200, the
    GPU idle meanwhile), and the probe-first order gathered every batch into pageable memory
    before that copy (0.1 s more). The copies run on a side stream, so the next batch crosses
    while the model runs on this one: on the compute stream they were 11.5 ms of ResNet50's
    1,000-image pass that nothing overlapped. Alternated in one process on an H200 (1,000 images
    at 224): NCHW inference 1.00 -> 0.94, channels_last 0.84 -> 0.78, which is what that pass
    takes with the data already on the GPU."""
    if not str(device).startswith("cuda") or x.is_cuda:
        for b in batches(x, batch_size, first):
            yield b.to(device)
        return
    compute = torch.cuda.current_stream(device)
    side = _copy_stream(device)
    queued = []  # per batch handed out: an event on the compute stream after the work queued for it
    for sel in _selections(len(x), batch_size, first):
        if len(queued) >= _IN_FLIGHT:
            # the host stays at most _IN_FLIGHT batches ahead of the model: the batches' memory on
            # the GPU and in pinned memory stays bounded (the caching host allocator itself
            # reuses a pinned buffer only once its copy has finished)
            queued.pop(0).synchronize()
        if isinstance(sel, slice):  # a view of x: one copy into pinned memory
            part = x[sel]
            pinned = torch.empty(part.shape, dtype=x.dtype, pin_memory=True)
            pinned.copy_(part)
        else:  # probe-first order: gathered straight into pinned memory
            pinned = torch.empty((len(sel), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
            torch.index_select(x, 0, sel, out=pinned)
        # the model waits for the copy; the copy waits for nothing the model does (its memory
        # comes from the side stream's own blocks, each reused only after record_stream's uses)
        with torch.cuda.stream(side):
            b = pinned.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        compute.wait_event(copied)
        b.record_stream(compute)  # used on the compute stream: its memory is not reused before that is done
        yield b
        mark = torch.cuda.Event()
        mark.record(compute)  # the caller asks for the next batch: this one's work is queued
        queued.append(mark)


def _unorder(logits: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """Logits of a pass that took `first` first, back in the order of x."""
    if first is None:
        return logits
    out = torch.empty_like(logits)
    out[_first_order(len(logits), first)] = logits
    return out


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: str, first) -> torch.Tensor:
    # the logits stay on the device until the pass ends: one copy back, not a host sync per batch
    return torch.cat([model(b) for b in device_batches(x, batch_size, device, first)]).float().cpu()


def forward_pass(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
                 hooks: bool | None = None, classes: bool = False, first: torch.Tensor | None = None):
    """One pass over x in batches, in the model's current mode: (logits on CPU, in the order of x;
    usage statistics or None). `hooks`: None for no statistics, else whether to collect output
    statistics too; `classes`: per pseudo-class sums of fully-connected inputs as well; `first`:
    sample indices that make up the first batches (see batches)."""
    if hooks is None:
        return _unorder(_logits(model, x, batch_size, device, first), first), None
    with StatsCollector(model, hooks, classes) as col:
        logits = _logits(model, x, batch_size, device, first)
    col.stats.samples = len(x)
    return _unorder(logits, first), col.stats


@torch.no_grad()
def batched_forward(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str = "cpu"):
    """Logits of x in eval mode."""
    model.eval()
    return forward_pass(model, x, batch_size, device)[0]


class capture_features:
    """Within the block, every pass records the penultimate features (the input of the last
    prunable layer) per batch, on the CPU; .features(first) gives them in the order of x for a
    pass that took `first` first. The statistics pass gives a head its features for free."""

    def __init__(self, model: nn.Module):
        self.last = list(prunable_layers(model).values())[-1]
        self.parts = []

    def __enter__(self):
        self.parts = []
        self.handle = self.last.register_forward_pre_hook(
            lambda _m, args: self.parts.append(args[0].detach().flatten(1).float().cpu()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False

    def features(self, first: torch.Tensor | None = None) -> torch.Tensor:
        return _unorder(torch.cat(self.parts), first)


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str = "cpu"):
    """(penultimate features = the input of the last prunable layer, logits, that layer), in
    eval mode, one pass."""
    model.eval()
    last = list(prunable_layers(model).values())[-1]
    feats = []
    h = last.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().flatten(1).float().cpu()))
    try:
        logits = forward_pass(model, x, batch_size, device)[0]
    finally:
        h.remove()
    return torch.cat(feats), logits, last


def bn_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def load_bn_stats(bns: list, stats: list) -> None:
    """Set BatchNorm layers' running statistics to (mean, var) pairs as bn_prior returns them."""
    for m, (mean, var) in zip(bns, stats):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def bn_prior(model: nn.Module) -> list:
    """The model's BatchNorm statistics now (the base's, before any adaptation): what a partial
    recalibration keeps part of. One (mean, var) pair per BatchNorm layer, in module order."""
    return [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in bn_layers(model)]


def explained_weight(mean, var, mu_b, var_b, spread, kappa: float, eps: float = 1e-5):
    """Per channel, how far its statistics follow the user: the share of their move that the
    user's class mix cannot explain. `spread` is the channel's between-class share of variance on
    the vendor's data (eta^2, common.adapt.class_spread): a channel whose mean no class moves
    follows the user fully; a class-specific one only where its move exceeds kappa x eta^2.
    move^2 is the squared mean shift plus the squared log-variance change, in base units."""
    move = (mean - mu_b) ** 2 / (var_b + eps) + torch.log((var + eps) / (var_b + eps)) ** 2
    return (1 - kappa * spread.to(move) / move.clamp_min(1e-12)).clamp(0, 1)


def _mixed_forward(m, prior, sums: list, weight: float, spread=None, kappa: float = 1.0):
    """A BatchNorm forward that normalizes each batch by the mixture of the base's distribution
    (weight 1 - w) and the batch's own (weight w): mean (1-w) mu_b + w mu, variance the mixture's,
    (1-w) var_b + w var + w (1-w) (mu - mu_b)^2, with w per channel where `spread` is given.
    Layers downstream see the features as the kept model computes them; the batch's own moments
    are summed, weighted by its samples, into `sums`."""
    mu_b, var_b = prior

    def forward(x):
        # the batch's statistics from BatchNorm's own kernel (torch.var_mean over a channels_last
        # map took 6x as long on this CPU), with its output: the layer's where it follows the batch
        out, mean, invstd = torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps)
        var = (invstd.pow(-2) - m.eps).clamp_min(0)
        n, b = x.numel() // x.shape[1], x.shape[0]
        sums[0] += b
        sums[1] = sums[1] + mean * b
        sums[2] = sums[2] + var * (n / max(n - 1, 1)) * b  # unbiased, as BatchNorm's running_var
        if weight == 1.0 and spread is None:
            return out
        mean_m, var_m = _mix(mean, var, mu_b.to(mean), var_b.to(var), weight, spread, kappa)
        return F.batch_norm(x, mean_m, var_m, m.weight, m.bias, False, 0.0, m.eps)
    return forward


def _mix(mean, var, mu_b, var_b, weight: float, spread, kappa: float):
    w = weight if spread is None else weight * explained_weight(mean, var, mu_b, var_b, spread, kappa)
    return (1 - w) * mu_b + w * mean, (1 - w) * var_b + w * var + w * (1 - w) * (mean - mu_b) ** 2


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
                   hooks: bool | None = None, classes: bool = False, first: torch.Tensor | None = None,
                   weight: float = 1.0, prior: list | None = None, profile=None, spread: list | None = None,
                   kappa: float = 1.0):
    """Re-estimate BatchNorm running statistics on the user's data (forward only). The same pass
    gives the logits (each batch normalized by its own statistics: with one batch, what the
    recalibrated model outputs) and, with `hooks` not None, usage statistics of the recalibrated
    model (hooks=True: output statistics too); returns (logits, stats). `first`: see batches.

    A partial recalibration (`weight` < 1, a `profile` or a `spread`): each layer keeps the
    mixture of the base's statistics (`prior`, from bn_prior; default the model's own now) and the
    user's, the user's weighted `weight` x profile(i, layers) (layer i's share; default 1) x, with
    `spread` (one tensor per layer), each channel's explained_weight. The pass normalizes by that
    mixture, so its logits and usage statistics are the kept model's. weight 1 everywhere is full
    recalibration (AdaBN), which takes BatchNorm's own train-mode path."""
    bns = bn_layers(model)
    if weight < 1.0 or profile is not None or spread is not None:
        prior = prior if prior is not None else bn_prior(model)
        sums = [[0, 0.0, 0.0] for _ in bns]
        ws = [weight * (1.0 if profile is None else float(profile(i, len(bns)))) for i in range(len(bns))]
        sp = spread if spread is not None else [None] * len(bns)
        # a layer that keeps the base's statistics runs BatchNorm's own eval forward on them
        follows = [w > 0 for w in ws]
        for m, pr, s, w, spr, f in zip(bns, prior, sums, ws, sp, follows):
            if f:
                m.forward = _mixed_forward(m, pr, s, w, spr, kappa)
            else:
                load_bn_stats([m], [pr])
        try:
            out = forward_pass(model, x, batch_size, device, hooks=hooks, classes=classes, first=first)
        finally:
            for m, f in zip(bns, follows):
                if f:
                    del m.forward
        for m, (mu_b, var_b), (n, s1, s2), w, spr in zip(bns, prior, sums, ws, sp):
            if n:
                mean, var = _mix(s1 / n, s2 / n, mu_b.to(s1), var_b.to(s1), w, spr, kappa)
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        model.eval()
        return out
    saved = [m.momentum for m in bns]
    seen = [0] * len(bns)

    def weigh(i):
        # the running statistics average the batches weighted by their samples (momentum None
        # weighs batches equally: a last batch of 2 counted as much as one of 256)
        def pre(m, args):
            b = args[0].shape[0]
            seen[i] += b
            m.momentum = b / seen[i]
        return pre

    handles = [m.register_forward_pre_hook(weigh(i)) for i, m in enumerate(bns)]
    for m in bns:
        m.reset_running_stats()
        m.train()
    try:
        return forward_pass(model, x, batch_size, device, hooks=hooks, classes=classes, first=first)
    finally:
        for h in handles:
            h.remove()
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def engine_layout(model: nn.Module):
    """The memory format the engine runs a model's passes in: channels_last for a convolutional
    model, else None (as given). Measured against the model's own NCHW inference pass: on this
    CPU (1 thread) inference 0.54x (digits CNN), 0.73x (KWS), 0.67-0.72x (ResNet18/50 at 224), a
    BatchNorm-recalibrating pass 0.60-0.75x where NCHW takes 0.84-1.39x; on an H200 (1,000 images
    at 224, batch 64) inference 0.74-0.88x, the default personalization 2.92 -> 2.38x (ResNet50)
    and 2.95 -> 2.24x (ResNet18) of an NCHW inference pass."""
    return torch.channels_last if any(isinstance(m, nn.Conv2d) for m in model.modules()) else None


@torch.no_grad()
def settle_layout(model: nn.Module, fmt, sample: torch.Tensor, device: str = "cpu"):
    """Put the model in memory format `fmt` if it runs there: one eval-mode forward of `sample` (a
    sample or two) decides. A model whose forward calls .view() on a conv output (fine in NCHW)
    fails in channels_last; it is put back as it was and None returned. Returns the format used."""
    if fmt is None:
        return None
    to_layout(model, fmt)
    was_training = model.training
    try:
        model.eval()
        model(sample.to(device))
        return fmt
    except RuntimeError:
        to_layout(model, torch.contiguous_format)
        return None
    finally:
        model.train(was_training)


def to_layout(model: nn.Module, fmt) -> nn.Module:
    """The model's 4-D weights in memory format `fmt` (None: leave as is), in place. The values,
    and what the model computes, do not change; only the order in memory, and with it which
    kernels run (float rounding may differ in the last bits)."""
    return model.to(memory_format=fmt) if fmt is not None else model


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{name}' (choose from: auto, cpu, cuda)")
    return name
