"""Compaction of any graph (ResNet18/50 with their residual additions, as well as chains): the
channels a mask has silenced are physically removed, with Torch-Pruning's dependency graph
finding every layer coupled to a channel (a residual stream channel lives in the stem, in each
block's last convolution, in the shortcut's and in every reader's input).

A channel goes only when it is silenced in every layer that writes it: no incoming connection
left there (Mask.apply then zeroes its bias and BatchNorm affine, so it carries exactly 0), so
the compact model computes what the masked model computes. The output layer keeps every class.

A compacted ResNet cannot be rebuilt from constructor arguments: the checkpoint stores Torch-
Pruning's pruning history (root layer, channel indices), which `rebuild` replays on a freshly
built model before the state dict is loaded.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from common.data.tasks import input_shape
from common.model.architectures import prunable_layers
from common.model.mask import Mask


def _graph(model: nn.Module, features: dict):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape(features)))


def removable_channels(model: nn.Module, mask: Mask, dg) -> list[tuple[nn.Module, list[int]]]:
    """(root layer, its channel indices that can go) for every coupled group of channels of the
    dependency graph `dg` built on `model`."""
    import torch_pruning as tp

    layers = prunable_layers(model)
    names = {id(m): n for n, m in layers.items()}
    last = list(layers.values())[-1]
    out_fns = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
    plan = []
    for group in dg.get_all_groups(ignored_layers=[last], root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        n = len(group[0].idxs)
        dead = torch.ones(n, dtype=torch.bool)
        writers = 0
        for item in group.items:
            mod = item.dep.target.module
            if item.dep.handler not in out_fns:
                continue
            if id(mod) not in names:  # a writer fineprune does not prune: its channels stay
                dead[:] = False
                break
            keep = mask.layers[names[id(mod)]]
            dead_in = ~keep.reshape(keep.shape[0], -1).any(1)
            for i, h in enumerate(item.idxs):  # Torch-Pruning's hybrid index, or plain ints in root order
                root_i, idx = (h.root_idx, h.idx) if hasattr(h, "root_idx") else (i, h)
                dead[root_i] &= bool(dead_in[idx])
            writers += 1
        gone = torch.nonzero(dead).flatten().tolist() if writers else []
        if gone and len(gone) < n:  # keep at least one channel so the graph stays well-formed
            plan.append((root, gone))
    return plan


def compact_graph(model: nn.Module, mask: Mask, features: dict) -> tuple[nn.Module, Mask, list]:
    """(compact model, its mask, the pruning history to store). `model` is left unchanged."""
    model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():  # (Torch-Pruning traces with autograd: no no_grad around the graph)
        mask.apply(model)
        # the mask rides along in a twin whose weights are the mask itself: the same channel
        # selections applied to both give the compact mask exactly
        twin = copy.deepcopy(model)
        for name, m in prunable_layers(twin).items():
            m.weight.copy_(mask.layers[name].to(m.weight.dtype))
    dg, dg_twin = _graph(model, features), _graph(twin, features)
    twin_of = dict(zip(model.modules(), twin.modules()))
    import torch_pruning as tp

    for root, idxs in removable_channels(model, mask, dg):
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        dg.get_pruning_group(root, fn, idxs).prune()
        dg_twin.get_pruning_group(twin_of[root], fn, idxs).prune(record_history=False)
    new_mask = Mask({n: m.weight.detach() > 0.5 for n, m in prunable_layers(twin).items()})
    return model, new_mask, [list(h) for h in dg.pruning_history()]


def rebuild(model: nn.Module, history: list, features: dict) -> nn.Module:
    """A freshly built model pruned as the compacted one was, ready for its state dict."""
    if history:
        _graph(model, features).load_pruning_history([tuple(h) for h in history])
    return model
