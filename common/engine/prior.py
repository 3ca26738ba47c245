"""The federation's prior on what to prune: for every connection, the share of (at least k) devices
that pruned it in the last round. A device blends it with its own ranking, trusting its own data
more the more of it there is: with n samples and a prior worth `strength` samples, its own
ranking weighs w = n / (n + strength), the prior the rest. The prior also counts as
min((1 - w) x strength, 2n) samples of evidence in how far the stop rule may search
(common/engine/search.py): what many devices pruned, a device of a dozen samples may prune too,
while the stop rule still judges every step on the device's own probe, which is why the prior
never more than triples a device's evidence; where that probe passes every step past the
device's own bound, the search backs off there (P8, common/engine/search.py). Where that
evidence opens no step of the search past the device's own bound (a device with plenty of data),
the prior is not used: its ranking would only reorder what the device's own data rank (P9).
Without a prior nothing here runs and the engine is as before."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.engine.class_prior import ClassPrior


@dataclass
class Prior:
    """What the server gives back: per prunable layer, the share of devices that pruned each
    connection (a tensor of the weight's shape, values in [0, 1]); `samples`, how many of the
    device's own samples it is worth (the device's setting prior-samples); `voters`, how many
    devices it aggregates (the server's word); `classes`, the federation's class directions
    (common/engine/class_prior.py), where the server sends them. `pruned` is None where the server
    sends class directions alone (summaries without masks)."""
    pruned: dict | None
    samples: float
    voters: int = 0
    classes: ClassPrior | None = None


def own_weight(n: int, strength: float) -> float:
    """How much the device's own ranking counts against the prior's: n / (n + strength)."""
    return n / (n + strength) if strength > 0 else 1.0


def check_prior(prior: dict, scores: dict) -> None:
    """A prior names every prunable layer, each a tensor of its weight's shape with values in
    [0, 1]; anything else is refused with a one-line reason (it came over a wire)."""
    if set(prior) != set(scores):
        raise ValueError(f"the prior names layers {sorted(prior)[:4]}..., the model has {sorted(scores)[:4]}...")
    for k, s in scores.items():
        f = prior[k]
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(s.shape):
            raise ValueError(f"the prior's layer {k} has shape {tuple(getattr(f, 'shape', ()))}, "
                             f"the model's {tuple(s.shape)}")
        if not torch.isfinite(f).all() or f.min() < 0 or f.max() > 1:
            raise ValueError(f"the prior's layer {k} holds values outside [0, 1]")


def blend(scores: dict, prior: dict, weight: float, structured: bool) -> dict:
    """Scores whose order is weight x (the connection's rank among the device's own scores, in
    [0, 1]) + (1 - weight) x (the share of devices that kept it). Scores of +inf (what may never
    go: the output layer under a rewritten head, refit's non-producers) stay +inf. A structured
    scorer's units take the mean share of their connections, so a unit stays one score."""
    check_prior(prior, scores)
    names = list(scores)
    flat = torch.cat([scores[k].detach().reshape(-1).float().cpu() for k in names])
    finite = torch.isfinite(flat)
    rank = torch.zeros_like(flat)
    order = torch.argsort(flat[finite], stable=True)
    r = torch.empty(len(order))
    r[order] = torch.arange(len(order), dtype=torch.float32) / max(len(order) - 1, 1)
    rank[finite] = r
    out, start = {}, 0
    for k in names:
        s = scores[k]
        size = s.numel()
        kept = 1.0 - prior[k].float().cpu()
        if structured:  # one value per unit, broadcast to its connections like the scores
            kept = kept.reshape(kept.shape[0], -1).mean(1).view(-1, *([1] * (s.dim() - 1))).expand_as(s)
        v = weight * rank[start:start + size].view(s.shape) + (1 - weight) * kept
        out[k] = torch.where(torch.isfinite(s.cpu()), v, torch.full_like(v, math.inf)).to(s.device)
        start += size
    return out
