"""bn-adapt auto's label-free check: after the statistics pass recalibrated every BatchNorm layer,
keep that (full) only where the layers past the input side moved beyond their class mix and it
agrees with a recalibration that cannot absorb one; otherwise only the input side follows the user."""
from __future__ import annotations

from common.engine import adapt as AD
from common.engine.bn import bn_layers, bn_prior, load_bn_stats, recalibrate_bn


def check_full(model, x, pick, logits, prior, spread, cfg, device):
    """bn-adapt auto, after the statistics pass recalibrated every layer: keep that (full) where the
    layers past the input side moved beyond their class mix (deep_shift at least DEEP_SHIFT) and, on
    the probe (at most CHECK_SAMPLES of it), it predicts no more than SLACK classes beyond what a recalibration of only the
    channels the class mix cannot explain predicts (the checkpoint's class spread), and agrees with
    it on a share of the samples that does not refute AGREE (agree_floor); otherwise keep only the
    input side recalibrated. Returns
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
    return "stem", stem_recal(model, prior, spread), check, len(xp)


def stem_recal(model, prior, spread) -> dict:
    """recalibrate_bn's arguments for bn-adapt stem: the input side only, and there, where the
    checkpoint records the class spread, only the channels the class mix cannot explain (a first
    layer of a network on feature vectors is class-specific itself)."""
    kw = dict(profile=AD.stem_profile(model), prior=prior)
    return dict(kw, spread=spread, kappa=AD.KAPPA) if spread is not None else kw


