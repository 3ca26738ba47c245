"""The federation's class directions: what many devices' unlabeled data say about where each class
lies, as no device's few samples can. A device centres its penultimate features on its own mean
(which removes what its speaker, channel or style adds to every sample) and scales them by its own
mean feature norm, then averages them per pseudo-label: C means of d numbers and C counts. Pooled
over many devices (each device's mean of a class counting once), they point from a device's mean
toward each class. A data-poor device's head blends the base's logits (two thirds) with those
directions' (one third), centred on its own mean and scaled to spread as the base's logits do over
its data: still one linear layer (P6, docs/federation.md).

Centring on the device's mean removes a domain offset only where the device's data spreads over
the classes as the pool's does: a user holding 2 of 10 classes has its mean between those two, and
the directions would pull its samples toward classes it does not have (the digits federation of
50 few-class users: 8-14 of 50 lost more than 2 points). So a device uses them only where its
pseudo-labels spread over at least half as many classes as the pool's (`spread_fits`), and only
where the blend spreads its mean prediction over more classes than the layer it replaces (`widens`,
P10): the directions undo a shift that collapsed the predictions, and where they narrow them they
add the pool's errors (or a server's: directions that send every sample to one class are refused).

The vendor's own directions (common/engine/vendor_directions.py, S59) stand in for the pool's where
a device has none; where its base carries them, the federation pools none (P13)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_NORM = 2.0  # a centred, scaled feature's mean lies within twice the mean norm of the features
# the directions' share of the blended logits; the base's layer weighs twice as much (how it was
# chosen, and what one half costs the worst devices: docs/federation.md, P6)
DIRECTIONS_WEIGHT = 1 / 3


@dataclass
class ClassPrior:
    """Pooled class directions: `means` (classes, features), per class the mean over devices of
    each device's mean centred, scaled feature of that pseudo-label (zeros for a class no device
    predicted); `freq` (classes,), the mean over devices of their pseudo-label frequencies;
    `voters`, how many devices it pools (the server's word)."""
    means: torch.Tensor
    freq: torch.Tensor
    voters: int = 0

    def directions(self) -> torch.Tensor:
        return F.normalize(self.means.float(), dim=1)


def class_shape(model: nn.Module) -> tuple[int, int]:
    """(classes, features) of the model's output layer: the shape of a device's class means."""
    from common.model.architectures import prunable_layers

    w = list(prunable_layers(model).values())[-1].weight
    return int(w.shape[0]), int(w[0].numel())


def centred(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features centred on their mean and divided by their mean norm, the mean, the norm)."""
    f = feats.float()
    mu, s = f.mean(0), f.norm(dim=1).mean().clamp_min(1e-12)
    return (f - mu) / s, mu, s


def class_means(feats: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A device's contribution: per class (of its own model's top-1 prediction) the mean of its
    centred, scaled features (classes, features; zeros where it predicted none), and the counts."""
    u, _, _ = centred(feats)
    onehot = F.one_hot(logits.argmax(1), logits.shape[1]).float()
    counts = onehot.sum(0)
    return (onehot.T @ u) / counts.clamp_min(1.0)[:, None], counts


def check_contribution(means: torch.Tensor, counts: torch.Tensor, classes: int, features: int) -> str | None:
    """Why a device's class means cannot be pooled (they came over a wire), or None: shapes of this
    model, finite, whole non-negative counts, a class with no samples has a zero mean, and no mean
    longer than MAX_NORM (a centred, scaled feature's cannot be)."""
    if tuple(means.shape) != (classes, features) or tuple(counts.shape) != (classes,):
        return f"class means {tuple(means.shape)} and counts {tuple(counts.shape)} do not fit {classes} x {features}"
    if not (torch.isfinite(means).all() and torch.isfinite(counts).all()):
        return "class means or counts are not finite"
    if counts.min() < 0 or not torch.equal(counts, counts.round()):
        return "class counts are not whole non-negative numbers"
    norms = means.float().norm(dim=1)
    if (norms[counts == 0] > 0).any() or (norms > MAX_NORM * (1 + 1e-3)).any():
        return f"a class mean is longer than {MAX_NORM} or stands for no samples"
    return None


def pool(contributions: list[tuple[torch.Tensor, torch.Tensor]], voters: int | None = None) -> ClassPrior:
    """The class directions of many devices: per class the mean of the devices' means of it (each
    device that predicted the class once: a device cannot outweigh others by its sample count),
    and the mean of their class frequencies."""
    means = torch.stack([m.float() for m, _ in contributions])
    counts = torch.stack([c.float() for _, c in contributions])
    have = (counts > 0).float()
    pooled = (means * have[..., None]).sum(0) / have.sum(0).clamp_min(1.0)[:, None]
    freq = (counts / counts.sum(1, keepdim=True).clamp_min(1.0)).mean(0)
    return ClassPrior(pooled, freq, len(contributions) if voters is None else voters)


def check_class_prior(prior: ClassPrior, classes: int, features: int) -> None:
    """Refuse, with one line, class directions that do not fit this model (they came over a wire)."""
    if tuple(prior.means.shape) != (classes, features) or tuple(prior.freq.shape) != (classes,):
        raise ValueError(f"the class prior is {tuple(prior.means.shape)} means and {tuple(prior.freq.shape)} "
                         f"frequencies; this model has {classes} classes of {features} features")
    if not (torch.isfinite(prior.means).all() and torch.isfinite(prior.freq).all()):
        raise ValueError("the class prior holds values that are not finite")
    if prior.freq.min() < 0 or abs(float(prior.freq.sum()) - 1) > 1e-3:
        raise ValueError("the class prior's frequencies are not a distribution")
    if (prior.means.float().norm(dim=1) > MAX_NORM * (1 + 1e-3)).any():
        raise ValueError(f"the class prior holds a mean longer than {MAX_NORM}")


def usable(last: nn.Module, prior: ClassPrior | None) -> bool:
    """Whether the output layer can carry the blend: a linear layer with a bias (the centring is a
    bias) that the prior fits."""
    if prior is None or not isinstance(last, nn.Linear) or last.bias is None:
        return False
    check_class_prior(prior, last.out_features, last.in_features)
    return True


def spread(freq: torch.Tensor) -> float:
    """Over how many classes a frequency vector spreads: exp of its entropy."""
    q = freq.float() / freq.float().sum().clamp_min(1e-12)
    return float(torch.exp(-(q * q.clamp_min(1e-12).log()).sum()))


def spread_fits(counts: torch.Tensor, prior: ClassPrior) -> tuple[bool, float, float]:
    """Whether the device's pseudo-labels spread over at least half as many classes as the pool's:
    (fits, the device's spread, the pool's)."""
    own, pooled = spread(counts), spread(prior.freq)
    return own >= pooled / 2, own, pooled


@torch.no_grad()
def blend_layer(last: nn.Linear, feats: torch.Tensor, logits: torch.Tensor, prior: ClassPrior):
    """The blended layer's weight and bias: two thirds the base's logits and one third the pooled
    directions' (the device's features centred on its own mean and scaled as the devices scaled
    theirs), the directions' scaled so both spread alike over the device's data."""
    d = prior.directions()
    u, mu, s = centred(feats)
    scale = logits.float().std() / (u @ d.T).std().clamp_min(1e-12)
    w = last.weight.detach().float().cpu()
    b = last.bias.detach().float().cpu()
    a = DIRECTIONS_WEIGHT
    return (1 - a) * w + a * scale * d / s, (1 - a) * b - a * scale * (d @ mu) / s


@torch.no_grad()
def widens(layer: tuple, feats: torch.Tensor, logits: torch.Tensor) -> tuple[bool, float, float]:
    """P10: whether the blended `layer` (blend_layer's weight and bias) spreads the device's mean
    prediction over more classes than the layer it replaces, whose `logits` these are (a shift that
    collapsed the predictions onto a few classes is what the directions undo; where they narrow them
    they add the pool's errors): (widens, before, after)."""
    w, b = layer
    before = spread(F.softmax(logits.float(), 1).mean(0))
    after = spread(F.softmax(feats.float() @ w.T + b, 1).mean(0))
    return after > before, before, after


@torch.no_grad()
def write_layer(last: nn.Linear, feats: torch.Tensor, logits: torch.Tensor, layer: tuple) -> None:
    """The output layer becomes `layer` (blend_layer's weight and bias), computed once for the
    check and the write; a head's write signature."""
    w, b = layer
    last.weight.copy_(w.to(last.weight))
    last.bias.copy_(b.to(last.bias))
