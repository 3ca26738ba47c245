"""The probe: a fixed sample of the user's data on which every candidate mask is judged, passes
over it with a mask applied (re-estimating BatchNorm statistics as the kept model would), the kept
mask's statistics paired with the statistics pass's (paired-bn, S23), and the Clock that charges
each phase of the engine its wall time."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from common.engine import compensate as CP
from common.engine.bn import bn_layers, recalibrate_bn
from common.engine.forward import forward_pass
from common.model.batches import batched_forward, device_batches
from common.model.mask import Mask, apply_plan

# True: where only the input side follows the user (bn-adapt stem), candidates keep the statistics
# the statistics pass estimated on all of the user's data instead of re-estimating them on the probe
# (S20: a ResNet18 user at 32x32 gains, the users at 64x64 lose; simulations/compensation_study.py)
KEEP_INPUT_SIDE = False


def probe_samples(cfg, n: int) -> int:
    """The probe: a quarter of the user's data, at least 32 and at most 128 samples (a probe
    pass then costs at most a quarter of a full pass on all but the smallest data sets)."""
    return min(n, cfg.probe_size or max(32, min(128, n // 4)))


def probe_pick(cfg, n: int) -> torch.Tensor:
    """Which of the user's n samples make up the probe (seeded)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:probe_samples(cfg, n)]


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
def collect_stats(model: nn.Module, x: torch.Tensor, batch_size: int, device: str, outputs: bool = True,
                  classes: bool = False, means: bool = False):
    """One forward pass with usage hooks; also returns the logits (free)."""
    model.eval()
    logits, stats = forward_pass(model, x, batch_size, device, hooks=outputs, classes=classes, means=means)
    return stats, logits


def _bn_key(sparsity: float) -> float:
    """A mask's key in Probe.bn: its sparsity, rounded so the same mask counted twice matches."""
    return round(sparsity, 9)


