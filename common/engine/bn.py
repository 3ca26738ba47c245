"""BatchNorm following the user, forward only: the layers' statistics re-estimated on the user's
data (AdaBN), in full, as a mixture with the base's per layer and per channel, or moved by what the
user's class mix predicts (S43). Over 250 lines: every partial mode runs the one mixed forward
and keeps the statistics it normalized by, so the modes and their sampling noise (S28) live here."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.forward import forward_pass


def bn_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def load_bn_stats(bns: list, stats: list) -> None:
    """Set BatchNorm layers' running statistics to (mean, var) pairs as bn_prior returns them."""
    for m, (mean, var) in zip(bns, stats):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def bn_prior(model: nn.Module) -> list:
    """The model's BatchNorm statistics now (the base's, before any adaptation): what a partial
    recalibration keeps part of. One (mean, var) pair per BatchNorm layer, in module order."""
    return [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in bn_layers(model)]


NOISE_Z = 1.645  # beyond sampling noise: past this many standard errors (one-sided 95%, as adapt.AGREE_Z)


def per_sample_sums(h: torch.Tensor) -> tuple:
    """A BatchNorm input's per-sample moments, summed over the samples: each sample's mean a and
    mean square b over its positions, per channel, as ((5, channels): sum a, sum a^2, sum b, sum b^2,
    sum ab; samples). Positions within a sample are correlated, so samples, not positions, set how
    far a layer's statistics move by chance (S28). A large input is squared a piece at a time."""
    h = h.detach().float()
    dims = tuple(range(2, h.dim()))
    if not dims:
        a, b = h, h * h
    else:
        a = h.mean(dims)
        rows = max(1, (1 << 20) // max(h[:1].numel(), 1))  # about 4 MB of squares at a time
        b = (h * h).mean(dims) if rows >= len(h) else torch.cat([(c * c).mean(dims) for c in h.split(rows)])
    return torch.stack((a, a * a, b, b * b, a * b)).sum(1), h.shape[0]


def t_quantile(z: float, dof: int) -> float:
    """Student's t quantile at the normal quantile z for `dof` degrees of freedom (Cornish-Fisher,
    three terms: 2.35 for 3, 1.70 for 30, within 1% from 2 on): a standard error estimated on a few
    samples is itself uncertain."""
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3


def add_sums(total, s):
    return s if total is None else (total[0] + s[0], total[1] + s[1])


def sampling_noise(sums: tuple, var_b: torch.Tensor, n: int | None = None, z: float = NOISE_Z) -> torch.Tensor:
    """Per channel, the squared move (explained_weight's units) that sampling noise alone reaches
    with z standard errors (Student's, for errors estimated on the samples summed), for a layer's
    statistics estimated on n samples (default: those summed; per_sample_sums, S28): the mean's
    error against the base's variance plus the log-variance's (the delta method: the variance moves
    by b - 2 m a per sample). Infinite below two samples: nothing tells a move from chance."""
    s, k = sums
    n = k if n is None else n
    if k < 2 or n < 2:
        return torch.full_like(s[0], math.inf)
    # a few elementwise operations on one vector per channel: NumPy's call costs a fraction of a
    # tensor operation's (a digits user's passes call this a dozen times)
    m = s.cpu().numpy().astype(np.float64) / k
    ma, mb = m[0], m[2]
    va, vab_b = m[1] - ma * ma, m[3] - mb * mb
    cab = m[4] - ma * mb
    f = k / (k - 1)
    var_d = np.maximum(f * (vab_b + 4 * ma * ma * va - 4 * ma * cab), 0)
    var = np.maximum(mb - ma * ma, 0)
    t = t_quantile(z, k - 1)
    vb = var_b.detach().cpu().numpy().astype(np.float64)
    out = t * t * (np.maximum(f * va, 0) / (vb + 1e-5) + var_d / (var + 1e-5) ** 2) / n
    return torch.from_numpy(out.astype(np.float32)).to(s.device)


class Chance:
    """Per BatchNorm layer, its input's per-sample moments over all of the user's data (the statistics
    pass's): a later pass over k of the samples (a probe's) takes its noise from them, once per size (S28)."""

    def __init__(self, sums: list):
        self.sums, self._noise = sums, {}

    def noise(self, i: int, var_b: torch.Tensor, n: int) -> torch.Tensor | None:
        if self.sums[i] is None:
            return None
        key = (i, n, id(var_b))
        if key not in self._noise:
            self._noise[key] = sampling_noise(self.sums[i], var_b, n)
        return self._noise[key]


def explained_weight(mean, var, mu_b, var_b, spread, kappa: float, eps: float = 1e-5, noise=None):
    """Per channel, how far its statistics follow the user: the share of their move that the
    user's class mix cannot explain. `spread` is the channel's between-class share of variance on
    the vendor's data (eta^2, the vendor record's class_spread): a channel whose mean no class moves
    follows the user fully; a class-specific one only where its move exceeds kappa x eta^2, and,
    given its `noise` (sampling_noise), only by what it moves beyond it (S28).
    move^2 is the squared mean shift plus the squared log-variance change, in base units."""
    vb = var_b + eps
    move = (mean - mu_b) ** 2 / vb + torch.log((var + eps) / vb) ** 2
    explained = kappa * spread.to(move) if noise is None else kappa * spread.to(move) + noise.to(move)
    return (1 - explained / move.clamp_min(1e-12)).clamp(0, 1)


def _mixed_forward(m, prior, sums: list, weight: float, spread=None, kappa: float = 1.0, first_bn=None, i=0,
                   chance: bool = True, chance_from: Chance | None = None, mix=None):
    """A BatchNorm forward that normalizes each batch by the mixture of the base's distribution
    (weight 1 - w) and the batch's own (weight w): mean (1-w) mu_b + w mu, variance the mixture's,
    (1-w) var_b + w var + w (1-w) (mu - mu_b)^2, with w per channel where `spread` is given.
    Layers downstream see the features as the kept model computes them; the batch's own moments
    are summed, weighted by its samples, into `sums`, and, with `spread` and `chance`, its per-sample
    moments (per_sample_sums) into sums[3], or, given `chance_from`, none: its noise is theirs (S28);
    a channel follows only what it moves beyond sampling noise. `mix`: the class mix's (mean, var)
    of this layer (class_mix_stats)."""
    mu_b, var_b = prior

    def forward(x):
        # the batch's statistics from BatchNorm's own kernel (faster than torch.var_mean over a
        # channels_last map), with its output: the layer's where it follows the batch
        out, mean, invstd = torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps)
        var = (invstd.pow(-2) - m.eps).clamp_min(0)
        n, b = x.numel() // x.shape[1], x.shape[0]
        sums[0] += b
        sums[5] += 1
        sums[1] = sums[1] + mean * b
        sums[2] = sums[2] + var * (n / max(n - 1, 1)) * b  # unbiased, as BatchNorm's running_var
        noise = None
        if spread is not None and chance and chance_from is not None:
            noise = chance_from.noise(i, var_b, b)
        elif spread is not None and chance:
            per = per_sample_sums(x)
            sums[3] = add_sums(sums[3], per)
            noise = sums[4] = sampling_noise(per, var_b)  # a pass of one batch: the whole pass's too
        mu, vb = mu_b.to(mean), var_b.to(var)
        if first_bn is not None and first_bn[i] is None:  # what a pass over the first batch alone keeps
            first_bn[i] = _mix(mean, var * (n / max(n - 1, 1)), mu, vb, weight, spread, kappa, noise, mix)
        if weight == 1.0 and spread is None and mix is None:
            return out
        mean_m, var_m = _mix(mean, var, mu, vb, weight, spread, kappa, noise, mix)
        return F.batch_norm(x, mean_m, var_m, m.weight, m.bias, False, 0.0, m.eps)
    return forward


