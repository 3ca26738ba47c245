"""Which connections go: scores from a scorer, masks at a sparsity (one global ranking, per-layer
or per-row rankings, whole units for structured scorers) and the sparsity schedule."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from common.engine.scoring import broadcast_outputs, get_scorer
from common.engine.stats import UsageStats
from common.model.architectures import prunable_layers
from common.model.mask import Mask


def compute_scores(model: nn.Module, stats: UsageStats, scoring: str, seed: int, keep_last: bool = False) -> dict:
    scorer = get_scorer(scoring)
    gen = torch.Generator().manual_seed(seed)
    layers = prunable_layers(model)
    last = list(layers)[-1]
    scores = {}
    units = scorer(model, stats) if scorer.network else None
    for name, m in layers.items():
        if units is not None:  # one score per unit, broadcast to its incoming connections
            s = broadcast_outputs(units.get(name, torch.zeros(m.weight.shape[0])), m.weight).float()
        else:
            s = scorer(m.weight.detach(), stats.layers[name], gen).float()
        if (scorer.structured or keep_last) and name == last:
            # class outputs are not units to drop (see common/engine/restrict.py); a prototype head
            # replaces the output layer, so ranking its old weights would mask the new one at random
            s = torch.full_like(s, math.inf)
        scores[name] = s
    return scores


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """torch.kthvalue(flat, k).values, exactly, for a CPU tensor without NaN: NumPy's introselect
    (np.partition), an order of magnitude faster than torch.kthvalue on the CPU."""
    return torch.tensor(np.partition(flat.numpy(), k - 1)[k - 1], dtype=flat.dtype)


def global_ranking(scores: dict, single: bool = False):
    """sparsity -> Mask from one ranking of every connection of every layer: the lowest-scoring
    `sparsity` share goes, ties broken by position (what a stable argsort gives). `single`: the
    caller asks for few sparsities (a fixed target, a bisection): each is a k-th value selection,
    O(n) (kth_smallest), instead of a stable argsort of every score. Otherwise
    (a linear search) the scores are sorted once and each mask is one comparison with the ranks.
    Both give the same masks; a GPU, or NaN scores, always sort."""
    names = list(scores)
    shapes = [scores[k].shape for k in names]
    flat = torch.cat([scores[k].flatten() for k in names])
    rank = None
    # a GPU sorts fast; NaN needs the sort's order (kthvalue does not place it)
    if not single or flat.is_cuda or bool(torch.isnan(flat).any()):
        order = torch.argsort(flat, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)  # each mask: one comparison

    def at(sparsity: float) -> Mask:
        n_prune = int(round(sparsity * flat.numel()))
        if rank is not None:
            keep = rank >= n_prune
        elif n_prune == 0:
            keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        else:
            t = kth_smallest(flat, n_prune)
            keep = flat >= t
            # among scores equal to the threshold, the first ones by position go too
            # (count_nonzero: far faster than a bool tensor's sum())
            ties = n_prune - (flat.numel() - int(torch.count_nonzero(keep)))
            if ties > 0:
                keep[torch.nonzero(flat == t).flatten()[:ties]] = False
        parts = torch.split(keep, [math.prod(sh) for sh in shapes])
        return Mask({k: v.view(sh) for k, v, sh in zip(names, parts, shapes)})
    return at


def mask_at(scores: dict, base: Mask, sparsity: float, scope: str, structured: bool = False) -> Mask:
    """Keep the highest-scoring connections so that `sparsity` of all weights are pruned.
    Already-pruned connections (base mask) stay pruned. `structured`: scores are per output unit
    and whole units go (never a part of one)."""
    if structured:
        return _units_at(scores, base, sparsity, scope)
    if scope == "global":  # already-pruned connections rank first, so they count toward sparsity
        ranked = global_ranking({k: torch.where(base.layers[k], s.cpu(), -math.inf) for k, s in scores.items()},
                                single=True)
        m = ranked(sparsity)
        return Mask({k: m.layers[k].cpu() & base.layers[k] for k in scores})
    out = {}
    for k, s in scores.items():
        # "row": every output unit keeps the same share of its inputs (Wanda's comparison group)
        rows = s.reshape(s.shape[0], -1) if scope == "row" else s.reshape(1, -1)
        ranked = torch.where(base.layers[k].reshape(rows.shape), rows.cpu(), -math.inf)
        n_prune = int(round(sparsity * ranked.shape[1]))
        keep = torch.ones(ranked.shape, dtype=torch.bool)
        keep.scatter_(1, torch.argsort(ranked, dim=1, stable=True)[:, :n_prune], False)
        out[k] = keep.view(s.shape) & base.layers[k]
    return Mask(out)


def masker(scores: dict, dense: Mask, scope: str, structured: bool, single: bool = False):
    """sparsity -> Mask from fixed scores, starting from the dense model. `single`: it will be
    asked for few sparsities (a fixed target, a bisection; see global_ranking)."""
    if structured or scope != "global":
        return lambda sparsity: mask_at(scores, dense, sparsity, scope, structured)
    return global_ranking(scores, single)


def _units_at(scores: dict, base: Mask, sparsity: float, scope: str) -> Mask:
    """Structured pruning: rank output units by their score and drop the lowest whole units
    (units already dead in `base` count first) until `sparsity` of the weights are gone."""
    unit = {k: torch.where(base.layers[k].reshape(s.shape[0], -1).any(1), s.reshape(s.shape[0], -1)[:, 0].cpu(),
                           -math.inf) for k, s in scores.items()}
    size = {k: s[0].numel() for k, s in scores.items()}
    groups = [list(scores)] if scope == "global" else [[k] for k in scores]
    out = {k: base.layers[k].clone() for k in scores}
    for names in groups:
        budget = sparsity * sum(scores[k].numel() for k in names)
        cand = sorted(((float(unit[k][i]), k, i) for k in names for i in range(len(unit[k]))),
                      key=lambda t: t[0])
        pruned = 0
        for score, k, i in cand:
            if pruned + size[k] / 2 > budget or score == math.inf:
                break
            out[k][i] = False
            pruned += size[k]
    return Mask(out)


def schedule(step: float, max_sparsity: float, target: float | None = None) -> list[float]:
    """Sparsity after each step when `step` of the remaining weights go each time."""
    top = target if target is not None else max_sparsity
    levels, k = [], 1
    while True:
        s = 1 - (1 - step) ** k
        if s >= top - 1e-9:
            levels.append(top)
            return levels
        levels.append(s)
        k += 1
