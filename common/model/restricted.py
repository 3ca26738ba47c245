"""A model restricted to the classes a user has: a wrapper that makes the other classes impossible,
and the compaction that drops their output rows."""
from __future__ import annotations

import torch
import torch.nn as nn

from common.model.architectures import build_model, prunable_layers
from common.model.mask import Mask


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