def _mix(mean, var, mu_b, var_b, weight: float, spread, kappa: float, noise=None, mix=None):
    if mix is not None:
        return class_mix_stats(mean, var, mu_b, var_b, *mix)
    w = weight if spread is None else weight * explained_weight(mean, var, mu_b, var_b, spread, kappa, noise=noise)
    return (1 - w) * mu_b + w * mean, (1 - w) * var_b + w * var + w * (1 - w) * (mean - mu_b) ** 2


def class_mix_stats(mean, var, mu_b, var_b, mean_pi, var_pi):
    """A channel's statistics that follow the user only in what its class mix does not predict
    (S43): `mean_pi`, `var_pi` are the channel's over the vendor's data drawn in the user's class
    mix (common.engine.class_mix.class_mix). The user's features are normalized to the moments the
    base's normalized features have in that mix, an affine shift per channel: mean + a (mu_b -
    mean_pi), variance a^2 var_b, with a^2 = var / var_pi. In the vendor's own mix it is full
    recalibration."""
    a2 = var / var_pi.to(var)
    return mean + a2.sqrt() * (mu_b - mean_pi.to(mean)), a2 * var_b


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
                   hooks: bool | None = None, classes: bool = False, first: torch.Tensor | None = None,
                   weight: float = 1.0, prior: list | None = None, profile=None, spread: list | None = None,
                   kappa: float = 1.0, means: bool = False, first_bn: list | None = None, chance: bool = True,
                   chance_from: Chance | None = None, chance_out: list | None = None, classmix: list | None = None):
    """Re-estimate BatchNorm running statistics on the user's data (forward only). The same pass
    gives the logits (each batch normalized by its own statistics: with one batch, what the
    recalibrated model outputs) and, with `hooks` not None, usage statistics of the recalibrated
    model (hooks=True: output statistics too); returns (logits, stats). `first`: see batches.

    A partial recalibration (`weight` < 1, a `profile` or a `spread`): each layer keeps the
    mixture of the base's statistics (`prior`, from bn_prior; default the model's own now) and the
    user's, the user's weighted `weight` x profile(i, layers) (layer i's share; default 1) x, with
    `spread` (one tensor per layer), each channel's explained_weight. The pass normalizes by that
    mixture, so its logits and usage statistics are the kept model's. weight 1 everywhere is full
    recalibration (AdaBN), which takes BatchNorm's own train-mode path.

    `first_bn`: an empty list, filled with each layer's (mean, var) as a pass over the first batch
    alone would have left them (with `first` in one batch: a probe pass's, for free). `chance`:
    with `spread`, a channel follows only what it moved beyond sampling noise too (S28), measured
    in this pass (then left in `chance_out`, an empty list, one entry per layer) or, for a pass over
    some of the same samples, taken from an earlier one's (`chance_from`). `classmix`: per layer,
    the (mean, var) the user's class mix predicts (common.engine.class_mix.class_mix): every channel
    follows only what that mix does not predict (class_mix_stats, S43; with `prior`)."""
    bns = bn_layers(model)
    if first_bn is not None:
        first_bn[:] = [None] * len(bns)
    if weight < 1.0 or profile is not None or spread is not None or classmix is not None:
        prior = prior if prior is not None else bn_prior(model)
        sums = [[0, 0.0, 0.0, None, None, 0] for _ in bns]
        ws = [weight * (1.0 if profile is None else float(profile(i, len(bns)))) for i in range(len(bns))]
        sp = spread if spread is not None else [None] * len(bns)
        cm = classmix if classmix is not None else [None] * len(bns)
        # a layer that keeps the base's statistics runs BatchNorm's own eval forward on them
        follows = [w > 0 for w in ws]
        for i, (m, pr, s, w, spr, f) in enumerate(zip(bns, prior, sums, ws, sp, follows)):
            if f:
                m.forward = _mixed_forward(m, pr, s, w, spr, kappa, first_bn, i, chance, chance_from, cm[i])
            else:
                load_bn_stats([m], [pr])
                if first_bn is not None:
                    first_bn[i] = (pr[0].clone(), pr[1].clone())
        try:
            out = forward_pass(model, x, batch_size, device, hooks=hooks, classes=classes, first=first, means=means)
        finally:
            for m, f in zip(bns, follows):
                if f:
                    del m.forward
        if chance_out is not None:
            chance_out[:] = [s[3] for s in sums]
        for i, (m, (mu_b, var_b), (n, s1, s2, per, last, batches), w, spr, c) in enumerate(
                zip(bns, prior, sums, ws, sp, cm)):
            if n:
                noise = (None if spr is None or not chance else chance_from.noise(i, var_b, n) if chance_from
                         else last if batches == 1 else sampling_noise(per, var_b))
                mean, var = _mix(s1 / n, s2 / n, mu_b.to(s1), var_b.to(s1), w, spr, kappa, noise, c)
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        model.eval()
        return out
    saved = [m.momentum for m in bns]
    seen = [0] * len(bns)

    def weigh(i):
        # the running statistics average the batches weighted by their samples (momentum None
        # weighs batches equally: a last batch of 2 counted as much as one of 256)
        def pre(m, args):
            b = args[0].shape[0]
            seen[i] += b
            m.momentum = b / seen[i]
        return pre

    def capture(i):
        def post(m, args, out):
            if first_bn[i] is None:  # after the first batch (momentum 1): that batch's statistics
                first_bn[i] = (m.running_mean.clone(), m.running_var.clone())
        return post

    handles = [m.register_forward_pre_hook(weigh(i)) for i, m in enumerate(bns)]
    if first_bn is not None:
        handles += [m.register_forward_hook(capture(i)) for i, m in enumerate(bns)]
    for m in bns:
        m.reset_running_stats()
        m.train()
    try:
        return forward_pass(model, x, batch_size, device, hooks=hooks, classes=classes, first=first, means=means)
    finally:
        for h in handles:
            h.remove()
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
