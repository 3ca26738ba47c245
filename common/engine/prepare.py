"""Before pruning, the model adapted to the user: one statistics pass in which BatchNorm follows the
user's data and usage is measured on the adapted network, the check that the inputs look like the
base's at all, bn-adapt auto's check, and the output head, written before pruning so the stop rule
judges the model as it is kept. One function over 250 lines: each step reads what the statistics
pass and the steps before it saw (its locals), in the order the device runs them."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from common.engine import adapt as AD
from common.engine import class_prior as CPR
from common.engine import clusters as CL
from common.engine import compensate as CP
from common.engine import heads as HD
from common.engine import hidden_shift as HS
from common.engine import input_shift as IS
from common.engine import probe as PR
from common.engine import unlike as UL
from common.engine import vendor_directions as VD
from common.engine.bn import Chance, bn_layers, bn_prior, recalibrate_bn
from common.engine.bn_check import check_full, stem_recal
from common.engine.forward import capture_features
from common.engine.heads import HEAD_WITH_PRIOR, HEADS, choose_head, spread_classes
from common.engine.probe import collect_stats
from common.engine.stats import UsageStats
from common.model.architectures import prunable_layers


@dataclass
class Adapted:
    """The model adapted to the user, before pruning: what the statistics pass and the checks saw."""
    logits: torch.Tensor
    stats: UsageStats
    feats: torch.Tensor
    recal: dict
    fold: bool
    searching: bool
    unlike: bool
    head: str
    info: dict
    extra: int  # samples the checks pushed through the model
    first_bn: list | None = None  # the BatchNorm statistics of the pass's first batch (the probe, fold)
    class_means: tuple | None = None  # what this device adds to the federation's class directions
    still: bool = False  # nothing here adapts the model: no statistics follow the user, the base's layer
    labels: torch.Tensor | None = None  # the head's pseudo-labels where the user's groups gave them (S68)


def adapt(model, x, cfg, device, base_meta, pick, scorer, need_stats, clock,
          class_prior: CPR.ClassPrior | None = None) -> Adapted:
    """The statistics pass (BatchNorm follows the user, usage is measured on the adapted network),
    the input check, bn-adapt auto's check and the head, written before pruning so the stop rule
    judges the model as kept. `class_prior`: the federation's class directions
    (common/engine/class_prior.py), else the vendor's record of its own (S59); a device whose own
    samples are too few per class for prototypes of its own blends them with the base's layer instead."""
    need_outputs, need_classes = "outputs" in scorer.needs or need_stats, "classes" in scorer.needs
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
    # Where candidates keep the input side's statistics of the whole pass (probe.KEEP_INPUT_SIDE),
    # its logits are the reference when it ran as one batch, the probe not put first.
    probe_first = (cfg.recalibrate_bn and not cfg.base_stats and (len(x) - len(pick)) % cfg.batch_size != 1)
    fold = searching and not need_stats and probe_first
    keeps = mode == "stem" and PR.KEEP_INPUT_SIDE
    if keeps:
        fold = fold and len(x) <= cfg.batch_size
    # a fixed target's mask pairs its probe statistics with the reference's too (paired-bn): the
    # probe put first gives the reference's for free, though no rule reads its logits
    paired_target = cfg.paired_bn and cfg.target_sparsity not in (None, 0) and probe_first
    first = pick if (fold or paired_target) and not keeps else None
    # compensate needs the input means of the layers whose lost mean survives: under full
    # recalibration only those no BatchNorm follows (a stem pass below collects them all)
    means = CP.compensating(cfg) and (True if mode in ("stem", "none") else CP.unnormalized(model))
    # the probe in one batch first: its BatchNorm statistics are the reference's probe pass's, which
    # the kept mask's are paired with (paired-bn)
    first_bn = [] if first is not None and len(first) <= cfg.batch_size else None
    # head auto on features that cannot follow the user: the last hidden layer's moments (S26)
    hidden_check = cfg.head == "auto" and not recalibrating
    # a network without BatchNorm: its first layer's channel means follow the user instead (S57),
    # before the statistics pass, so everything after it sees the model as it is kept
    moved = None
    if cfg.recalibrate_bn and not cfg.base_stats and IS.applies(model, base_meta):
        moved = IS.move(model, x, base_meta, cfg.batch_size, device)
        clock.lap("first layer's means")

    def statistics_pass(first, first_bn, recal):
        with capture_features(model) as cap, UL.FirstLayerInputs(model) as inputs, \
                HS.HiddenMoments(model, hidden_check) as hidden:
            if cfg.recalibrate_bn and not cfg.base_stats:
                # under a domain shift the base's own activations mislead the ranking: usage is
                # measured on the network the same pass adapts
                chance = []
                logits, stats = recalibrate_bn(model, x, cfg.batch_size, device, hooks=need_outputs,
                                               classes=need_classes, first=first, means=means, first_bn=first_bn,
                                               chance_out=chance, **recal)
                recal = _with_chance(recal, chance)
            else:
                stats, logits = collect_stats(model, x, cfg.batch_size, device, outputs=need_outputs,
                                              classes=need_classes, means=means)
                first = first_bn = None
        return cap, inputs, hidden, logits, stats, recal, first, first_bn

    start = first, first_bn, recal
    cap, inputs, hidden, logits, stats, recal, first, first_bn = statistics_pass(*start)
    extra = 0 if moved is None else moved.samples
    if moved is not None and not IS.keep(model, moved, logits):
        # the move narrowed the model's predictions on the user's data: put back, the pass again
        cap, inputs, hidden, logits, stats, recal, first, first_bn = statistics_pass(
            start[0], None if start[1] is None else [], start[2])
        extra += len(x)
    feats = cap.features(first)
    clock.lap("statistics pass")
    # inputs unlike anything the base was trained on get no irreversible cut: no pruning, no
    # restriction (their average, against the vendor's, from the statistics pass: no pass of its own)
    corr, level = inputs.correlation(base_meta), UL.input_level(x, base_meta)
    # or inputs in other units than the base's: their level beyond LEVEL_BOUND of the vendor's (S60)
    unlike = (corr is not None and corr < UL.UNLIKE_BELOW) or UL.off_level(level)
    info = {"input_correlation": None if corr is None else round(corr, 4), "unlike_base": unlike,
            **({} if level is None else {"input_level": float(f"{level:.4g}")}),
            "vendor_record": spread is not None, **({"first_layer_follows": False} if moved is None else moved.info)}
    if mode == "auto":
        mode, recal, check, checked = check_full(model, x, pick, logits, prior, spread, cfg, device, base_meta)
        extra += checked
        info.update(check)
        if mode == "stem" and "classmix" in recal:
            info["stem_class_mix"] = True  # the input side follows only what its class mix does not predict (S47)
        if mode in ("stem", "none", "class-mix"):  # the statistics pass again, on the model as it is kept:
            # usage measured on the network whose class mix full recalibration absorbed ranks the wrong
            # connections
            if PR.KEEP_INPUT_SIDE and mode != "class-mix":  # no probe first: no reference statistics from this pass
                fold, first, first_bn = fold and len(x) <= cfg.batch_size, None, None
            chance = []
            with capture_features(model) as cap:
                logits, stats = recalibrate_bn(model, x, cfg.batch_size, device, hooks=need_outputs,
                                               classes=need_classes, first=first,
                                               means=means if mode == "class-mix" else CP.compensating(cfg),
                                               first_bn=first_bn, chance_out=chance, **recal)
            recal = _with_chance(recal, chance)
            feats = cap.features(first)
            extra += len(x)
        clock.lap("adaptation check")
    info["bn"] = mode
    # the output layer from the user's features of the unpruned adapted model (the statistics pass's:
    # no pass of its own); S68: the groups they form, where fewer than the classes, count the user's
    # classes and label its samples
    groups, group_labels = None, None
    if cfg.head == "auto":
        groups, group_labels, seen = CL.group_labels(feats, logits)
        info.update(seen)
    head = choose_head(cfg.head, logits, cfg.prototype_min_support, cfg.head_min_support,
                       None if groups is None else groups.count)
    last = list(prunable_layers(model).values())[-1]
    gated = False  # a gate below refused pseudo-labels' features: nothing learns from them
    settled = False  # S36 found nothing to learn: the base's layer, and no class directions either
    if (mode == "none" and cfg.head == "auto" and info.get("kept_shift_none") is not None
            and info.get("deep_shift_evident", 1.0) >= AD.DEEP_SHIFT):
        # S27: the deep layers moved beyond the class mix (and chance, S28) and none follows (as S26)
        head, gated = "linear", True
    elif hidden_check and head != "linear":
        # prototypes of pseudo-labels on features that moved beyond the class mix, with nothing to
        # bring them back, learn the base's errors; without the vendor's record nothing tells
        shift = hidden.shift(HS.record_for(model, base_meta), AD.KAPPA)
        info["hidden_shift"] = None if shift is None else round(shift, 4)
        if shift is not None and shift >= AD.DEEP_SHIFT:
            # S58: unless the head spreads the predictions over more classes than the base's
            # layer: a shift that collapsed them onto a few classes is what it undoes (a new
            # voice), where one that learns the shift's errors narrows them (a style)
            wider, before, after = HD.spreads_wider(head, last, feats, logits, group_labels)
            info["head_spread"] = [round(before, 3), round(after, 3)]
            if not wider:
                head, gated = "linear", True
        elif shift is None:
            head, gated = "linear", True
        else:
            # features that did not move, which nothing follows: a rebuilt layer can learn only the
            # user's class mix, and where the pseudo-labels spread over nearly every class there is
            # none to learn, only the base's errors (S36)
            label_spread = spread_classes(logits) / logits.shape[1]
            info["label_spread"] = round(label_spread, 4)
            if label_spread >= HS.NO_LABEL_SHIFT:
                # nor class directions (S59): with no shift and no class mix they add only errors
                head, settled = "linear", True
    write = HEADS[head].write
    grouped = group_labels is not None and write is not None and not (gated or settled)
    if group_labels is not None:
        info["head_groups"] = grouped
    if grouped:
        write = partial(write, labels=group_labels)
    mine = CPR.class_means(feats, logits)  # from the base's layer's pseudo-labels, before any rewrite
    # the federation's class directions, else the vendor's own (S59)
    source, class_prior = ("federation", class_prior) if class_prior is not None else \
        ("vendor", VD.vendor_prior(model, base_meta) if cfg.head == "auto" and head != "prototypes" else None)
    if (cfg.head == "auto" and head != "prototypes" and not (gated or settled or grouped)
            and CPR.usable(last, class_prior)):
        # too few samples per class for prototypes of its own, and no gate above refused
        # pseudo-labels' features: the class directions blended with the base's layer, where the
        # device's data spreads over the classes as the pool's (the vendor's) does
        fits, own, pooled = CPR.spread_fits(mine[1], class_prior)
        info["class_prior"] = {"source": source, "spread": round(own, 3), "pool_spread": round(pooled, 3),
                               "used": fits}
        if fits:  # P10: and only where the blend spreads the predictions wider than the layer it replaces
            layer = CPR.blend_layer(last, feats, logits, class_prior)
            wider, before, after = CPR.widens(layer, feats, logits)
            info["class_prior"].update(used=wider, soft_spread=round(before, 3), blend_soft_spread=round(after, 3))
            if wider:
                head = HEAD_WITH_PRIOR
                write = partial(CPR.write_layer, layer=layer)
    if (cfg.head == "auto" and head == "prototypes" and not grouped and info.get("stem_class_mix")
            and last.bias is not None
            and info.get("deep_shift", AD.DEEP_SHIFT) < AD.DEEP_SHIFT):
        # S54: nothing moved past the input side, which a class mix it fitted explains: the user
        # differs from the vendor by the mix alone (a label shift), where prototypes of the base's
        # pseudo-labels learn its errors on that mix as well; the base's layer, its prior moved to it
        head = "label-shift"
    if head == "label-shift":  # over the vendor's own class mix where its record counts it (S55)
        vendor = HD.vendor_prior(base_meta, logits.shape[1])
        write = partial(HEADS[head].write, vendor=vendor)
        info["vendor_prior"] = vendor is not None
    # S71: the prototypes of a user holding nearly every class refined on its features (no pass)
    info["head"], info["head_gated"] = head, gated
    info["head_refined"] = head == "prototypes" and HD.refines(logits, group_labels if grouped else None)
    # nothing on the device adapts the model: no statistics follow the user and the output layer is
    # the base's, so pruning alone moves it (confirm auto, S35)
    still = head == "linear" and (not recalibrating or mode == "none")
    info["nothing_adapts"] = still
    if write is not None:
        write(last, feats, logits)
        logits = HD.layer_logits(last, feats)
        clock.lap("head")
    return Adapted(logits, stats, feats, recal, fold, searching and not unlike, unlike, head, info, extra, first_bn,
                   mine, still, group_labels if grouped else None)


def _with_chance(recal: dict, chance: list) -> dict:
    """The kept mode's recalibration, its sampling noise taken from the statistics pass's samples
    (all of the user's data) for every later pass over some of them (the probe's; S28)."""
    return dict(recal, chance_from=Chance(chance)) if recal.get("spread") is not None else recal
