"""Label-free fine-pruning, the engine: one statistics pass over a user's unlabeled data, scores,
a mask at the sparsity the stop rule accepts (judged on probe passes, no labels), BatchNorm
recalibration and the optional prototype head. Each idea it calls lives in its own module:
forward passes (forward.py), scores and masks (select.py), stop rules (stop.py), output
restriction (restrict.py), heads (heads.py); the settings come from settings.py. (~260 lines: the
search and the probe bookkeeping it needs stay beside the pass that feeds them.)"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, make_dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import adapt as AD
from common import settings as ST
from common.forward import (batched_forward, bn_layers, bn_prior, capture_features, device_batches, engine_layout,
                            features_and_logits, forward_pass, load_bn_stats, recalibrate_bn, settle_layout,
                            to_layout)
from common.heads import HEADS as HEAD_WRITERS
from common.heads import choose_head
from common.mask import Mask, apply_plan
from common.models import prunable_layers, require_reader_links
from common.refit import refit_consumers
from common.restrict import (apply_restriction, doubtful_removals, restrict_logits, restricted_classes,
                             restricted_model)
from common.scoring import get_scorer
from common.select import compute_scores, mask_at, masker, schedule  # noqa: F401  (re-exported)
from common.stats import UsageStats
from common.stop import RULES, make_rule

SCOPES = ST.BY_NAME["scope"].choices
STOP_RULES = tuple(RULES)
HEADS = ST.BY_NAME["head"].choices


class _PruneConfigBase:
    def validate(self):
        """Every field checked against the settings table, then the combinations it cannot express."""
        for st in ST.SETTINGS:
            if ST.PRUNE in st.where:
                st.check(getattr(self, st.attr))
        if self.rescore and self.search != "linear":
            raise ValueError("rescore re-scores after every step of a linear search: it needs search 'linear'")
        if self.base_stats and not self.recalibrate_bn:
            raise ValueError("base_stats is an ablation of BatchNorm recalibration: it needs recalibrate_bn")
        if self.refit and not get_scorer(self.scoring).structured:
            raise ValueError("refit re-solves the layers that read removed units: it needs a structured scorer "
                             "(firing, channel-usage)")
        return self

    def probe_samples(self, n: int) -> int:
        """The probe: a quarter of the user's data, at least 32 and at most 128 samples (a probe
        pass then costs at most a quarter of a full pass on all but the smallest data sets)."""
        return min(n, self.probe_size or max(32, min(128, n // 4)))

    def search_bound(self, n: int) -> float:
        """How far the stop rule may search on a user with n samples: max-sparsity, times
        n / (n + evidence-samples) (24 samples: 0.41, 60: 0.62, 450: 0.89 of 0.95)."""
        return self.max_sparsity * (n / (n + self.evidence_samples) if self.evidence_samples else 1.0)

    def probe_pick(self, n: int) -> torch.Tensor:
        """Which of the user's n samples make up the probe (seeded)."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:self.probe_samples(n)]

    @classmethod
    def from_settings(cls, values: dict) -> "PruneConfig":
        """From checked settings (common.settings.parse_values), keyed by setting name."""
        return cls(**{ST.BY_NAME[k].attr: v for k, v in values.items() if ST.PRUNE in ST.BY_NAME[k].where}).validate()

    def settings(self) -> dict:
        """Setting name -> value: what identifies a personalization (the resume key)."""
        return {st.name: getattr(self, st.attr) for st in ST.SETTINGS if ST.PRUNE in st.where}


# The engine's settings: one field per PRUNE row of common/settings.py, with its default there.
PruneConfig = make_dataclass(
    "PruneConfig",
    [(st.attr, st.type if st.default is not None else (st.type | None), field(default=st.default))
     for st in ST.SETTINGS if ST.PRUNE in st.where],
    bases=(_PruneConfigBase,))
PruneConfig.__module__ = __name__  # pickles (spawned benchmark children) find it here


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

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("mask")
        d.pop("stats")
        return d


