"""bn-adapt auto's label-free check: after the statistics pass recalibrated every BatchNorm layer,
keep that (full) only where the layers past the input side moved beyond their class mix and beyond
what the user's few samples move them by chance (S28), and it agrees with a recalibration that
cannot absorb a class mix; otherwise only the input side follows the user, where following it
brings the other layers significantly closer to the base's statistics (S27, S28), else none does.
Full recalibration of a user whose pseudo-labels hold few classes follows only what their class
mix does not predict (class-mix, S43); so does the input side, where it alone follows a user whose
first layer's statistics a class mix of few classes explains (S47)."""
from __future__ import annotations

import torch

from common.engine import adapt as AD
from common.engine import class_mix as CM
from common.engine.bn import (
    add_sums,
    bn_layers,
    bn_prior,
    load_bn_stats,
    per_sample_sums,
    recalibrate_bn,
    sampling_noise,
)
from common.engine.hidden_shift import NO_LABEL_SHIFT

# S47: a class mix is taken for what moved the input side where it explains more of the move than
# it leaves (set before the screen: of its users whose mix spreads over few classes, the styled
# ones reach 0.43, one pale-ink user 0.52-0.53, the unstyled ones start at 0.56; docs/personalization.md)
MIX_EXPLAINS = 0.5


def check_full(model, x, pick, logits, prior, spread, cfg, device, meta=None):
    """bn-adapt auto, after the statistics pass recalibrated every layer: keep that (full) where the
    layers past the input side moved beyond their class mix (deep_shift at least DEEP_SHIFT, and so
    beyond sampling noise on the user's samples, S28) and, on
    the probe (at most CHECK_SAMPLES of it), it predicts no more than SLACK classes beyond what a recalibration of only the
    channels the class mix cannot explain predicts (the checkpoint's class spread), and agrees with
    it on a share of the samples that does not refute AGREE (agree_floor); otherwise keep only the
    input side recalibrated, where that brings the layers that keep the base's statistics closer to
    them on those samples than no recalibration does, beyond chance (S27, S28; else none follows).
    Where full passes, but the safe recalibration's pseudo-labels spread over less than
    NO_LABEL_SHIFT of the classes (a class mix to keep out of the statistics) and the checkpoint's
    metadata (`meta`) records each class's moments (class_mix.moments_for, read only then): class-mix,
    every channel following only what the class mix those pseudo-labels estimate does not predict
    (S43). Returns
    (mode, the recalibration keyword arguments of the kept mode, what the check saw, samples passed)."""
    bns, full = bn_layers(model), bn_prior(model)  # the statistics pass's, kept to restore
    n_stem = AD.stem_count(model)
    shift = AD.deep_shift(full, prior, spread, n_stem)
    check = {} if shift is None else {"deep_shift": round(shift, 4)}
    load_bn_stats(bns, prior)
    if shift is not None and shift < AD.DEEP_SHIFT:
        # no covariate shift past the input side to follow: nothing full recalibration could gain
        # there but the class mix, and no check pass to pay for
        return "stem", stem_recal(model, prior, spread, full, meta, check), check, 0
    pick = pick[:AD.CHECK_SAMPLES]  # a class the user has shows in 64 samples; the check costs at most that
    xp = x[pick]
    with PerSampleSpread(bns[n_stem:]) as spread_a:  # the safe reference as the check's thresholds were set on
        safe, _ = recalibrate_bn(model, xp, cfg.batch_size, device, prior=prior, spread=spread, kappa=AD.KAPPA,
                                 chance=False)
    # S28: the move must also exceed what sampling noise alone gives on the user's samples
    noise = [sampling_noise(per, var_b, len(x)) for per, (_, var_b) in zip(spread_a.sums, prior[n_stem:])]
    evident = AD.deep_shift(full, prior, spread, n_stem, noise=noise)
    k_full, k_safe = AD.classes_predicted(logits[pick]), AD.classes_predicted(safe)
    agree = float((logits[pick].argmax(1) == safe.argmax(1)).float().mean())
    check.update(classes_full=k_full, classes_safe=k_safe, agreement=round(agree, 4))
    if evident is not None:
        check["deep_shift_evident"] = round(evident, 4)
    if (k_full <= k_safe + AD.SLACK and agree >= AD.agree_floor(len(xp))
            and (evident is None or evident >= AD.DEEP_SHIFT)):
        share = CM.pseudo_label_share(safe)
        check["safe_label_share"] = round(share, 4)
        moments = CM.moments_for(model, meta) if share < NO_LABEL_SHIFT else None
        if moments is not None:
            # S43: the class mix the safe recalibration sees, its mean probabilities
            pi = torch.softmax(safe.float(), 1).mean(0)
            return "class-mix", dict(prior=prior, classmix=CM.class_mix(moments, pi)), check, len(xp)
        load_bn_stats(bns, full)
        return "full", {}, check, len(xp)
    # the input side follows only where that brings the layers keeping the base's statistics
    # closer to them than they are without it (S27); else no layer follows
    stem, none = stem_recal(model, prior, spread, full, meta, check), none_recal(prior)
    if len(bns) <= n_stem:  # no layer past the input side that it could move away
        return "stem", stem, check, len(xp)
    kept = {k: _kept_weights(model, xp, r, device, prior, spread, n_stem) for k, r in (("stem", stem), ("none", none))}
    check.update({f"kept_shift_{k}": round(float(v.mean()), 4) for k, v in kept.items()})
    if not _closer(kept["stem"], kept["none"]):
        return "none", none, check, 3 * len(xp)
    return "stem", stem, check, 3 * len(xp)


