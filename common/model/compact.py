"""Compaction: physically remove output units/channels that a mask has made useless, giving a
smaller, faster dense model that computes exactly what the masked model computes."""
from __future__ import annotations

import torch
import torch.nn as nn

from common.model.architectures import build_model, following_batchnorm, prunable_layers
from common.model.mask import Mask, MaskError


def removable_units(model: nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    """Per chain layer (all but the last): True for units that can go, either because no incoming
    connection is left (the unit is silenced by Mask.apply) or no outgoing connection is left."""
    chain = list(model.prunable_chain)
    layers = prunable_layers(model)
    out = {}
    for name, nxt in zip(chain, chain[1:]):
        keep = mask.layers[name]
        dead_in = ~keep.reshape(keep.shape[0], -1).any(1)
        nk = mask.layers[nxt]
        per = layers[nxt].weight.shape[1] // keep.shape[0]  # positions per channel after flatten
        cols = nk.transpose(0, 1).reshape(keep.shape[0], per, nk.shape[0], -1)
        dead_out = ~cols.reshape(keep.shape[0], -1).any(1)
        gone = dead_in | dead_out
        if gone.all():  # keep one unit so the model stays well-formed
            gone[0] = False
        out[name] = gone
    return out


@torch.no_grad()
def compact(model: nn.Module, mask: Mask, arch: str, arch_kwargs: dict):
    """Return (compact_model, compact_mask, new_arch_kwargs). Only chain models (those with a
    `prunable_chain`: smallcnn, kws) can be compacted."""
    if not hasattr(model, "prunable_chain"):
        raise MaskError(f"compaction supports chain models (smallcnn, kws), not '{arch}'")
    mask.apply(model)
    chain = list(model.prunable_chain)
    layers = prunable_layers(model)
    bn_after = following_batchnorm(model)
    gone = removable_units(model, mask)
    keep_out = {n: torch.nonzero(~g).flatten() for n, g in gone.items()}
    keep_out[chain[-1]] = torch.arange(layers[chain[-1]].weight.shape[0])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    new_mask = {}
    prev = None
    for name in chain:
        w = layers[name].weight
        rows = keep_out[name]
        if prev is None:
            cols = torch.arange(w.shape[1])
        else:
            per = w.shape[1] // layers[prev].weight.shape[0]
            cols = (keep_out[prev].view(-1, 1) * per + torch.arange(per).view(1, -1)).flatten()
        state[f"{name}.weight"] = w[rows][:, cols].clone()
        new_mask[name] = mask.layers[name][rows][:, cols].clone()
        if layers[name].bias is not None:
            state[f"{name}.bias"] = layers[name].bias[rows].clone()
        if name in bn_after:
            for p in ("weight", "bias", "running_mean", "running_var"):
                key = f"{bn_after[name]}.{p}"
                state[key] = state[key][rows].clone()
        prev = name

    kwargs = dict(arch_kwargs)
    kwargs["widths"] = tuple(int(len(keep_out[n])) for n in chain[:-1])
    small = build_model(arch, **kwargs)
    small.load_state_dict(state)
    return small.eval(), Mask(new_mask), kwargs