class Clock:
    """Wall seconds per phase of the engine. On a GPU each lap waits for the queued kernels, so a
    phase is charged for its own work (one synchronize per lap, a handful per personalization)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + t - self._t
        self._t = t


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str = "cpu"):
    return batched_forward(model, x, batch_size, device)


@torch.no_grad()
def collect_stats(model: nn.Module, x: torch.Tensor, batch_size: int, device: str, outputs: bool = True,
                  classes: bool = False):
    """One forward pass with usage hooks; also returns the logits (free)."""
    model.eval()
    logits, stats = forward_pass(model, x, batch_size, device, hooks=outputs, classes=classes)
    return stats, logits


def _bn_key(sparsity: float) -> float:
    """A mask's key in Probe.bn: its sparsity, rounded so the same mask counted twice matches."""
    return round(sparsity, 9)


class Probe:
    """Passes over a fixed probe of the user's data with a candidate mask applied to the model's
    state at the start of pruning; counts the samples it pushes through the model and keeps the
    BatchNorm statistics each recalibrating pass estimated, so the mask kept reuses them."""

    def __init__(self, model: nn.Module, x: torch.Tensor, pick: torch.Tensor, cfg, device: str, need_stats: bool,
                 clock: Clock, recal: dict | None = None):
        self.model, self.cfg, self.device, self.need_stats, self.clock = model, cfg, device, need_stats, clock
        self.recal = recal or {}  # how a pass recalibrates (recalibrate_bn's profile and prior): the kept mode
        self.pick = pick
        # the probe lives where the model runs: every candidate's pass reads it again, and a copy
        # to a GPU per pass would cost each probe pass the transfer (38 MB per ResNet50 batch of 64).
        # Gathered as one batch of device_batches: straight into pinned memory and copied without
        # the host waiting (x[pick].to(device), a pageable gather and copy, took 40 ms of an H100's
        # ResNet50 personalization over 1,000 images, 0.2 of an inference pass)
        self.x, self.data = next(device_batches(x, len(self.pick), device, self.pick)), x
        # every parameter and buffer beside a copy of its value at the start of pruning: loading
        # a candidate copies tensor to tensor (load_state_dict's key matching and the module walk
        # of Mask.apply cost the digits CNN's search about 3 inference passes)
        state = model.state_dict()
        self.start = {k: v.clone() for k, v in state.items()}
        # grouped by dtype and device: a multi-tensor copy takes its fast route (a few kernel
        # launches for all tensors) only over tensors alike in both
        groups = {}
        for k, v in state.items():
            lives, saved = groups.setdefault((v.dtype, v.device), ([], []))
            lives.append(v)
            saved.append(self.start[k])
        self._copies = list(groups.values())
        self.bn_live = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked"))}
        self.plan = apply_plan(model)
        self.samples = 0
        self.bn = {}  # sparsity -> BatchNorm statistics recalibrated in that probe pass

    def __call__(self, mask: Mask, phase: str = "probe passes", sparsity: float | None = None):
        """One pass over the probe with `mask` applied: (logits, stats or None). With
        recalibrate_bn the same pass re-estimates BatchNorm statistics, so the rule judges the
        model as it will be kept. `sparsity`: the mask's, where the caller counted it already."""
        cfg, model = self.cfg, self.model
        self.load(mask)
        self.samples += len(self.x)
        if cfg.recalibrate_bn:
            lg, st = recalibrate_bn(model, self.x, cfg.batch_size, self.device, hooks=True if self.need_stats else None,
                                    **self.recal)
            self.clock.lap(phase)
            self.bn[_bn_key(mask.sparsity() if sparsity is None else sparsity)] = {
                k: v.clone() for k, v in self.bn_live.items()}
        elif self.need_stats:
            st, lg = collect_stats(model, self.x, cfg.batch_size, self.device)
            self.clock.lap(phase)
        else:
            lg, st = predict_logits(model, self.x, cfg.batch_size, self.device), None
            self.clock.lap(phase)
        return lg, st

    def follows_deep(self) -> bool:
        """Whether a pass re-estimates the statistics of every BatchNorm layer (full recalibration),
        not only the input side's."""
        return bool(self.cfg.recalibrate_bn) and not self.recal and len(bn_layers(self.model)) > AD.stem_count(self.model)

    def alias_bn(self, mask: Mask, like: Mask) -> None:
        """`mask` keeps the BatchNorm statistics the probe pass of `like` estimated."""
        src = self.bn.get(_bn_key(like.sparsity()))
        if src is not None:
            self.bn[_bn_key(mask.sparsity())] = src

    def reuse_start_bn(self, mask: Mask) -> None:
        """`mask` keeps the BatchNorm statistics the model had when pruning started (those of the
        statistics pass, all of the user's data): no probe pass needs to estimate them."""
        self.bn[_bn_key(mask.sparsity())] = {k: self.start[k].clone() for k in self.bn_live}

    @torch.no_grad()
    def load(self, mask: Mask) -> None:
        # multi-tensor copies: a copy_ per tensor was 320 kernel launches per candidate on
        # ResNet50, launch-bound on a GPU
        for lives, saved in self._copies:
            torch._foreach_copy_(lives, saved)
        mask.apply(self.model, self.plan)
        self.clock.lap("mask apply")

    def keep(self, mask: Mask) -> None:
        """Leave the model pruned by `mask`, with the BatchNorm statistics of its probe pass
        (one more pass over the probe where it was not probed, e.g. a fixed target)."""
        self.load(mask)
        if self.cfg.recalibrate_bn:
            bn = self.bn.get(_bn_key(mask.sparsity()))
            if bn is None:
                recalibrate_bn(self.model, self.x, self.cfg.batch_size, self.device, **self.recal)
                self.samples += len(self.x)
                self.clock.lap("final recalibration")
            else:
                torch._foreach_copy_([self.bn_live[k] for k in bn], list(bn.values()))


