"""The stop rule's search: the schedule's sparsity levels, bisected (or walked) until the label-free
rule fails on the probe, then backed off and judged again on a second probe; how far it may search
is bounded by the user's data."""
from __future__ import annotations

from common.engine.confirm import confirmed
from common.engine.probe import Clock, Probe, collect_stats, probe_samples
from common.engine.restrict import apply_restriction, restrict_logits
from common.engine.scoring import get_scorer
from common.engine.select import compute_scores, mask_at, masker, schedule


def search_bound(cfg, n: int) -> float:
    """How far the stop rule may search on a user with n samples: max-sparsity, times
    n / (n + evidence-samples) (24 samples: 0.41, 60: 0.62, 450: 0.89 of 0.95)."""
    return cfg.max_sparsity * (n / (n + cfg.evidence_samples) if cfg.evidence_samples else 1.0)


def search_levels(cfg, n: int, extra: float = 0.0) -> tuple[list, float]:
    """The schedule's steps up to the search bound of the device's n samples and `extra` samples of
    a prior's evidence, and the device's own bound; where the prior raised the bound past the
    device's own, the device's own is a step too (P8)."""
    own = search_bound(cfg, n)
    levels = schedule(cfg.step, search_bound(cfg, n + extra))
    if all(abs(v - own) > 1e-6 for v in levels) and levels[-1] > own:
        levels = sorted([*levels, own])
    return levels, own


def opens_a_step(cfg, n: int, extra: float) -> bool:
    """Whether `extra` samples of evidence beyond the device's own n (a prior's) let the search
    reach a schedule step past the device's own bound (P9: where they do not, the prior cannot move
    the search, and its ranking would only reorder connections the device's own data rank)."""
    levels, own = search_levels(cfg, n, extra)
    return any(own + 1e-6 < v < levels[-1] - 1e-6 for v in levels)


def back_off(last_ok: int, margin: int, masks: dict, at, levels, dense, reason: str, history, confirm=None,
             floor: int = -1):
    """Where the rule failed, the step `margin` steps below the last that passed: the failing
    level was found on a probe of 32-128 samples, and the step just before a cliff is where held-out
    samples flip first (a user of 200 samples: the probe agreed fully at 0.72, the rest of its
    data 97.5%, held-out accuracy 0.98 -> 0.94); two steps by default, since the search keeps the
    sparsest step its own probe passed, so that verdict is optimistic (S30, S38). A level the
    search did not probe gets BatchNorm statistics of its own when it is kept (Probe.keep: one
    probe pass), never the next step's (a ResNet18 user keeping them: 0.89 -> 0.54 held out under
    full recalibration; under the input side's alone, S29: 0.98 -> 0.84, where its own keep 1.00).
    `confirm`: the second probe judges the step kept (common/engine/confirm.py). `floor`: a step
    that a probed one further down never goes below (P8: the device's own bound)."""
    i = last_ok - margin
    if i < 0:
        return dense, reason + (f"; backed off {margin} step(s): nothing pruned" if margin else ""), history
    # a level the search probed already (passing: every probed level below the last that passed
    # did) one step further down costs no probe pass of its own to keep
    probed = [k for k in masks if max(i - 1, floor) <= k <= i]
    i = max(probed) if probed else i
    reason += f"; backed off to {levels[i]:.3f}" if margin else ""
    if confirm is None:
        return (masks[i] if i in masks else at(levels[i])), reason, history
    j, mask = confirmed(i, masks, at, levels, dense, confirm)
    if j < i:
        reason += (f"; the second probe failed at {levels[i]:.3f}: "
                   + (f"kept {levels[j]:.3f}" if j >= 0 else "nothing pruned"))
    return mask, reason, history


def own_step(levels, own_bound: float | None) -> int:
    """The last schedule step within the device's own search bound (-1: none)."""
    if own_bound is None:
        return len(levels) - 1
    return max((k for k, v in enumerate(levels) if v <= own_bound + 1e-6), default=-1)