class Probe:
    """Passes over a fixed probe of the user's data with a candidate mask applied to the model's
    state at the start of pruning; counts the samples it pushes through the model and keeps the
    BatchNorm statistics each recalibrating pass estimated, so the mask kept reuses them."""

    def __init__(self, model: nn.Module, x: torch.Tensor, pick: torch.Tensor, cfg, device: str, need_stats: bool,
                 clock: Clock, recal: dict | None = None, stats=None):
        self.model, self.cfg, self.device, self.need_stats, self.clock = model, cfg, device, need_stats, clock
        self.recal = recal or {}  # how a pass recalibrates (recalibrate_bn's profile and prior): the kept mode
        self.pick = pick
        # the probe lives where the model runs: every candidate's pass reads it again, and a copy
        # to a GPU per pass would cost each probe pass the transfer. Gathered as one batch of
        # device_batches: straight into pinned memory and copied without the host waiting
        self.x, self.data = next(device_batches(x, len(self.pick), device, self.pick)), x
        # every parameter and buffer beside a copy of its value at the start of pruning: loading
        # a candidate copies tensor to tensor (load_state_dict's key matching and the module walk
        # of Mask.apply cost more than the small models' passes)
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
        # compensate: the layers a candidate's lost mean goes back into (the statistics pass's
        # input means), and which BatchNorm layers a pass re-estimates at all
        self.bns = bn_layers(model)
        # whether a pass re-estimates BatchNorm statistics (KEEP_INPUT_SIDE: not where only the input
        # side follows the user; then a candidate keeps the statistics pass's, its lost means put back);
        # a network without BatchNorm has none to re-estimate
        # class-mix (S43) re-estimates every layer in full, each moved by what its class mix predicts
        mixed = "classmix" in self.recal
        self.estimates = (bool(cfg.recalibrate_bn) and bool(self.bns)
                          and not (self.recal and not mixed and KEEP_INPUT_SIDE))
        profile = self.recal.get("profile")
        self.follows = [self.estimates and (profile is None or float(profile(i, len(self.bns))) > 0)
                        for i in range(len(self.bns))]
        # layers re-estimated in full (no mixture with the base's statistics) centre themselves
        full = [f and (not self.recal or mixed) for f in self.follows]
        self.targets = (CP.plan(model, stats, self.start, {i for i, f in enumerate(full) if f})
                        if CP.compensating(cfg) else [])
        # the base's statistics a partial re-estimation mixes in, and them shifted for the candidate
        self.base_prior = self.recal.get("prior") if self.estimates else None
        self.prior = self.base_prior
        self.ref_bn = None  # the unpruned reference's probe statistics (reference(), folded_reference())
        self.whole = set()  # keys of self.bn estimated on all of the user's data, not on the probe
        self.kept = {}  # sparsity -> the BatchNorm statistics keep() left: keeping the same mask again copies them

    def __call__(self, mask: Mask, phase: str = "probe passes", sparsity: float | None = None):
        """One pass over the probe with `mask` applied: (logits, stats or None). With
        recalibrate_bn the same pass re-estimates BatchNorm statistics, so the rule judges the
        model as it will be kept. `sparsity`: the mask's, where the caller counted it already."""
        cfg, model = self.cfg, self.model
        self.load(mask)
        self.samples += len(self.x)
        if self.estimates:
            lg, st = recalibrate_bn(model, self.x, cfg.batch_size, self.device, hooks=True if self.need_stats else None,
                                    **self._recal())
            self.clock.lap(phase)
            self.bn[_bn_key(mask.sparsity() if sparsity is None else sparsity)] = {
                k: v.clone() for k, v in self.bn_live.items()}
        elif self.need_stats:
            st, lg = collect_stats(model, self.x, cfg.batch_size, self.device)
            self.clock.lap(phase)
        else:
            lg, st = batched_forward(model, self.x, cfg.batch_size, self.device), None
            self.clock.lap(phase)
        return lg, st

    def reference(self, mask: Mask):
        """The reference's probe pass (the unpruned model, restricted where the candidates are):
        its logits and stats, and its BatchNorm statistics kept to pair the kept mask's with."""
        out = self(mask, "reference probe")
        if self.estimates:
            self.ref_bn = self.bn.get(_bn_key(mask.sparsity()))
        return out

    def folded_reference(self, first_bn: list | None) -> None:
        """The reference's probe statistics from the statistics pass's first batch (the probe,
        folded into it): one (mean, var) per BatchNorm layer, in module order."""
        if not self.estimates or first_bn is None or any(v is None for v in first_bn):
            return
        names = [n for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        pre = lambda n: f"{n}." if n else ""  # noqa: E731
        self.ref_bn = {**{f"{pre(n)}running_mean": mv[0] for n, mv in zip(names, first_bn)},
                       **{f"{pre(n)}running_var": mv[1] for n, mv in zip(names, first_bn)}}

    def _paired(self, bn: dict) -> dict:
        """A mask's probe statistics as a paired estimate: the statistics pass's (all of the
        user's data) moved by the mask's change on the probe, the mean by its difference from the
        reference's, the variance by its ratio; the probe's own sampling error cancels."""
        out, ref = {}, self.ref_bn
        for k, v in bn.items():
            if k.endswith("running_mean"):
                out[k] = self.start[k] + (v - ref[k])
            elif k.endswith("running_var"):
                out[k] = self.start[k] * (v + 1e-5) / (ref[k] + 1e-5)
            else:
                out[k] = v
        return out

    def reuse_start_bn(self, mask: Mask) -> None:
        """`mask` keeps the BatchNorm statistics the model had when pruning started (those of the
        statistics pass, all of the user's data): no probe pass needs to estimate them."""
        self.bn[_bn_key(mask.sparsity())] = {k: self.start[k].clone() for k in self.bn_live}
        self.whole.add(_bn_key(mask.sparsity()))  # the statistics pass's own: nothing to pair

    @torch.no_grad()
    def load(self, mask: Mask) -> None:
        # multi-tensor copies: a copy_ per tensor is a kernel launch each, launch-bound on a GPU
        for lives, saved in self._copies:
            torch._foreach_copy_(lives, saved)
        dead = {} if self.targets else None
        mask.apply(self.model, self.plan, dead)
        if self.targets:
            self.prior = CP.put_back(self.targets, CP.lost_means(self.targets, dead), self.bns, self.base_prior,
                                     self.follows)
        self.clock.lap("mask apply")

    def _recal(self) -> dict:
        """recalibrate_bn's arguments for the loaded candidate (its own shifted prior)."""
        return dict(self.recal, prior=self.prior) if self.prior is not None else self.recal

    def keep(self, mask: Mask) -> None:
        """Leave the model pruned by `mask`, with the BatchNorm statistics of its probe pass
        (one more pass over the probe where it was not probed, e.g. a fixed target), paired with
        the statistics pass's where the reference's probe statistics are known (paired-bn)."""
        self.load(mask)
        if self.estimates:
            key = _bn_key(mask.sparsity())
            if key in self.kept:  # kept before (the second probe judged it): its statistics again
                torch._foreach_copy_([self.bn_live[k] for k in self.kept[key]], list(self.kept[key].values()))
                return
            bn = self.bn.get(key)
            own = bn is None
            if own:
                recalibrate_bn(self.model, self.x, self.cfg.batch_size, self.device, **self._recal())
                self.samples += len(self.x)
                self.clock.lap("final recalibration")
            # paired-bn (S23): the statistics pass's, moved by what the mask changes on the probe
            if self.cfg.paired_bn and self.ref_bn is not None and key not in self.whole:
                bn = self._paired(self.bn_live if own else bn)
            if bn is not None:
                torch._foreach_copy_([self.bn_live[k] for k in bn], list(bn.values()))
                if not own and self.targets and self.prior is not None:
                    # statistics estimated before this load (its probe pass, or the statistics
                    # pass's): a layer that keeps the base's statistics keeps them shifted by this
                    # mask's own lost mean
                    for t in self.targets:
                        if t.bn_index is not None and not self.follows[t.bn_index]:
                            self.bns[t.bn_index].running_mean.copy_(self.prior[t.bn_index][0])
            self.kept[key] = {k: v.clone() for k, v in self.bn_live.items()}
