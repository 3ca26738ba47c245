"""BatchNorm following the user, forward only: the layers' statistics re-estimated on the user's
data (AdaBN), in full or as a mixture with the base's, per layer and per channel."""
from __future__ import annotations

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


def explained_weight(mean, var, mu_b, var_b, spread, kappa: float, eps: float = 1e-5):
    """Per channel, how far its statistics follow the user: the share of their move that the
    user's class mix cannot explain. `spread` is the channel's between-class share of variance on
    the vendor's data (eta^2, common.engine.adapt.class_spread): a channel whose mean no class moves
    follows the user fully; a class-specific one only where its move exceeds kappa x eta^2.
    move^2 is the squared mean shift plus the squared log-variance change, in base units."""
    move = (mean - mu_b) ** 2 / (var_b + eps) + torch.log((var + eps) / (var_b + eps)) ** 2
    return (1 - kappa * spread.to(move) / move.clamp_min(1e-12)).clamp(0, 1)


def _mixed_forward(m, prior, sums: list, weight: float, spread=None, kappa: float = 1.0, first_bn=None, i=0):
    """A BatchNorm forward that normalizes each batch by the mixture of the base's distribution
    (weight 1 - w) and the batch's own (weight w): mean (1-w) mu_b + w mu, variance the mixture's,
    (1-w) var_b + w var + w (1-w) (mu - mu_b)^2, with w per channel where `spread` is given.
    Layers downstream see the features as the kept model computes them; the batch's own moments
    are summed, weighted by its samples, into `sums`."""
    mu_b, var_b = prior

    def forward(x):
        # the batch's statistics from BatchNorm's own kernel (faster than torch.var_mean over a
        # channels_last map), with its output: the layer's where it follows the batch
        out, mean, invstd = torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps)
        var = (invstd.pow(-2) - m.eps).clamp_min(0)
        n, b = x.numel() // x.shape[1], x.shape[0]
        sums[0] += b
        sums[1] = sums[1] + mean * b
        sums[2] = sums[2] + var * (n / max(n - 1, 1)) * b  # unbiased, as BatchNorm's running_var
        if first_bn is not None and first_bn[i] is None:  # what a pass over the first batch alone keeps
            first_bn[i] = _mix(mean, var * (n / max(n - 1, 1)), mu_b.to(mean), var_b.to(var), weight, spread, kappa)
        if weight == 1.0 and spread is None:
            return out
        mean_m, var_m = _mix(mean, var, mu_b.to(mean), var_b.to(var), weight, spread, kappa)
        return F.batch_norm(x, mean_m, var_m, m.weight, m.bias, False, 0.0, m.eps)
    return forward


def _mix(mean, var, mu_b, var_b, weight: float, spread, kappa: float):
    w = weight if spread is None else weight * explained_weight(mean, var, mu_b, var_b, spread, kappa)
    return (1 - w) * mu_b + w * mean, (1 - w) * var_b + w * var + w * (1 - w) * (mean - mu_b) ** 2


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
                   hooks: bool | None = None, classes: bool = False, first: torch.Tensor | None = None,
                   weight: float = 1.0, prior: list | None = None, profile=None, spread: list | None = None,
                   kappa: float = 1.0, means: bool = False, first_bn: list | None = None):
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
    alone would have left them (with `first` in one batch: a probe pass's, for free)."""
    bns = bn_layers(model)
    if first_bn is not None:
        first_bn[:] = [None] * len(bns)
    if weight < 1.0 or profile is not None or spread is not None:
        prior = prior if prior is not None else bn_prior(model)
        sums = [[0, 0.0, 0.0] for _ in bns]
        ws = [weight * (1.0 if profile is None else float(profile(i, len(bns)))) for i in range(len(bns))]
        sp = spread if spread is not None else [None] * len(bns)
        # a layer that keeps the base's statistics runs BatchNorm's own eval forward on them
        follows = [w > 0 for w in ws]
        for i, (m, pr, s, w, spr, f) in enumerate(zip(bns, prior, sums, ws, sp, follows)):
            if f:
                m.forward = _mixed_forward(m, pr, s, w, spr, kappa, first_bn, i)
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
        for m, (mu_b, var_b), (n, s1, s2), w, spr in zip(bns, prior, sums, ws, sp):
            if n:
                mean, var = _mix(s1 / n, s2 / n, mu_b.to(s1), var_b.to(s1), w, spr, kappa)
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
