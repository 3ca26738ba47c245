"""Output heads a device can build from its own unlabeled data, forward only: T3A's prototype
classifier (Iwasawa & Matsuo 2021), a blend of it with the base's own output layer, the base's
layer with its output prior moved to the user's class mix (EM, Saerens et al. 2002), and writing
any of them into a pruned model's output layer (one linear layer still: exports and compaction see
the same model). Which head a user gets is a registry entry (HEADS), chosen by name or by `auto`."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.hidden_shift import NO_LABEL_SHIFT


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits, 1)
    return -(p * F.log_softmax(logits, 1)).sum(1)


class T3AHead:
    """T3A's classifier: per class, the normalized mean of the normalized supports predicted as
    that class. Supports are the last layer's weight rows (the warm-up supports of the paper's
    code) plus the user's features, of which each class keeps its `filter_k` lowest-entropy ones."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, feats: torch.Tensor,
                 logits: torch.Tensor, filter_k: int = 100):
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
        self.weight = F.normalize(F.normalize(sup[keep], dim=1).T @ onehot, dim=0)  # (d, C)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float() @ self.weight


def spread_classes(logits: torch.Tensor) -> float:
    """Over how many classes the user's data spreads: exp of the entropy of the mean predicted
    distribution (a user holding 3 classes evenly: 3)."""
    return spread_of(F.softmax(logits.float(), 1).mean(0))


def spread_of(p: torch.Tensor) -> float:
    """Over how many classes a mean predicted distribution `p` spreads: exp of its entropy."""
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def layer_logits(last: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """The output layer `last` on the user's features (CPU, float)."""
    return F.linear(feats, last.weight.detach().float().cpu().flatten(1),
                    None if last.bias is None else last.bias.detach().float().cpu())


def _prototype_weight(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return T3AHead(last.weight, last.bias, feats, logits).weight.T  # (classes, features)


# S71: T3A's assignment repeated on the same features until no pseudo-label moves, at most this often
# (of 64 screened users of every class, 53 stopped within 2-9 rounds; the rest still moved a few samples)
REFINE_ROUNDS = 10


def refines(logits: torch.Tensor, labels: torch.Tensor | None = None) -> bool:
    """Whether the prototypes are refined (S71): the pseudo-labels are the model's own (not the
    groups') and spread over at least NO_LABEL_SHIFT of the classes, a user holding nearly every
    class. A user holding a few classes is left alone: its errors' classes are classes it does not
    hold, and each round would hand them more of its samples."""
    return labels is None and spread_classes(logits) / logits.shape[1] >= NO_LABEL_SHIFT


def refined_weight(first: torch.Tensor, feats: torch.Tensor, rounds: int = REFINE_ROUNDS) -> torch.Tensor:
    """T3A's prototypes `first` (classes, features) refined on the features they were built from:
    each round the samples take the class of their nearest prototype and the prototypes are T3A's
    again (the last round's rows their warm-up supports: spherical k-means started from the base's
    layer), until no sample changes class; the rows returned are the normalized mean of the first
    prototypes and the last, so half of the model's own reading stays (S71: the last alone gains
    as much on average and loses up to twice as much on single users)."""
    f = feats.float()
    p = first.float()
    logits = f @ p.T  # each round's: the assignment it judged, the next round's pseudo-labels
    labels = logits.argmax(1)
    for _ in range(rounds):
        p = T3AHead(p, None, f, logits).weight.T
        logits = f @ p.T
        moved = logits.argmax(1)
        if bool((moved == labels).all()):
            break
        labels = moved
    return F.normalize(F.normalize(first.float(), dim=1) + p, dim=1)


@torch.no_grad()
def write_prototypes(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
                     labels: torch.Tensor | None = None, refine: bool = True) -> None:
    """The output layer becomes T3A's prototype classifier of the user's features (no bias),
    refined where the user holds nearly every class (refines, S71; `refine` False: never).
    `labels`: logits whose argmax are the pseudo-labels instead of `logits`' (the user's groups', S68)."""
    weight = _prototype_weight(last, feats, logits if labels is None else labels)
    if refine and refines(logits, labels):
        weight = refined_weight(weight, feats)
    last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight))
    if last.bias is not None:
        last.bias.zero_()


