"""Label-free fine-pruning, the orchestration: adapt the model to the user (one statistics pass,
the BatchNorm check, the output head), then prune it (scores, and the mask the stop rule accepts
on the probe, or a fixed target), then keep it (the mask's BatchNorm statistics, refit). Each step
lives in its own module; the settings arrive as a PruneConfig (common/settings.py)."""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from common.engine.confirm import Confirm, confirm_pick
from common.engine.forward import engine_layout, features_and_logits, settle_layout, to_layout
from common.engine.heads import HEADS
from common.engine.prepare import Adapted, adapt
from common.engine.prior import Prior, blend, own_weight
from common.engine.probe import Clock, Probe, probe_pick
from common.engine.refit import refit_consumers
from common.engine.restrict import apply_restriction, doubtful_removals, restrict_logits, restricted_classes
from common.engine.scoring import get_scorer
from common.engine.search import opens_a_step, search, search_levels
from common.engine.select import compute_scores, masker, schedule
from common.engine.stats import UsageStats
from common.engine.stop import RULES, make_rule
from common.model.architectures import prunable_layers, require_reader_links
from common.model.mask import Mask
from common.model.restricted import restricted_model


@dataclass
class PruneResult:
    mask: Mask
    sparsity: float
    stop_reason: str
    restricted_classes: list | None
    seconds: float
    forward_samples: int            # samples pushed through the model, all passes together
    history: list = field(default_factory=list)  # (sparsity, rule value, passed)
    stats: UsageStats | None = None  # usage statistics of the unpruned model on the user's data
    phases: dict = field(default_factory=dict)  # phase -> wall seconds (where the time went)
    adaptation: dict = field(default_factory=dict)  # what adapted: BatchNorm mode, head, the checks' values
    class_means: tuple | None = None  # (means, counts): this device's share of the class directions

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("mask", "stats", "class_means"):
            d.pop(k)
        return d


def check_config(cfg):
    """The config's own checks, then those that need the engine's registries."""
    cfg.validate()
    if cfg.refit and not get_scorer(cfg.scoring).structured:
        raise ValueError("refit re-solves the layers that read removed units: it needs a structured scorer "
                         "(firing, channel-usage)")
    return cfg


