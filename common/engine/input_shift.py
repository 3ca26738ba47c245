"""On a network without BatchNorm, the input side follows the user through its first layer's bias
(S57): each of its channels is moved to average, on the user's data, what the vendor's data of the
same classes gave it.

- A network without BatchNorm has no statistics to recalibrate: a style (thick strokes, low
  contrast) reaches every layer as it is, and the rest of the default can only keep the base's
  layer and prune carefully.
- The vendor records, per class, the mean of each channel of the first prunable layer's output
  over its training data (`first_layer_means`, classes x channels numbers).
- The device measures the same channels' means over its data, with the base, in one inference pass
  whose posteriors also give the user's class mix (their average). The target is the vendor's
  class means under that mix: a class mix alone moves nothing, a style's move of the means is
  taken out. The difference is added to the first layer's bias, so the model keeps its shape, its
  mask and its export; nothing else changes.
- The move is kept only where it spreads the model's mean prediction over the user's data over
  more classes than the base's (read on the statistics pass that follows it): a shift collapses
  predictions onto a few classes, and a move that undoes it spreads them again; where it narrows
  them, the shift was not a move of the means (a sensor that mixes its inputs), and the first
  layer is put back, the statistics pass run again (as P10 checks the federation's blend).
- Means only, and weighted by how much data the user has: matching the vendor's variances as
  well, or moving a handful of samples' means in full, gains more on styled users but costs users
  holding one or two classes in a style a third of their held-out samples (docs/personalization.md,
  S57)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from common.engine.bn import bn_layers
from common.engine.heads import spread_classes, spread_of
from common.engine.hidden_shift import over_labelled
from common.model.architectures import prunable_layers
from common.model.batches import BATCH_SIZE
from common.model.checkpoint import VENDOR_LIMITS, recorded_rows

# the move is weighted n / (n + EVIDENCE) on n samples: a handful of samples moves the means by
# their own content as much as by a style. A prior worth as many samples as the search bound's
# (n / (n + 32)); leave-one-cohort-out on the users it puts below their base, it is chosen in 5 of
# 6 folds (docs/personalization.md, S57)
EVIDENCE = 32


def _first(model: nn.Module) -> tuple[str, nn.Module]:
    return next(iter(prunable_layers(model).items()))


def _channel_means(h: torch.Tensor) -> torch.Tensor:
    """Per sample, each channel's mean over positions: (N, C)."""
    h = h.detach().float()
    return h.mean(tuple(range(2, h.dim()))) if h.dim() > 2 else h


# ---------------------------------------------------------------- vendor side (labels allowed)
@torch.no_grad()
def first_layer_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH_SIZE) -> dict:
    """The vendor's record: the first prunable layer's name and, per class, each output channel's
    mean over the vendor's data in eval mode (a class it has no sample of: the overall mean); None
    where they would be more numbers than a device accepts."""
    name, layer = _first(model)
    n_cls = list(prunable_layers(model).values())[-1].weight.shape[0]
    acc = {}

    def add(labels, h):
        per = _channel_means(h)
        onehot = nn.functional.one_hot(labels.long(), n_cls).float()
        s = (onehot.T @ per, onehot.sum(0))
        acc["s"] = s if "s" not in acc else (acc["s"][0] + s[0], acc["s"][1] + s[1])

    over_labelled(model, x, y, {layer: add}, outputs=True, batch_size=batch_size)
    sums, counts = acc["s"]
    overall = sums.sum(0) / counts.sum()
    means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], overall)
    if means.numel() > VENDOR_LIMITS["first_values"]:  # more than a device accepts: none, and no move
        return {"first_layer_means": None}
    return {"first_layer_means": {"layer": name, "mean": [[round(float(v), 5) for v in row] for row in means]}}


# ---------------------------------------------------------------- device side
def record_for(model: nn.Module, meta: dict | None) -> torch.Tensor | None:
    """The record as a (classes, channels) tensor, if it names this model's first layer and fits
    its channels and outputs; else None."""
    name, layer = _first(model)
    outputs = list(prunable_layers(model).values())[-1].weight.shape[0]
    return recorded_rows(meta, "first_layer_means", name, (outputs, layer.weight.shape[0]))


def applies(model: nn.Module, meta: dict | None) -> bool:
    """A network without BatchNorm whose first layer has a bias, and the vendor's record of it."""
    _, layer = _first(model)
    return not bn_layers(model) and getattr(layer, "bias", None) is not None and record_for(model, meta) is not None


@torch.no_grad()
def shift(model: nn.Module, x: torch.Tensor, meta: dict, batch_size: int = BATCH_SIZE,
          device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """What the first layer's bias moves by (C,), from one pass of the base over the user's data in
    eval mode: the vendor's class means under the user's class mix (its average posterior) less the
    user's means, weighted by the user's evidence; and what the device saw."""
    return _pass(model, x, meta, batch_size, device)[:2]


def _pass(model, x, meta, batch_size, device):
    """shift's pass: (delta, info, the base's mean prediction's spread over classes)."""
    vendor = record_for(model, meta)
    _, layer = _first(model)
    total = {"m": 0.0, "p": 0.0}

    def hook(_m, _a, out):
        total["m"] = total["m"] + _channel_means(out).sum(0)

    handle = layer.register_forward_hook(hook)
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            total["p"] = total["p"] + model(x[i:i + batch_size].to(device)).float().softmax(1).sum(0)
    finally:
        handle.remove()
    user = (total["m"] / len(x)).cpu()
    mix = (total["p"] / len(x)).cpu()
    delta = (mix @ vendor - user) * (len(x) / (len(x) + EVIDENCE))
    spread = vendor.std(0).mean()  # how far the vendor's class means lie apart, per channel
    info = {"first_layer_shift": round(float(delta.abs().mean() / spread.clamp(min=1e-8)), 4)}
    return delta, info, spread_of(mix)


@torch.no_grad()
def apply(model: nn.Module, delta: torch.Tensor) -> None:
    """Move the first layer's bias by delta (in place)."""
    _, layer = _first(model)
    layer.bias.add_(delta.to(layer.bias.device, layer.bias.dtype))


@dataclass
class Move:
    """A move made (move): by how much, the base's spread of predictions, what the device saw, and
    the samples its pass pushed through the model."""
    delta: torch.Tensor
    before: float
    info: dict
    samples: int


@torch.no_grad()
def move(model: nn.Module, x: torch.Tensor, meta: dict, batch_size: int = BATCH_SIZE,
         device: str = "cpu") -> Move:
    """The first layer follows the user (in place), to be kept or put back by keep."""
    delta, info, before = _pass(model, x, meta, batch_size, device)
    apply(model, delta)
    return Move(delta, before, dict(info, first_layer_follows=True), len(x))


def keep(model: nn.Module, moved: Move, logits: torch.Tensor, check: bool = True) -> bool:
    """Whether the move stays: where the moved model's `logits` on the user's data (the statistics
    pass's, at no pass of its own) spread its mean prediction over more classes than the base's did
    (`check` False: always, an ablation); else it is put back (in place). Notes both in the move's
    info."""
    after = spread_classes(logits)
    wider = after > moved.before or not check
    if not wider:
        apply(model, -moved.delta)
    moved.info.update(first_layer_follows=bool(wider), first_layer_spread=[round(moved.before, 3), round(after, 3)])
    return wider
