"""Mean-preserving pruning, forward only: what the pruned connections gave each unit on average over
the user's data (their weights times the mean of their inputs, from the statistics pass) is put
back as a constant, so a unit's mean output stays the unpruned model's and only its fluctuation
is lost (bias correction, as data-free quantization and FLAP's bias compensation do). Where a
unit has a bias, it goes there; where it has none but a BatchNorm follows, into the statistics
that BatchNorm normalizes by, where they are not re-estimated on the pruned model (a
re-estimated layer centres itself, and takes nothing)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.stats import UsageStats
from common.model.architectures import following_batchnorm, prunable_layers


def compensating(cfg) -> bool:
    """Whether the engine compensates (`compensate`: on by default; docs/personalization.md S19,
    S23)."""
    return getattr(cfg, "compensate", "off") == "on"


@dataclass
class Target:
    """One layer's compensation: the mean input each weight reads (a convolution's per kernel
    tap, averaged over its output positions, padding included), the unpruned mean output per
    unit, and where the lost mean goes (its bias, or the BatchNorm at `bn_index` among the
    model's BatchNorm layers)."""
    name: str
    layer: nn.Module
    taps: torch.Tensor  # (groups, inputs per group x kernel taps, 1), in the weight's memory order
    full_out: torch.Tensor  # (groups, units per group, 1)
    bn_index: int | None
    weight: torch.Tensor  # a view of the live weight as (groups, units per group, weights per unit)


def _taps_last(weight: torch.Tensor) -> bool:
    """Whether a unit's weights lie in memory taps first, channels last (a channels_last kernel)."""
    return weight.dim() == 4 and not weight.is_contiguous() and weight.permute(0, 2, 3, 1).is_contiguous()


def _taps(layer: nn.Module, mean_in: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The mean input each weight multiplies, as (groups, weights per unit) in the order a unit's
    weights lie in memory (a channels_last kernel: taps, then channels), so that each unit's mean
    pre-activation is one matrix-vector product over the weights; None for a convolution this
    does not cover (string padding, a padding mode other than zeros, more than 2 dimensions)."""
    if isinstance(layer, nn.Linear):
        return mean_in.reshape(1, -1)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros" or weight.dim() not in (3, 4):
        return None
    m = mean_in.unsqueeze(0)
    k, dil, pad, st = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    if weight.dim() == 3:  # a Conv1d as a Conv2d of height 1
        m, k, dil, pad, st = m.unsqueeze(2), (1, *k), (1, *dil), (0, *pad), (1, *st)
    cols = F.unfold(m, k, dil, pad, st).mean(2)[0]  # (channels x taps), channel-major
    g = layer.groups
    taps = cols.reshape(g, -1)
    if _taps_last(weight):
        c = weight.shape[1]
        taps = taps.reshape(g, c, -1).transpose(1, 2).reshape(g, -1)  # taps, then channels
    return taps.contiguous()


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight as (groups, units per group, weights per unit) in its memory order: a view (of
    a parameter: it follows every in-place change), never a copy."""
    w = weight.permute(0, 2, 3, 1) if _taps_last(weight) else weight
    return w.view(groups, weight.shape[0] // groups, -1)


def _unit_means(weight: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Each unit's mean pre-activation from its connections (no bias) over the user's data."""
    return torch.bmm(_grouped(weight, taps.shape[0]), taps.unsqueeze(2).to(weight)).reshape(-1)


def unnormalized(model: nn.Module) -> set:
    """The prunable layers no BatchNorm follows: under full recalibration, the only ones whose lost
    mean is not re-centred away (what the statistics pass needs input means of, in that mode)."""
    bn_after = following_batchnorm(model)
    return {n for n in prunable_layers(model) if n not in bn_after}


def plan(model: nn.Module, stats: UsageStats, start: dict, recentred: set = frozenset()) -> list[Target]:
    """The layers a mask's lost mean can be put back into, with what that needs; `start`: the
    state dict at the start of pruning (the unpruned weights); `recentred`: the indexes of the
    BatchNorm layers every pass re-estimates in full on the pruned model, which centre the layer
    before them themselves (its lost mean would be computed for nothing). The last layer (the output
    head) is included: a pruned output row loses its mean like any other."""
    from common.engine.bn import bn_layers

    bn_after = following_batchnorm(model)
    mods = dict(model.named_modules())
    bn_pos = {id(m): i for i, m in enumerate(bn_layers(model))}
    out = []
    for name, layer in prunable_layers(model).items():
        st = stats.layers.get(name) if stats is not None else None
        if st is None or st.in_total is None:
            continue
        bn = mods[bn_after[name]] if name in bn_after else None
        if (layer.bias is None and bn is None) or (bn is not None and bn_pos[id(bn)] in recentred):
            continue
        w0 = start[f"{name}.weight"]
        taps = _taps(layer, st.input_mean().to(device=w0.device, dtype=w0.dtype), w0)
        if taps is None or not (layer.weight.is_contiguous() or _taps_last(layer.weight)):
            continue  # a layout a view cannot follow
        g = taps.shape[0]
        out.append(Target(name, layer, taps.unsqueeze(2).to(w0), _unit_means(w0, taps).view(g, -1, 1),
                          None if layer.bias is not None else bn_pos[id(bn)], _grouped(layer.weight, g)))
    return out


@torch.no_grad()
def lost_means(targets: list[Target], dead: dict) -> dict:
    """Per target, each unit's mean contribution the model's (masked) weights no longer give; a
    unit with no connection left (`dead`: Mask.apply's record) loses nothing: it stays silent, so
    compaction stays exact."""
    # full - weight @ taps in one kernel per layer (small models: a candidate's cost is its calls)
    return {t.name: torch.baddbmm(t.full_out, t.weight, t.taps, alpha=-1).view(-1).masked_fill_(dead[t.name], 0.0)
            for t in targets}


@torch.no_grad()
def put_back(targets: list[Target], lost: dict, bns: list, prior: list | None, follows: list[bool]) -> list | None:
    """Put each target's lost mean back: into its bias; else, into the statistics its BatchNorm
    normalizes by where a pass does not re-estimate them on the pruned model: the base's (`prior`)
    that a partial recalibration mixes in, or the running mean itself where nothing is
    re-estimated (`follows[i]`: whether layer i is re-estimated at all). Returns the prior to
    recalibrate with (shifted where needed), or None where there is none."""
    shifted = None if prior is None else list(prior)
    biased = [t for t in targets if t.bn_index is None]
    if biased:  # one multi-tensor add for every bias
        torch._foreach_add_([t.layer.bias for t in biased], [lost[t.name] for t in biased])
    for t in targets:
        d = lost[t.name]
        if t.bn_index is None:
            continue
        if shifted is not None:
            mu, var = shifted[t.bn_index]
            shifted[t.bn_index] = (mu - d.to(mu), var)
        elif not follows[t.bn_index]:
            bns[t.bn_index].running_mean.sub_(d.to(bns[t.bn_index].running_mean))
    return shifted
