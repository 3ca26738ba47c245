"""Output restriction: the classes a user never gets become impossible. Decided from the adapted
model's own predictions (no labels); applied as pruned output rows in the mask, as -inf logits
while the stop rule judges, as a wrapper at inference, and as dropped rows when compacting."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from common.mask import Mask
from common.models import build_model, prunable_layers


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


class OutputRestricted(nn.Module):
    """Only the classes this user's data is predicted as stay possible; other logits are -inf.
    `inner_index[i]` is the inner model's output for class `classes[i]` (after compaction the
    inner model has just those outputs)."""

    def __init__(self, inner: nn.Module, classes: list[int], num_classes: int, inner_index: list[int]):
        super().__init__()
        self.inner = inner
        self.num_classes = num_classes
        self.register_buffer("classes", torch.tensor(classes, dtype=torch.long), persistent=False)
        self.register_buffer("inner_index", torch.tensor(inner_index, dtype=torch.long), persistent=False)

    def forward(self, x):
        z = self.inner(x)
        out = torch.full((z.shape[0], self.num_classes), float("-inf"), dtype=z.dtype, device=z.device)
        out[:, self.classes] = z[:, self.inner_index]
        return out


def restricted_model(model: nn.Module, classes: list[int] | None) -> nn.Module:
    """The model as a device uses it: wrapped so excluded classes can never be predicted."""
    if classes is None:
        return model
    n = list(prunable_layers(model).values())[-1].weight.shape[0]
    return OutputRestricted(model, classes, n, classes)


@torch.no_grad()
def drop_classes(model: nn.Module, mask: Mask, arch: str, arch_kwargs: dict, classes: list[int]):
    """Compaction: a model whose output layer has only the kept classes' rows."""
    last = list(prunable_layers(model))[-1]
    state = model.state_dict()
    idx = torch.tensor(classes)
    state[f"{last}.weight"] = state[f"{last}.weight"][idx].clone()
    state[f"{last}.bias"] = state[f"{last}.bias"][idx].clone()
    kwargs = dict(arch_kwargs, num_classes=len(classes))
    small = build_model(arch, **kwargs)
    small.load_state_dict(state)
    layers = dict(mask.layers)
    layers[last] = layers[last][idx].clone()
    return small.eval(), Mask(layers), kwargs