def usable_inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The user's data as the engine takes them, or a ValueError that names what is wrong: no
    samples, integers (raw pixels or PCM: their units are the caller's to convert), NaN or
    infinite values (one of them would make every BatchNorm statistic and prototype NaN).
    Floating point of another precision is converted to the model's (float64 from NumPy)."""
    if len(x) == 0:
        raise ValueError("no personalization data: the user's data set is empty")
    if not x.is_floating_point():
        raise ValueError(f"personalization data are {x.dtype}, not floating point: convert them to the units "
                         f"the base was trained on (for example images in [0, 1], audio in [-1, 1])")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("personalization data contain NaN or infinite values")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    return x if x.dtype == dtype else x.to(dtype)


def fine_prune(model: nn.Module, x: torch.Tensor, cfg, device: str = "cpu", progress=None,
               base_meta: dict | None = None, prior: Prior | None = None) -> PruneResult:
    """Personalize `model` in place on unlabeled inputs `x`. Returns the mask and a report.
    `progress(done, total, text)` is called as work advances. `base_meta`: the base checkpoint's
    metadata, with what its vendor recorded for the device (class spread, input profile; see
    common/engine/adapt.py); without them the checks fall back to their conservative side. `prior`:
    what the federation's last round pruned (common/engine/prior.py) and its class directions
    (common/engine/class_prior.py); None: the device alone."""
    check_config(cfg)
    x = usable_inputs(model, x)
    # checked before the statistics pass, not after it in refit_consumers
    links = require_reader_links(model, "refit") if cfg.refit else []
    t0 = time.perf_counter()
    clock = Clock(device)
    tick = progress or (lambda *a: None)
    model.to(device).eval()
    # the passes run in the engine's layout (channels_last for a conv net) where the model runs
    # in it; it is handed back in its own
    layout = settle_layout(model, engine_layout(model), x[:2], device)
    scorer = get_scorer(cfg.scoring)
    need_stats = RULES[cfg.stop_rule].needs_stats
    pick = probe_pick(cfg, len(x))
    a = adapt(model, x, cfg, device, base_meta, pick, scorer, need_stats, clock,
              None if prior is None else prior.classes)
    # refit's target: the unpruned model as adapted by the statistics pass
    dense_adapted = copy.deepcopy(model) if cfg.refit else None
    tick(1, 3, "statistics collected")
    mask, cut, reason, history, restricted, probe = _prune(model, x, cfg, device, a, pick, scorer, need_stats,
                                                           links, clock, tick, prior)
    probe.keep(mask)  # the pruned network, with BatchNorm statistics of this user's data
    a.info["compensated"] = bool(probe.targets) and cut  # the cut units' mean outputs put back (S19)
    extra = a.extra
    if HEADS[a.head].rebuild_at_target and not a.searching and cut:
        # a fixed target never let a rule judge the head on the pruned features: rebuilt on them
        # (one more pass; a 70% target moves the features far from the unpruned model's)
        feats, logits2, last = features_and_logits(model, x, cfg.batch_size, device)
        HEADS[a.head].write(last, feats, logits2, **({} if a.labels is None else {"labels": a.labels}))
        with torch.no_grad():  # the restriction's rows stay pruned
            last.weight.mul_(mask.layers[list(prunable_layers(model))[-1]].to(last.weight))
        extra += len(x)
        clock.lap("head")
    if layout is not None:
        to_layout(model, torch.contiguous_format)
        if dense_adapted is not None:
            to_layout(dense_adapted, torch.contiguous_format)
    fwd = len(x) + probe.samples + sum(h.get("stat_samples", 0) for h in history) + extra
    if cfg.refit:
        clock.lap("mask apply")
        fwd += refit_consumers(model, dense_adapted, mask, x, cfg.batch_size, device,
                               step=lambda name: tick(3, 3, f"refit {name}"))["samples"]
        del dense_adapted
        clock.lap("refit")
    sparsity = mask.sparsity()
    # the result's mask lives on the CPU (one copy back from a GPU): a result kept or sent on
    # holds no GPU memory
    mask = Mask(mask.layers)
    clock.lap("mask apply")
    tick(3, 3, reason)
    return PruneResult(mask, sparsity, reason, restricted, time.perf_counter() - t0, fwd, history, a.stats,
                       clock.phases, a.info, a.class_means)


def _prune(model, x, cfg, device, a: Adapted, pick, scorer, need_stats, links, clock, tick, prior: Prior | None):
    """The restriction, the scores and the mask: the one the stop rule accepts on the probe, or
    the fixed target. Returns (mask, whether anything was cut, reason, history, restricted
    classes, the probe)."""
    dense = Mask.dense(model)
    restricted = (restricted_classes(a.logits, cfg.restrict_min_frac, cfg.restrict_margin)
                  if cfg.restrict_outputs and not a.unlike else None)
    if restricted is not None and (doubt := doubtful_removals(a.logits, restricted, cfg.restrict_min_frac)):
        warnings.warn(f"restrict-outputs removes class index(es) {doubt} although the model gives them "
                      f"{cfg.restrict_min_frac / 2:g} or more mean probability on this user's data; if the user "
                      f"may have them, raise restrict-margin or turn restrict-outputs off", stacklevel=3)
    clock.lap("restriction")
    keep_last = cfg.head == "auto" or HEADS[cfg.head].write is not None  # a rewritten head's rows all stay
    scores = compute_scores(model, a.stats, cfg.scoring, cfg.seed, keep_last=keep_last)
    if cfg.refit:  # only units that refit can make up for go: those with one reader
        producers = {p for p, _ in links}
        scores = {k: v if k in producers else torch.full_like(v, math.inf) for k, v in scores.items()}
    extra = 0.0  # samples of evidence the prior adds to the device's own in the search's bound
    if prior is not None and prior.pruned is not None:
        w = own_weight(len(x), prior.samples)
        # the prior's evidence, weighed as in the ranking, and at most twice the device's own: the
        # stop rule that judges what the prior lets it search is the device's (docs/federation.md)
        worth = min((1 - w) * prior.samples, 2 * len(x))
        # P9: where that evidence opens no step past the device's own bound, the prior is not used
        a.info["prior_ranking"] = not a.searching or opens_a_step(cfg, len(x), worth)
        if a.info["prior_ranking"]:
            scores = blend(scores, prior.pruned, w, scorer.structured)
            # P12: where nothing on the device adapts the model (S35), pruning alone moves it: the
            # prior reorders what it prunes, but steps past its own bound, judged on its own probe
            # alone, would gain it nothing
            extra = 0.0 if a.still else worth
    clock.lap("scores")
    probe = Probe(model, x, pick, cfg, device, need_stats, clock, a.recal, a.stats)
    clock.lap("mask apply")
    if not a.searching:
        levels = schedule(cfg.step, cfg.max_sparsity, cfg.target_sparsity)
        mask = (masker(scores, dense, cfg.scope, scorer.structured, single=True)(levels[-1])
                if cfg.target_sparsity != 0 and not a.unlike else dense)
        if mask is dense and probe.estimates:
            # nothing cut (a target of 0, inputs unlike the base's): the statistics pass's own
            # statistics, all of the user's data, not a probe pass's
            probe.reuse_start_bn(dense if restricted is None else apply_restriction(model, dense, restricted))
        else:  # a fixed target's mask pairs its probe statistics with the reference's (paired-bn)
            probe.folded_reference(a.first_bn)
        clock.lap("selection")
        reason = ("inputs unlike the base's training data: nothing pruned" if a.unlike
                  else f"reached target sparsity {cfg.target_sparsity:.3f}" if cfg.target_sparsity is not None
                  else f"reached max sparsity {cfg.max_sparsity:.3f} (stop rule 'none')")
        history = []
    else:
        # The reference is the unpruned model's own output on the probe, taken from the statistics
        # pass (no extra forward pass); with output restriction, the restricted outputs. With
        # BatchNorm recalibration it is the unpruned model recalibrated the same way, so the rule
        # measures what pruning changes, not what recalibration changes: the statistics pass's
        # first batches (fold), or one probe pass.
        ref_logits, ref_stats = a.logits[probe.pick].clone(), a.stats
        if a.fold:
            # with nothing but the restriction pruned, the kept model keeps the statistics pass's
            # BatchNorm statistics (the restriction's rows feed no BatchNorm)
            if probe.estimates:
                probe.reuse_start_bn(dense if restricted is None else apply_restriction(model, dense, restricted))
                probe.folded_reference(a.first_bn)
        elif cfg.recalibrate_bn:
            # with the restriction's rows pruned, as every candidate is: the same logits once
            # restricted, and its BatchNorm statistics are then the kept model's when nothing
            # else may go (no recalibration pass at the end)
            ref_logits, probe_stats = probe.reference(dense if restricted is None
                                                      else apply_restriction(model, dense, restricted))
            ref_stats = probe_stats if need_stats else a.stats
        if restricted is not None:
            restrict_logits(ref_logits, restricted)
        rule = make_rule(cfg.stop_rule, cfg.tolerance, ref_logits, ref_stats if need_stats else None)
        # the second probe (S31): a rule that reads the probe's activation statistics has none there;
        # auto: where nothing here adapts the model, pruning alone moves it (S35)
        confirming = cfg.confirm == "on" or (cfg.confirm == "auto" and a.still)
        second = confirm_pick(cfg, len(x)) if confirming and not rule.needs_stats else []
        confirm = Confirm(probe, x, second, cfg, restricted, dense, a.logits) if len(second) else None
        levels, own = search_levels(cfg, len(x), extra)
        mask, reason, history = search(levels, scores, dense, cfg, rule, probe, restricted, tick, clock, confirm,
                                       own_bound=own)
        history += confirm.history if confirm is not None else []
    if restricted is not None:
        mask = apply_restriction(model, mask, restricted)
        clock.lap("selection")
    return mask, mask is not dense, reason, history, restricted, probe


def personalized_model(model: nn.Module, result: PruneResult) -> nn.Module:
    """The model as a device uses it: wrapped so excluded classes can never be predicted."""
    return restricted_model(model, result.restricted_classes)