def fine_prune(model: nn.Module, x: torch.Tensor, cfg, device: str = "cpu", progress=None,
               base_meta: dict | None = None) -> PruneResult:
    """Personalize `model` in place on unlabeled inputs `x`. Returns the mask and a report.
    `progress(done, total, text)` is called as work advances. `base_meta`: the base checkpoint's
    metadata, with what its vendor recorded for the device (class spread, input profile; see
    common/adapt.py); without them the checks fall back to their conservative side."""
    cfg.validate()
    if len(x) == 0:
        raise ValueError("no personalization data: the user's data set is empty")
    # checked before the statistics pass, not after it in refit_consumers
    links = require_reader_links(model, "refit") if cfg.refit else []
    t0 = time.perf_counter()
    clock = Clock(device)
    tick = progress or (lambda *a: None)
    model.to(device).eval()
    # the passes run in the faster layout (channels_last for a conv net: every pass 0.54-0.75x
    # of an NCHW one on this CPU, inference 0.74-0.88x on an H200) where the model runs in it;
    # it is handed back in its own
    layout = settle_layout(model, engine_layout(model), x[:2], device)
    scorer = get_scorer(cfg.scoring)
    need_stats = RULES[cfg.stop_rule].needs_stats
    need_outputs, need_classes = "outputs" in scorer.needs or need_stats, "classes" in scorer.needs
    pick = cfg.probe_pick(len(x))
    # the stop rule's search, unless the statistics pass finds inputs unlike the base's (below)
    searching = cfg.target_sparsity is None and cfg.stop_rule != "none"
    recalibrating = cfg.recalibrate_bn and not cfg.base_stats and bool(bn_layers(model))
    mode = cfg.bn_adapt if recalibrating else ("full" if cfg.recalibrate_bn else "none")
    spread = AD.spread_for(model, base_meta) if recalibrating else None
    if mode == "auto" and spread is None:
        # a base without the vendor's record of its classes: nothing tells a class mix from a
        # shift, so the safe side, with no check to pay for
        mode = "stem"
    prior = bn_prior(model) if recalibrating and mode != "full" else None
    recal = stem_recal(model, prior, spread) if mode == "stem" else {}
    # The stop rule's reference is the unpruned model recalibrated on the probe. The statistics
    # pass gives it for free when the probe makes up its first batches: in train mode each batch
    # is normalized by its own statistics, so those logits are what a probe pass of the unpruned
    # model outputs (a rule that reads statistics still needs the probe's own: one probe pass).
    # Not when the other samples would end in a batch of one: BatchNorm cannot normalize one
    # sample by its own statistics where a map is 1x1 (ResNet18's last stage at 32x32 inputs).
    fold = (searching and cfg.recalibrate_bn and not cfg.base_stats and not need_stats
            and (len(x) - len(pick)) % cfg.batch_size != 1)
    first = pick if fold else None
    with capture_features(model) as cap, AD.FirstLayerInputs(model) as inputs:
        if cfg.recalibrate_bn and not cfg.base_stats:
            # One pass both adapts BatchNorm to the user and measures usage on the adapted network:
            # under a domain shift the base's own activations mislead the ranking (digits users
            # with their own style, usage at 70% sparsity: 0.712 with base statistics, 0.791 adapted).
            logits, stats = recalibrate_bn(model, x, cfg.batch_size, device, hooks=need_outputs, classes=need_classes,
                                           first=first, **recal)
        else:
            stats, logits = collect_stats(model, x, cfg.batch_size, device, outputs=need_outputs, classes=need_classes)
            first = None
    feats = cap.features(first)
    clock.lap("statistics pass")
    # inputs unlike anything the base was trained on get no irreversible cut: no pruning, no
    # restriction (their average, against the vendor's, from the statistics pass: no pass of its own)
    corr = inputs.correlation(base_meta)
    unlike = corr is not None and corr < AD.UNLIKE_BELOW
    searching = searching and not unlike
    info = {"input_correlation": None if corr is None else round(corr, 4), "unlike_base": unlike,
            "vendor_record": spread is not None}
    extra = 0  # samples pushed through the model by the adaptation check
    if mode == "auto":
        mode, recal, check, extra = _check_full(model, x, pick, logits, prior, spread, cfg, device)
        info.update(check)
        if mode == "stem":  # the statistics pass again, on the model as it is kept: usage measured on
            # the network whose class mix full recalibration absorbed ranks the wrong connections
            with capture_features(model) as cap:
                logits, stats = recalibrate_bn(model, x, cfg.batch_size, device, hooks=need_outputs,
                                               classes=need_classes, first=first, **recal)
            feats = cap.features(first)
            extra += len(x)
        clock.lap("adaptation check")
    info["bn"] = mode
    # the output layer from the user's features of the unpruned adapted model (the statistics
    # pass's: no pass of its own), written before pruning so the stop rule judges the model as kept
    info["head"] = head = choose_head(cfg.head, logits, cfg.prototype_min_support, cfg.head_min_support)
    if head in HEAD_WRITERS:
        last = list(prunable_layers(model).values())[-1]
        HEAD_WRITERS[head](last, feats, logits)
        logits = F.linear(feats, last.weight.detach().float().cpu().flatten(1),
                          None if last.bias is None else last.bias.detach().float().cpu())
        clock.lap("head")
    # refit's target: the unpruned model as adapted by the statistics pass
    dense_adapted = copy.deepcopy(model) if cfg.refit else None
    tick(1, 3, "statistics collected")
    dense = Mask.dense(model)
    restricted = (restricted_classes(logits, cfg.restrict_min_frac, cfg.restrict_margin)
                  if cfg.restrict_outputs and not unlike else None)
    if restricted is not None and (doubt := doubtful_removals(logits, restricted, cfg.restrict_min_frac)):
        warnings.warn(f"restrict-outputs removes class index(es) {doubt} although the model gives them "
                      f"{cfg.restrict_min_frac / 2:g} or more mean probability on this user's data; if the user "
                      f"may have them, raise restrict-margin or turn restrict-outputs off", stacklevel=2)
    clock.lap("restriction")
    scores = compute_scores(model, stats, cfg.scoring, cfg.seed, keep_last=cfg.head != "linear")
    if cfg.refit:  # only units that refit can make up for go: those with one reader
        producers = {p for p, _ in links}
        scores = {k: v if k in producers else torch.full_like(v, math.inf) for k, v in scores.items()}
    clock.lap("scores")
    probe = Probe(model, x, pick, cfg, device, need_stats, clock, recal)
    clock.lap("mask apply")
    stat_samples = 0

    if not searching:
        levels = schedule(cfg.step, cfg.max_sparsity, cfg.target_sparsity)
        mask = (masker(scores, dense, cfg.scope, scorer.structured, single=True)(levels[-1])
                if cfg.target_sparsity != 0 and not unlike else dense)
        clock.lap("selection")
        reason = ("inputs unlike the base's training data: nothing pruned" if unlike
                  else f"reached target sparsity {cfg.target_sparsity:.3f}" if cfg.target_sparsity is not None
                  else f"reached max sparsity {cfg.max_sparsity:.3f} (stop rule 'none')")
        history = []
    else:
        # The reference is the unpruned model's own output on the probe, taken from the statistics
        # pass (no extra forward pass); with output restriction, the restricted outputs. With
        # BatchNorm recalibration it is the unpruned model recalibrated the same way, so the rule
        # measures what pruning changes, not what recalibration changes: the statistics pass's
        # first batches (fold), or one probe pass.
        ref_logits, ref_stats = logits[probe.pick].clone(), stats
        if fold:
            # with nothing but the restriction pruned, the kept model keeps the statistics pass's
            # BatchNorm statistics (the restriction's rows feed no BatchNorm)
            probe.reuse_start_bn(dense if restricted is None else apply_restriction(model, dense, restricted))
        elif cfg.recalibrate_bn:
            # with the restriction's rows pruned, as every candidate is: the same logits once
            # restricted, and its BatchNorm statistics are then the kept model's when nothing
            # else may go (no recalibration pass at the end)
            ref_logits, probe_stats = probe(dense if restricted is None else apply_restriction(model, dense, restricted),
                                            "reference probe")
            ref_stats = probe_stats if need_stats else stats
        if restricted is not None:
            restrict_logits(ref_logits, restricted)
        rule = make_rule(cfg.stop_rule, cfg.tolerance, ref_logits, ref_stats if need_stats else None)
        mask, reason, history = _search(schedule(cfg.step, cfg.search_bound(len(x))), scores, dense, cfg, rule,
                                        probe, restricted, tick, clock)
        stat_samples = sum(h.get("stat_samples", 0) for h in history)
    if restricted is not None:
        mask = apply_restriction(model, mask, restricted)
        clock.lap("selection")
    probe.keep(mask)  # the pruned network, with BatchNorm statistics of this user's data
    if head == "prototypes" and not searching and mask is not dense:
        # a fixed target never let a rule judge the prototypes on the pruned features: rebuilt on
        # them (one more pass; a 70% target moves the features far from the unpruned model's)
        feats, logits2, last = features_and_logits(model, x, cfg.batch_size, device)
        HEAD_WRITERS[head](last, feats, logits2)
        with torch.no_grad():  # the restriction's rows stay pruned
            last.weight.mul_(mask.layers[list(prunable_layers(model))[-1]].to(last.weight))
        extra += len(x)
        clock.lap("head")
    if layout is not None:
        to_layout(model, torch.contiguous_format)
        if dense_adapted is not None:
            to_layout(dense_adapted, torch.contiguous_format)
    fwd = len(x) + probe.samples + stat_samples + extra
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
    return PruneResult(mask, sparsity, reason, restricted, time.perf_counter() - t0, fwd, history, stats,
                       clock.phases, info)


