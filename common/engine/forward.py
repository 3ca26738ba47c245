"""The engine's forward passes: one batched pass over a user's data with usage hooks, the
penultimate features a head is built from, and the memory layout the passes run in."""
from __future__ import annotations

import torch
import torch.nn as nn

from common.engine.stats import StatsCollector
from common.model.architectures import prunable_layers
from common.model.batches import BATCH_SIZE, pass_logits, run_logits, unorder


def forward_pass(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
                 hooks: bool | None = None, classes: bool = False, first: torch.Tensor | None = None,
                 means: bool = False):
    """One pass over x in batches, in the model's current mode: (logits on CPU, in the order of x;
    usage statistics or None). `hooks`: None for no statistics, else whether to collect output
    statistics too; `classes`: per pseudo-class sums of fully-connected inputs as well; `means`:
    each layer's mean input too; `first`: sample indices that make up the first batches (see
    batches)."""
    if hooks is None:
        return run_logits(model, x, batch_size, device, first), None
    with StatsCollector(model, hooks, classes, means) as col:
        logits = pass_logits(model, x, batch_size, device, first)
    col.stats.samples = len(x)
    return unorder(logits, first), col.stats


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
        return unorder(torch.cat(self.parts), first)


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor, batch_size: int = BATCH_SIZE, device: str = "cpu"):
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


def engine_layout(model: nn.Module):
    """The memory format the engine runs a model's passes in: channels_last for a convolutional
    model (faster on CPUs and GPUs alike, docs/engine_cost.md), else None (as given)."""
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
