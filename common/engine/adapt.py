"""Label-free adaptation that is safe under label shift: which BatchNorm statistics follow the
user, decided per user without labels.

- The vendor records, with the base, what the device needs to tell a class mix from a shift: per
  BatchNorm channel its between-class share of variance (class_spread), the average input the
  model saw (input_profile), the last hidden layer's moments (hidden_shift.py, S26) and, per class,
  each channel's moments (class_mix.py, S43).
- A user holding a few classes moves the deep, class-specific channels; a new style, voice or
  room moves channels no class mix explains. Full recalibration (AdaBN) absorbs the class mix
  (ResNet18 users holding 2-3 classes: 0.98 -> 0.49); recalibrating only the channels whose move
  the class mix cannot explain does not.
- The check: full recalibration is kept when the layers past the input side moved beyond what the
  class mix and sampling noise explain (deep_shift), it predicts no more of the classes than that
  safe recalibration (two of slack) and agrees with it on most of the probe; otherwise only the
  input side (the BatchNorm layers up to the first with several channels) follows, or none.
- Whether the user's inputs look like the base's at all: common/engine/unlike.py."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine import class_mix as CM
from common.engine import input_shift as IS
from common.engine import unlike as UL
from common.engine import vendor_directions as VD
from common.engine.bn import bn_layers, explained_weight
from common.engine.hidden_shift import hidden_record, over_labelled
from common.engine.stats import eta_squared
from common.model.batches import BATCH_SIZE


# ---------------------------------------------------------------- vendor side (labels allowed)
@torch.no_grad()
def class_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH_SIZE) -> list:
    """Per BatchNorm layer, over the vendor's data in eval mode: per class, the sums of each
    channel's per-sample mean and mean square (over positions), and the class's sample count:
    [(sum_mean (K, C), sum_square (K, C), count (K,)), ...]."""
    bns = bn_layers(model)
    n_cls = int(y.max()) + 1
    acc = [None] * len(bns)

    def hook(i):
        def add(labels, h):
            h = h.float()
            per = h.mean(tuple(range(2, h.dim()))) if h.dim() > 2 else h  # (N, C)
            sq = (h ** 2).mean(tuple(range(2, h.dim()))) if h.dim() > 2 else h ** 2
            onehot = F.one_hot(labels, n_cls).float()
            s = [onehot.T @ per, onehot.T @ sq, onehot.sum(0)]
            acc[i] = s if acc[i] is None else [a + b for a, b in zip(acc[i], s)]
        return add

    over_labelled(model, x, y, {m: hook(i) for i, m in enumerate(bns)}, outputs=False, batch_size=batch_size)
    return acc


def vendor_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a base checkpoint carries for the device (model metadata, JSON-able and small)."""
    prof, sums = UL.input_profile(model, x), class_sums(model, x, y)
    # each class's samples (S55): the vendor's class mix, which the label-shift head moves away from
    return {"class_counts": torch.bincount(y.long(), minlength=VD.class_shape(model)[0]).tolist(),
            "class_spread": [[round(float(v), 4) for v in eta_squared(s1, cnt, s2.sum(0))] for s1, s2, cnt in sums],
            "class_moments": CM.recorded_moments(sums),
            "input_profile": {"shape": list(prof.shape), "values": [round(float(v), 5) for v in prof.flatten()]},
            **UL.level_record(x),
            **hidden_record(model, x, y), **IS.first_layer_record(model, x, y), **VD.record(model, x, y)}


# ---------------------------------------------------------------- device side
def spread_for(model: nn.Module, meta: dict | None) -> list | None:
    """The checkpoint's class spread as tensors, if it fits this model's BatchNorm layers."""
    rec = (meta or {}).get("class_spread")
    bns = bn_layers(model)
    if not isinstance(rec, list) or len(rec) != len(bns):
        return None
    out = []
    for vals, m in zip(rec, bns):
        if not isinstance(vals, list) or len(vals) != m.num_features:
            return None
        out.append(torch.tensor(vals, dtype=torch.float32).clamp(0, 1))
    return out


def stem_count(model: nn.Module) -> int:
    """How many BatchNorm layers make up the input side: up to the first with several channels
    (a one-channel input normalization, as in the KWS model, carries no style of its own)."""
    bns = bn_layers(model)
    return next((i for i, m in enumerate(bns) if m.num_features > 1), len(bns) - 1) + 1


def classes_predicted(logits: torch.Tensor, min_frac: float = 0.05) -> int:
    """How many classes are the top prediction for at least `min_frac` of the samples (at least one)."""
    counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    return int((counts >= max(1, math.ceil(min_frac * len(logits)))).sum())


# ---------------------------------------------------------------- the per-user decision
KAPPA = 3.0         # a channel follows the user where its move exceeds KAPPA x its class spread
AGREE = 0.8         # ... and agrees with it on at least this share of the probe (benchmark users whose full
                    # recalibration helps: 0.83 and above; few-class ResNet users it collapses: 0.34-0.89)
DEEP_SHIFT = 0.1    # full recalibration needs the layers past the input side to move beyond their class mix:
                    # at least this mean explained weight (leave-one-cohort-out: docs/adapt_study/loco.md)
CHECK_SAMPLES = 64  # the check's pass: at most this many of the probe's samples
AGREE_Z = 1.645     # the agreement fails only below AGREE by more than this many standard errors of an
                    # agreement of AGREE on the check's samples (a one-sided 95% test; S24)
SLACK = 2           # full recalibration may predict this many more classes than the safe one (chosen
                    # leave-one-cohort-out: docs/adapt_study/loco.md)


def agree_floor(n: int) -> float:
    """The lowest agreement on n samples that does not refute an agreement of AGREE (S24)."""
    return AGREE - AGREE_Z * math.sqrt(AGREE * (1 - AGREE) / max(n, 1))


def deep_shift(full: list, prior: list, spread: list, n_stem: int, kappa: float = KAPPA,
               noise: list | None = None) -> float | None:
    """How far the BatchNorm layers past the input side moved beyond what the user's class mix
    explains: the mean over their channels of explained_weight, full recalibration's statistics
    (`full`) against the base's (`prior`); None for a network with no such layer. A user holding
    a few classes of the base's own kind of input moves them little (ResNet18 users of 2-3 classes:
    0.015-0.068, full recalibration costs them 7-81 points); a new room, voice or style moves them
    much (0.18-0.88 on the benchmark's speech and styled users, where full recalibration gains).
    With `noise` (per layer past the input side, bn.sampling_noise), only what moved beyond chance (S28)."""
    ws = deep_weights(full, prior, spread, n_stem, kappa, noise)
    return None if ws is None else float(ws.mean())


def deep_weights(full, prior, spread, n_stem: int, kappa: float = KAPPA, noise=None) -> torch.Tensor | None:
    """deep_shift's explained weights, one per channel of the layers past the input side."""
    rows = list(zip(full, prior, spread))[n_stem:]
    noise = noise if noise is not None else [None] * len(rows)
    ws = [explained_weight(mu, var, mb.to(mu), vb.to(var), sp, kappa, noise=nz)
          for ((mu, var), (mb, vb), sp), nz in zip(rows, noise)]
    return torch.cat(ws) if ws else None


def stem_profile(model: nn.Module):
    """recalibrate_bn's profile that recalibrates the input side only (the rest keeps the base's)."""
    n = stem_count(model)
    return lambda i, _layers: float(i < n)