def _check_full(model, x, pick, logits, prior, spread, cfg, device):
    """bn-adapt auto, after the statistics pass recalibrated every layer: keep that (full) where the
    layers past the input side moved beyond their class mix (deep_shift at least DEEP_SHIFT) and, on
    the probe (at most CHECK_SAMPLES of it), it predicts no more than SLACK classes beyond what a recalibration of only the
    channels the class mix cannot explain predicts (the checkpoint's class spread), and agrees with
    it on at least AGREE of the samples; otherwise keep only the input side recalibrated. Returns
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
    if k_full <= k_safe + AD.SLACK and agree >= AD.AGREE:
        load_bn_stats(bns, full)
        return "full", {}, check, len(xp)
    return "stem", stem_recal(model, prior, spread), check, len(xp)


def stem_recal(model, prior, spread) -> dict:
    """recalibrate_bn's arguments for bn-adapt stem: the input side only, and there, where the
    checkpoint records the class spread, only the channels the class mix cannot explain (a first
    layer of a network on feature vectors is class-specific itself)."""
    kw = dict(profile=AD.stem_profile(model), prior=prior)
    return dict(kw, spread=spread, kappa=AD.KAPPA) if spread is not None else kw


def personalized_model(model: nn.Module, result: PruneResult) -> nn.Module:
    """The model as a device uses it: wrapped so excluded classes can never be predicted."""
    return restricted_model(model, result.restricted_classes)


def _back_off(last_ok: int, margin: int, masks: dict, at, levels, dense, reason: str, history, probe: Probe):
    """Where the rule failed, the step `margin` steps below the last that passed: the failing
    level was found on a probe of 32-128 samples, and the step just before a cliff is where held-out
    samples flip first (a user of 200 samples: the probe agreed fully at 0.72, the rest of its
    data 97.5%, held-out accuracy 0.98 -> 0.94)."""
    i = last_ok - margin
    if i < 0:
        return dense, reason + (f"; backed off {margin} step(s): nothing pruned" if margin else ""), history
    # a level the search probed already (passing: every probed level below the last that passed
    # did) one step further down costs no probe pass of its own to keep
    probed = [k for k in masks if i - 1 <= k <= i]
    i = max(probed) if probed else i
    mask = masks[i] if i in masks else at(levels[i])
    if i not in masks and last_ok in masks:
        if probe.follows_deep():
            # every BatchNorm layer follows the user: its statistics are the mask's own (a ResNet18
            # user keeping the next step's: 0.89 -> 0.54 held out), one probe pass estimates them
            probe(mask, "back-off pass")
        else:
            # only the input side follows the user: it keeps the next step's statistics (10% of
            # the remaining weights apart) rather than pay a probe pass for its own
            probe.alias_bn(mask, masks[last_ok])
    return mask, reason + (f"; backed off to {levels[i]:.3f}" if margin else ""), history


def _search(levels, scores, dense, cfg, rule, probe: Probe, restricted, tick, clock: Clock):
    """The schedule's step the rule accepts: bisection over the nested masks, or linear."""
    history = []
    structured = get_scorer(cfg.scoring).structured
    # bisection asks for ~5 sparsities: one k-th value selection each (0.01 s on ResNet18's 11 M
    # scores) costs less than sorting all scores once (1.3 s); a linear search asks for up to 28
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
            return masks[lo], f"reached the search bound {levels[-1]:.3f} within tolerance", history
        return _back_off(lo, cfg.stop_margin, masks, at, levels, dense, failed(fail_v, levels[hi]), history, probe)

    mask, kept = dense, {}
    for i, level in enumerate(levels):
        # fixed scores give nested masks; re-scored ones rank what is left of the current mask
        cand = mask_at(scores, mask, level, cfg.scope, structured) if cfg.rescore else at(level)
        ok, v = check(cand)
        if not ok:
            return _back_off(i - 1, cfg.stop_margin, kept, at, levels, dense, failed(v, level), history, probe)
        mask = kept[i] = cand
        if cfg.rescore:  # usage of the surviving connections, measured in the pruned network
            probe_x = probe.data[:cfg.probe_samples(len(probe.data))]
            st, _ = collect_stats(probe.model, probe_x, cfg.batch_size, probe.device,
                                  classes="classes" in get_scorer(cfg.scoring).needs)
            history[-1]["stat_samples"] = len(probe_x)
            clock.lap("probe passes")
            scores = compute_scores(probe.model, st, cfg.scoring, cfg.seed, keep_last=cfg.head != "linear")
            clock.lap("scores")
    return mask, f"reached the search bound {levels[-1]:.3f} within tolerance", history