def _closer(a, b, z: float = AD.AGREE_Z) -> bool:
    """Whether per-channel weights `a` lie below `b` on average by more than z standard errors of
    their paired difference across channels (one-sided; S28: a tie within chance keeps the base's)."""
    d = (a - b).float()
    return bool(d.mean() < -z * d.std() / max(len(d), 1) ** 0.5) if len(d) > 1 else bool(d.sum() < 0)


class PerSampleSpread:
    """Forward pre-hooks on BatchNorm layers: each layer's per-sample input moments, summed
    (per_sample_sums, S28)."""

    def __init__(self, layers: list):
        self.layers, self.sums, self.handles = layers, [None] * len(layers), []

    def _hook(self, i):
        def pre(_m, args):
            self.sums[i] = add_sums(self.sums[i], per_sample_sums(args[0]))
        return pre

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _kept_weights(model, xp, recal, device, prior, spread, n_stem: int) -> torch.Tensor:
    """S27's measure, per channel: with the model recalibrated as `recal` says, how far the layers
    past the input side moved from the base's statistics beyond their class mix, their input moments over `xp`
    (samples and positions) against the base's, and, since S28, beyond what sampling noise on those
    few samples moves them by (otherwise the comparison reads chance on a user of a few samples)."""
    with PerSampleSpread(bn_layers(model)[n_stem:]) as per:  # the input side's are not compared
        recalibrate_bn(model, xp, len(xp), device, **recal)
    moments = []
    for s, k in per.sums:
        mean = s[0] / k
        moments.append((mean, (s[2] / k - mean * mean).clamp_min(0)))
    noise = [sampling_noise(s, var_b) for s, (_, var_b) in zip(per.sums, prior[n_stem:])]
    return AD.deep_weights(moments, prior[n_stem:], spread[n_stem:], 0, noise=noise)


def none_recal(prior) -> dict:
    """recalibrate_bn's arguments for no layer following the user: every layer keeps the base's
    statistics (the passes still run through recalibrate_bn, so pruning's lost means shift them)."""
    return dict(profile=lambda _i, _layers: 0.0, prior=prior)


def stem_recal(model, prior, spread, full=None, meta=None, check=None) -> dict:
    """recalibrate_bn's arguments for bn-adapt stem: the input side only, and there, where the
    checkpoint records the class spread, only the channels the class mix cannot explain (a first
    layer of a network on feature vectors is class-specific itself). S47: KAPPA x the class spread
    does not bound what a single class moves a channel by (a ResNet18 user holding one class:
    1.00 -> 0.69). Where the checkpoint records each class's moments (`meta`) and a class mix
    explains more than MIX_EXPLAINS of how the first BatchNorm layer's statistics of the pass
    (`full`; its inputs owe nothing to any recalibration) moved from the vendor's, and that mix
    spreads over less than NO_LABEL_SHIFT of the classes, every input-side channel follows only
    what the mix does not predict (class_mix_stats), at no pass."""
    kw = dict(profile=AD.stem_profile(model), prior=prior)
    # a one-channel first layer (the speech model's input normalization) tells no class mix
    fits = full is not None and bn_layers(model)[0].num_features > 1
    first = CM.moments_for(model, meta, first=1) if fits else None
    if first is not None:
        pi, explained = CM.fit_mix(*full[0], first[0], prior[0][1])
        share = CM.spread(pi) / len(pi)
        if check is not None:
            check.update(stem_mix_explained=round(explained, 4), stem_mix_share=round(share, 4))
        moments = CM.moments_for(model, meta) if explained > MIX_EXPLAINS and share < NO_LABEL_SHIFT else None
        if moments is not None:  # every layer's record read only now, and only if it fits
            return dict(kw, classmix=CM.class_mix(moments, pi))
    return dict(kw, spread=spread, kappa=AD.KAPPA) if spread is not None else kw