@torch.no_grad()
def write_blend(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> None:
    """The output layer becomes the mean of the base's logits and T3A's, the prototypes' scaled so
    both spread alike over the user's data: still one linear layer. Where the user gives too few
    samples per class for prototypes alone (7 per class on styled digits: T3A -4.4 points against
    AdaBN alone), the base's rows hold them in place. `labels`: as write_prototypes'."""
    p = _prototype_weight(last, feats, logits if labels is None else labels)
    proto_logits = feats.float() @ p.T
    scale = logits.float().std() / proto_logits.std().clamp_min(1e-12)
    w = (0.5 * last.weight.detach().float().cpu().reshape(p.shape) + 0.5 * scale * p)
    last.weight.copy_(w.reshape(last.weight.shape).to(last.weight))
    if last.bias is not None:
        last.bias.mul_(0.5)


# S54: how far the label-shift head moves the base's output prior toward the class mix EM
# estimates (a power of the mix; 1 is Bayes' answer for a calibrated base), chosen leave one
# cohort out (docs/personalization.md), and the least a class's share counts for
PRIOR_POWER = 0.25
PRIOR_FLOOR = 1e-3
VENDOR_FLOOR = 0.01  # S55: a class's share of the vendor's counts is read as at least this share of uniform's


def label_mix(logits: torch.Tensor, vendor: torch.Tensor | None = None, iters: int = 200,
              tol: float = 1e-6) -> torch.Tensor:
    """The user's class mix by EM on the base's posteriors (Saerens, Latinne & Decaestecker 2002):
    each sample's posterior re-weighted by the current mix over the vendor's (`vendor`, the class
    shares of the base's training data, vendor_prior; None: uniform), the mix their mean, until it
    stops moving. EM starts from the vendor's mix, where a user holding it stays."""
    p = F.softmax(logits.float(), 1)
    k = p.shape[1]
    pv = None if vendor is None else vendor.float()
    pi, q = torch.full((k,), 1.0 / k) if pv is None else pv.clone(), torch.empty_like(p)
    for _ in range(iters):
        torch.mul(p, pi * k if pv is None else pi / pv, out=q)
        new = q.div_(q.sum(1, keepdim=True).clamp_min_(1e-30)).mean(0)
        done = float((new - pi).abs().max()) < tol
        pi = new
        if done:
            break
    return pi


def vendor_prior(meta: dict | None, k: int) -> torch.Tensor | None:
    """The class shares of the base's training data, from the vendor record's class_counts (S55),
    where they name k classes and some samples; each share at least VENDOR_FLOOR of uniform (a
    class the vendor barely saw divides no posterior by nearly zero). None: the record has none."""
    counts = (meta or {}).get("class_counts")
    if not isinstance(counts, list) or len(counts) != k:
        return None
    c = torch.tensor([float(v) for v in counts], dtype=torch.float64)
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()) or float(c.sum()) <= 0:
        return None
    pv = (c / c.sum()).clamp_min(VENDOR_FLOOR / k)
    return (pv / pv.sum()).float()


@torch.no_grad()
def write_label_shift(last: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
                      vendor: torch.Tensor | None = None) -> None:
    """The base's output layer, its bias moved by the log of the class mix EM estimates on the
    user's data over the vendor's (`vendor`, vendor_prior; None: uniform), to the power
    PRIOR_POWER, each class's ratio floored at PRIOR_FLOOR: where the user's data differ from the
    vendor's by their class mix alone, the base's posteriors re-weighted by that mix are what the
    mix adds, without the base's errors on it that prototypes of its pseudo-labels learn. A user
    holding the vendor's own mix moves nothing. A layer without a bias keeps its rows (nothing to move)."""
    if last.bias is None:
        return
    pi = label_mix(logits, vendor)
    k = pi.numel()
    # (pi / pv)^tau times k^(1 - tau), a constant over the classes (no posterior moves by it): the
    # floor reads a class's ratio as it did with the uniform vendor of S54, pi^tau k
    ratio = pi ** PRIOR_POWER * k if vendor is None else (pi / vendor.float()) ** PRIOR_POWER * k ** (1 - PRIOR_POWER)
    shift = torch.log(ratio.clamp_min(PRIOR_FLOOR))
    last.bias.add_(shift.to(last.bias))


@dataclass(frozen=True)
class Head:
    """An output head: how it writes the output layer from the user's features and logits (None:
    the base's layer stays), and whether a fixed sparsity target rebuilds it on the pruned
    features (no stop rule judged it there)."""
    write: Callable | None
    rebuild_at_target: bool = False


HEADS = {"linear": Head(None), "prototypes": Head(write_prototypes, rebuild_at_target=True),
         "blend": Head(write_blend), "label-shift": Head(write_label_shift)}
# the federation's class directions (common/engine/class_prior.py): written with the prior the
# device received, never chosen by name; a fixed target keeps it as written (it weighs the base's rows)
HEAD_WITH_PRIOR = "class-prior"
HEADS[HEAD_WITH_PRIOR] = Head(None)


@torch.no_grad()
def spreads_wider(head: str, last: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
                  labels: torch.Tensor | None = None) -> tuple[bool, float, float]:
    """Whether `head`, written from the user's features, spreads the model's mean prediction over
    the user's data over more classes than the layer it would replace, whose `logits` these are,
    on each half of the data (alternate samples: a widening that one half of the data does not
    show is the samples', not the head's); on a copy, `last` is not written: (wider, before,
    after) over all of the data. `labels`: the pseudo-labels the head would read (S68)."""
    trial = copy.deepcopy(last)
    # S71: the gate judges T3A's prototypes as S58 was set on; where it keeps them, they are refined
    # after: refined ones can spread a shift's errors wider too (a sensor that mixes its inputs)
    HEADS[head].write(trial, feats, logits, **({} if labels is None else {"labels": labels}),
                      **({"refine": False} if head == "prototypes" else {}))
    new = layer_logits(trial, feats)
    halves = (slice(0, None, 2), slice(1, None, 2))
    wider = len(logits) >= 2 and all(spread_classes(new[h]) > spread_classes(logits[h]) for h in halves)
    return wider, spread_classes(logits), spread_classes(new)


def choose_head(name: str, logits: torch.Tensor, min_support: float, floor: float = 0.0,
                classes: float | None = None) -> str:
    """`auto`: by the samples per class the user's data gives (over the classes it spreads over, or
    `classes`, the groups its features form: S68): the base's output layer below `floor`,
    prototypes from `min_support`, the blend between; any other name is itself."""
    if name != "auto":
        return name
    support = len(logits) / (spread_classes(logits) if classes is None else classes)
    if support < floor:
        return "linear"
    return "prototypes" if support >= min_support else "blend"
