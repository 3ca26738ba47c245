"""bn-adapt auto's label-free check: after the statistics pass recalibrated every BatchNorm layer,
keep that (full) only where the layers past the input side moved beyond their class mix and it
agrees with a recalibration that cannot absorb one; otherwise only the input side follows the user,
where following it brings the other layers closer to the base's statistics (S27), else none does."""
from __future__ import annotations

import torch

from common.engine import adapt as AD
from common.engine.bn import bn_layers, bn_prior, load_bn_stats, recalibrate_bn


def check_full(model, x, pick, logits, prior, spread, cfg, device):
    """bn-adapt auto, after the statistics pass recalibrated every layer: keep that (full) where the
    layers past the input side moved beyond their class mix (deep_shift at least DEEP_SHIFT) and, on
    the probe (at most CHECK_SAMPLES of it), it predicts no more than SLACK classes beyond what a recalibration of only the
    channels the class mix cannot explain predicts (the checkpoint's class spread), and agrees with
    it on a share of the samples that does not refute AGREE (agree_floor); otherwise keep only the
    input side recalibrated, where that brings the layers that keep the base's statistics closer to
    them on those samples than no recalibration does (S27; else none follows). Returns
    (mode, the recalibration keyword arguments of the kept mode, what the check saw, samples passed)."""
    bns, full = bn_layers(model), bn_prior(model)  # the statistics pass's, kept to restore
    shift = AD.deep_shift(full, prior, spread, AD.stem_count(model))
    check = {} if shift is None else {"deep_shift": round(shift, 4)}
    load_bn_stats(bns, prior)
    if shift is not None and shift < AD.DEEP_SHIFT:
        # no covariate shift past the input side to follow: nothing full recalibration could gain
        # there but the class mix, and no check pass to pay for
        return "stem", stem_recal(model, prior, spread), check, 0
    pick = pick[:AD.CHECK_SAMPLES]  # a class the user has shows in 64 samples; the check costs at most that
    xp = x[pick]
    safe, _ = recalibrate_bn(model, xp, cfg.batch_size, device, prior=prior, spread=spread, kappa=AD.KAPPA)
    k_full, k_safe = AD.classes_predicted(logits[pick]), AD.classes_predicted(safe)
    agree = float((logits[pick].argmax(1) == safe.argmax(1)).float().mean())
    check.update(classes_full=k_full, classes_safe=k_safe, agreement=round(agree, 4))
    if k_full <= k_safe + AD.SLACK and agree >= AD.agree_floor(len(xp)):
        load_bn_stats(bns, full)
        return "full", {}, check, len(xp)
    # the input side follows only where that brings the layers keeping the base's statistics
    # closer to them than they are without it (S27); else no layer follows
    stem, none = stem_recal(model, prior, spread), none_recal(prior)
    kept = {k: AD.deep_shift(_moments(model, xp, r, device), prior, spread, AD.stem_count(model))
            for k, r in (("stem", stem), ("none", none))}
    check.update({f"kept_shift_{k}": round(v, 4) for k, v in kept.items()})
    if kept["stem"] >= kept["none"]:
        return "none", none, check, 3 * len(xp)
    return "stem", stem, check, 3 * len(xp)


def _moments(model, xp, recal, device) -> list:
    """Each BatchNorm layer's input mean and variance over `xp` (samples and positions), the model
    recalibrated as `recal` says (its running statistics are left as that pass sets them)."""
    got = []

    def pre(_m, args):
        h = args[0].detach().float()
        dims = tuple(d for d in range(h.dim()) if d != 1)
        var, mean = torch.var_mean(h, dim=dims, unbiased=False)
        got.append((mean, var))

    handles = [m.register_forward_pre_hook(pre) for m in bn_layers(model)]
    try:
        recalibrate_bn(model, xp, len(xp), device, **recal)
    finally:
        for h in handles:
            h.remove()
    return got


def none_recal(prior) -> dict:
    """recalibrate_bn's arguments for no layer following the user: every layer keeps the base's
    statistics (the passes still run through recalibrate_bn, so pruning's lost means shift them)."""
    return dict(profile=lambda _i, _layers: 0.0, prior=prior)


def stem_recal(model, prior, spread) -> dict:
    """recalibrate_bn's arguments for bn-adapt stem: the input side only, and there, where the
    checkpoint records the class spread, only the channels the class mix cannot explain (a first
    layer of a network on feature vectors is class-specific itself)."""
    kw = dict(profile=AD.stem_profile(model), prior=prior)
    return dict(kw, spread=spread, kappa=AD.KAPPA) if spread is not None else kw


