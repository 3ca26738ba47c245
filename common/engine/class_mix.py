"""Class-mix recalibration (S43): BatchNorm statistics that follow a user's shift without
absorbing the user's class mix. The vendor records each class's mean and mean square per
BatchNorm channel (recorded_moments); the device estimates its class mix from pseudo-labels that
cannot have absorbed it and computes the statistics that mix alone would give each channel
(class_mix); the recalibration then moves each channel only by what the mix does not predict
(common.engine.bn.class_mix_stats). A user holding the vendor's own mix is recalibrated in full."""
from __future__ import annotations

import torch
import torch.nn as nn

from common.engine.bn import bn_layers
from common.engine.class_prior import spread
from common.model.architectures import prunable_layers
from common.model.checkpoint import VENDOR_LIMITS

MOMENT_VALUES = VENDOR_LIMITS["moment_values"]  # the most a vendor record carries, as a device accepts


def recorded_moments(sums: list) -> list | None:
    """The vendor record's class_moments from adapt.class_sums: per BatchNorm layer, each class's
    channel means and mean squares to six significant digits; None where they would exceed
    MOMENT_VALUES (a model of many classes and channels: the device then recalibrates as before)."""
    moments = [(s1 / cnt[:, None].clamp_min(1), s2 / cnt[:, None].clamp_min(1)) for s1, s2, cnt in sums]
    if sum(2 * m.numel() for m, _ in moments) > MOMENT_VALUES:
        return None
    sig = lambda t: [[float(f"{v:.6g}") for v in row] for row in t.tolist()]  # noqa: E731
    return [{"mean": sig(m), "square": sig(q)} for m, q in moments]


def moments_for(model: nn.Module, meta: dict | None) -> list | None:
    """The checkpoint's per-class moments as (mean, mean square) tensors of (classes, channels) per
    BatchNorm layer, if they fit this model's layers and its number of outputs; else None."""
    rec = (meta or {}).get("class_moments")
    bns = bn_layers(model)
    if not isinstance(rec, list) or len(rec) != len(bns) or not bns:
        return None
    classes = getattr(list(prunable_layers(model).values())[-1], "out_features", None)
    out = []
    for layer, m in zip(rec, bns):
        try:
            mean, square = (torch.tensor(layer[k], dtype=torch.float32) for k in ("mean", "square"))
        except (TypeError, KeyError, ValueError):
            return None
        if mean.dim() != 2 or mean.shape != square.shape or mean.shape != (classes, m.num_features):
            return None
        out.append((mean, square))
    return out


def class_mix(moments: list, pi: torch.Tensor) -> list:
    """Per BatchNorm layer, the mean and variance each channel would have over the vendor's data
    drawn in the class mix `pi` (S43): what a user holding that mix moves a channel to without
    any shift of its own."""
    pi = pi.float() / pi.float().sum().clamp_min(1e-12)
    out = []
    for mean, square in moments:
        m = pi @ mean
        out.append((m, (pi @ square - m * m).clamp_min(1e-5)))
    return out


def pseudo_label_share(logits: torch.Tensor) -> float:
    """Over what share of the classes hard pseudo-labels spread: exp of the entropy of their
    frequencies, over the number of classes (a user holding 3 of 10 classes evenly: 0.3)."""
    return spread(torch.bincount(logits.argmax(1), minlength=logits.shape[1])) / logits.shape[1]
