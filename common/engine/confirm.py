"""The second probe: samples of the user's that the stop rule's search never saw judge the mask it
kept. The search keeps the sparsest level at which its own probe passed, and that selection makes
the probe's verdict optimistic (S30: probe agreement 1.000, the rest of the user's data 0.92-0.97
on BatchNorm-free styled digits). Where the rule fails on the second probe, the levels below are
bisected on it (S31). `confirm auto`, the default, runs it only where nothing on the device
adapts the model (no statistics follow the user, the base's output layer), so pruning alone moves
it (S35); `on` for every user."""
from __future__ import annotations

import torch

from common.engine.probe import probe_samples
from common.engine.restrict import apply_restriction, restrict_logits
from common.engine.stop import make_rule
from common.model.batches import batched_forward, device_batches


def confirm_pick(cfg, n: int) -> torch.Tensor:
    """The second probe: the next probe-size samples of the permutation the probe was drawn from
    (disjoint from it; fewer where the user has fewer left; none where the probe took them all)."""
    p = probe_samples(cfg, n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[p:2 * p]


class Confirm:
    """`confirm(mask)`: whether the stop rule passes on the second probe, the model pruned by
    `mask` as it is kept (its BatchNorm statistics: Probe.keep), against the unpruned model kept
    the same way. Each pass is counted in the probe's samples and logged in the search's history.
    `stats_logits`: the statistics pass's logits over all of x; where no pass re-estimates BatchNorm
    statistics they are the unpruned model's as it is kept, so its pass over the second probe is saved."""

    def __init__(self, probe, x: torch.Tensor, idx: torch.Tensor, cfg, restricted, dense, stats_logits: torch.Tensor):
        self.probe, self.cfg, self.restricted, self.history = probe, cfg, restricted, []
        self.x = next(device_batches(x, len(idx), probe.device, idx))
        if probe.estimates:
            ref = self._logits(dense)
        else:
            ref = stats_logits[idx]  # a copy (index tensor): restrict_logits may write into it
            if restricted is not None:
                restrict_logits(ref, restricted)
        self.rule = make_rule(cfg.stop_rule, cfg.tolerance, ref, None)

    def _logits(self, mask):
        if self.restricted is not None:
            mask = apply_restriction(self.probe.model, mask, self.restricted)
        self.probe.keep(mask)
        logits = batched_forward(self.probe.model, self.x, self.cfg.batch_size, self.probe.device)
        self.probe.samples += len(self.x)
        if self.restricted is not None:
            restrict_logits(logits, self.restricted)
        self.probe.clock.lap("second probe")
        return logits

    def __call__(self, mask) -> bool:
        v = self.rule.value(self._logits(mask), None)
        ok = self.rule.passes(v)
        self.history.append({"sparsity": round(mask.sparsity(), 4), "value": round(v, 4), "passed": ok,
                             "second_probe": len(self.x)})
        return ok


def confirmed(i: int, masks: dict, at, levels, dense, confirm: Confirm):
    """The search's pick (schedule step i) if the rule passes on the second probe too; else the
    sparsest step below it that does, bisected on the second probe (nested masks), or nothing
    pruned. Returns (step, mask); step -1 is the dense mask."""
    mask = masks[i] if i in masks else at(levels[i])
    if confirm(mask):
        return i, mask
    lo, hi, best = -1, i, dense
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = masks[mid] if mid in masks else at(levels[mid])
        if confirm(m):
            lo, best = mid, m
        else:
            hi = mid
    return lo, best
