"""Output restriction: which classes a user never gets, decided from the adapted model's own
predictions (no labels), applied as pruned output rows in the mask and as -inf logits while the
stop rule judges (the wrapper and the compaction that keep it live in common/model/restricted.py)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from common.model.architectures import prunable_layers
from common.model.mask import Mask


def restricted_classes(logits: torch.Tensor, min_frac: float, margin: float = 0.0) -> list[int]:
    """The classes that, on at least `min_frac` of the user's samples (at least one), are the
    prediction, or the runner-up of an unsure prediction (top probability less than `margin`
    above it). Under a shift the adapted model still confuses some of the user's classes; a class
    that is always second to an unsure first is one the user may well have. (24 styled digits
    users: the top-1 rule alone removed 2 classes they have, this one none; on 30 users holding
    2-3 classes it still removes 206 of their 225 absent classes, top-1 alone 218.)"""
    pred = logits.argmax(1)
    if margin > 0:
        top = torch.softmax(logits.float(), 1).topk(2, 1)
        unsure = (top.values[:, 0] - top.values[:, 1]) < margin
        pred = torch.cat([pred, top.indices[unsure, 1]])
    counts = torch.bincount(pred, minlength=logits.shape[1])
    keep = torch.nonzero(counts >= max(1, math.ceil(min_frac * len(logits)))).flatten().tolist()
    return keep or [int(counts.argmax())]


def doubtful_removals(logits: torch.Tensor, kept: list[int], min_frac: float) -> list[int]:
    """Removed classes that a looser criterion says the user may have: mean predicted probability
    over the user's samples at least min_frac / 2 (an absent class of a confident model gets far
    less; a class the model keeps confusing with another gets more)."""
    mean = torch.softmax(logits.float(), 1).mean(0)
    return [c for c in torch.nonzero(mean >= min_frac / 2).flatten().tolist() if c not in set(kept)]


def apply_restriction(model: nn.Module, mask: Mask, classes: list[int]) -> Mask:
    """Prune the output rows of classes this user never gets; returns the new mask."""
    last = list(prunable_layers(model))[-1]
    held = mask.held()  # where the mask was made: a GPU candidate stays on the GPU
    drop = torch.ones(held[last].shape[0], dtype=torch.bool)
    drop[classes] = False
    out = held[last].clone()  # the other layers' tensors are shared, never written
    out[drop.to(out.device)] = False
    return Mask({**held, last: out})


def restrict_logits(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """In place, as OutputRestricted does: excluded classes get -inf."""
    drop = torch.ones(logits.shape[1], dtype=torch.bool)
    drop[classes] = False
    logits[:, drop] = -math.inf
    return logits