def prior_margin(last_ok: int, margin: int, own: int) -> int:
    """Where the search reached a bound that a prior's evidence raised past the device's own
    (common/engine/prior.py), the steps past the device's own bound (its last step `own`) passed
    only its probe, whose verdict there is as optimistic as anywhere (S30, S38): back off `margin`
    steps, but never below `own` (P8). Elsewhere no back-off at the bound."""
    return 0 if last_ok <= own else last_ok - max(own, last_ok - margin)


def search(levels, scores, dense, cfg, rule, probe: Probe, restricted, tick, clock: Clock, confirm=None,
           own_bound: float | None = None):
    """The schedule's step the rule accepts: bisection over the nested masks, or linear; then, with
    `confirm`, on the second probe too. `own_bound`: the device's own search bound, where a prior
    raised `levels` past it."""
    history = []
    own = own_step(levels, own_bound)
    structured = get_scorer(cfg.scoring).structured
    # bisection asks for ~5 sparsities: one k-th value selection each costs less than sorting all
    # scores once; a linear search asks for up to 28
    masks_at = masker(scores, dense, cfg.scope, structured, single=cfg.search == "bisect")

    def at(level):
        m = masks_at(level)
        clock.lap("selection")
        return m

    def check(mask):
        if restricted is not None:
            mask = apply_restriction(probe.model, mask, restricted)
        sparsity = mask.sparsity()
        clock.lap("selection")
        logits, st = probe(mask, sparsity=sparsity)
        if restricted is not None:
            restrict_logits(logits, restricted)
        v = rule.value(logits, st)
        ok = rule.passes(v)
        clock.lap("stop rule")
        history.append({"sparsity": round(sparsity, 4), "value": round(v, 4), "passed": ok})
        tick(2, 3, f"sparsity {sparsity:.2f}: {rule.name}={v:.3f} {'ok' if ok else 'fail'}")
        return ok, v

    def failed(v, level):
        return (f"stop rule '{rule.name}' ({v:.3f}) past tolerance {cfg.tolerance} at sparsity "
                f"{level:.3f}; kept the previous step")

    if cfg.search == "bisect":
        masks = {}
        lo, hi, fail_v = -1, len(levels), None  # levels[lo] passes, levels[hi] fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            masks[mid] = at(levels[mid])
            ok, v = check(masks[mid])
            if ok:
                lo = mid
            else:
                hi, fail_v = mid, v
        if lo < 0:
            return dense, failed(fail_v, levels[0]) + " (nothing pruned)", history
        if hi == len(levels):
            return back_off(lo, prior_margin(lo, cfg.stop_margin, own), masks, at, levels, dense,
                            f"reached the search bound {levels[-1]:.3f} within tolerance", history, confirm,
                            floor=own)
        return back_off(lo, cfg.stop_margin, masks, at, levels, dense, failed(fail_v, levels[hi]), history, confirm)

    mask, kept = dense, {}
    for i, level in enumerate(levels):
        # fixed scores give nested masks; re-scored ones rank what is left of the current mask
        cand = mask_at(scores, mask, level, cfg.scope, structured) if cfg.rescore else at(level)
        ok, v = check(cand)
        if not ok:
            return back_off(i - 1, cfg.stop_margin, kept, at, levels, dense, failed(v, level), history, confirm)
        mask = kept[i] = cand
        if cfg.rescore:  # usage of the surviving connections, measured in the pruned network
            probe_x = probe.data[:probe_samples(cfg, len(probe.data))]
            st, _ = collect_stats(probe.model, probe_x, cfg.batch_size, probe.device,
                                  classes="classes" in get_scorer(cfg.scoring).needs)
            history[-1]["stat_samples"] = len(probe_x)
            clock.lap("probe passes")
            scores = compute_scores(probe.model, st, cfg.scoring, cfg.seed, keep_last=cfg.head != "linear")
            clock.lap("scores")
    reason = f"reached the search bound {levels[-1]:.3f} within tolerance"
    m = prior_margin(len(levels) - 1, cfg.stop_margin, own)
    if (confirm is None and not m) or not kept:
        return mask, reason, history
    return back_off(len(levels) - 1, m, kept, at, levels, dense, reason, history, confirm, floor=own)
