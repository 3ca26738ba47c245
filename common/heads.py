"""Output heads a device can build from its own unlabeled data, forward only: T3A's prototype
classifier (Iwasawa & Matsuo 2021), a blend of it with the base's own output layer, and writing
either into a pruned model's output layer (one linear layer still: exports and compaction see
the same model). Which head a user gets is a registry entry, chosen by name or by `auto`."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F



def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits, 1)
    return -(p * F.log_softmax(logits, 1)).sum(1)


class T3AHead:
    """T3A's classifier: per class, the normalized mean of the normalized supports predicted as
    that class. Supports are the last layer's weight rows (the warm-up supports of the paper's
    code) plus the user's features, of which each class keeps its `filter_k` lowest-entropy ones."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, feats: torch.Tensor,
                 logits: torch.Tensor, filter_k: int = 100, prior_weight: float = 1.0):
        """`prior_weight`: how many of the user's supports each old weight row counts as. T3A's
        own is 1; more shrinks a class's prototype toward the base's row when the user gave it
        few supports, and lets it follow the user's features when they gave many."""
        w = weight.detach().float().cpu()
        warm_logits = w @ w.T + (0 if bias is None else bias.detach().float().cpu())
        sup = torch.cat([w, feats.float()])
        lg = torch.cat([warm_logits, logits.float()])
        labels, ent = lg.argmax(1), entropy_rows(lg)
        keep = torch.zeros(len(sup), dtype=torch.bool)
        for c in range(w.shape[0]):
            idx = torch.nonzero(labels == c).flatten()
            if filter_k > 0 and len(idx) > filter_k:
                idx = idx[torch.argsort(ent[idx], stable=True)[:filter_k]]
            keep[idx] = True
        onehot = F.one_hot(labels[keep], w.shape[0]).float()
        support_w = torch.ones(len(sup))
        support_w[:w.shape[0]] = prior_weight
        onehot = onehot * support_w[keep, None]
        self.weight = F.normalize(F.normalize(sup[keep], dim=1).T @ onehot, dim=0)  # (d, C)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float() @ self.weight



def label_shift_prior(logits: torch.Tensor, strength: float = 1.0, iters: int = 100) -> torch.Tensor:
    """The user's class frequencies, estimated without labels by EM on the model's outputs
    (Saerens, Latinne & Decaestecker 2002: the model's posteriors re-weighted by the new prior
    until the prior is the mean posterior), with a symmetric Dirichlet of `strength` pseudo-samples
    per class: the estimate moves from the uniform prior as far as the user's data carries it.
    Returns log(prior / uniform), a per-class logit offset (0 where the data says nothing)."""
    p = F.softmax(logits.float(), 1)
    n, c = p.shape
    pi = torch.full((c,), 1.0 / c)
    for _ in range(iters):
        q = p * pi
        q = q / q.sum(1, keepdim=True).clamp_min(1e-30)
        new = (q.sum(0) + strength) / (n + strength * c)
        if torch.allclose(new, pi, atol=1e-6):
            pi = new
            break
        pi = new
    return torch.log(pi * c)


def spread_classes(logits: torch.Tensor) -> float:
    """Over how many classes the user's data spreads: exp of the entropy of the mean predicted
    distribution (a user holding 3 classes evenly: 3)."""
    p = F.softmax(logits.float(), 1).mean(0)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def _prototype_weight(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return T3AHead(last.weight, last.bias, feats, logits).weight.T  # (classes, features)


@torch.no_grad()
def write_prototypes(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> None:
    """The output layer becomes T3A's prototype classifier of the user's features (no bias)."""
    last.weight.copy_(_prototype_weight(last, feats, logits).reshape(last.weight.shape).to(last.weight))
    if last.bias is not None:
        last.bias.zero_()


@torch.no_grad()
def write_blend(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> None:
    """The output layer becomes the mean of the base's logits and T3A's, the prototypes' scaled so
    both spread alike over the user's data: still one linear layer. Where the user gives too few
    samples per class for prototypes alone (7 per class on styled digits: T3A -4.4 points against
    AdaBN alone), the base's rows hold them in place."""
    p = _prototype_weight(last, feats, logits)
    proto_logits = feats.float() @ p.T
    scale = logits.float().std() / proto_logits.std().clamp_min(1e-12)
    w = (0.5 * last.weight.detach().float().cpu().reshape(p.shape) + 0.5 * scale * p)
    last.weight.copy_(w.reshape(last.weight.shape).to(last.weight))
    if last.bias is not None:
        last.bias.mul_(0.5)


HEADS = {"prototypes": write_prototypes, "blend": write_blend}


def choose_head(name: str, logits: torch.Tensor, min_support: float) -> str:
    """`auto`: prototypes where the user's data gives at least `min_support` samples per class it
    spreads over, else the blend; any other name is itself."""
    if name != "auto":
        return name
    return "prototypes" if len(logits) / spread_classes(logits) >= min_support else "blend"
