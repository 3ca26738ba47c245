"""Label-free fine-pruning: forward passes over a user's unlabeled data, usage scores, an
iterative sparsity schedule and a stop rule judged only by the model's own behaviour."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, make_dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import settings as ST
from common.mask import Mask
from common.models import OutputRestricted, prunable_layers
from common.scoring import get_scorer
from common.forward import batched_forward, features_and_logits, forward_pass, recalibrate_bn
from common.stats import UsageStats

SCOPES = ST.BY_NAME["scope"].choices
STOP_RULES = ST.BY_NAME["stop-rule"].choices
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
        return self

    def probe_samples(self, n: int) -> int:
        """The probe: a quarter of the user's data, at least 32 and at most 128 samples (a probe
        pass then costs at most a quarter of a full pass on all but the smallest data sets)."""
        return min(n, self.probe_size or max(32, min(128, n // 4)))

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

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("mask")
        d.pop("stats")
        return d


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


def _bn_buffers(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def compute_scores(model: nn.Module, stats: UsageStats, scoring: str, seed: int, keep_last: bool = False) -> dict:
    scorer = get_scorer(scoring)
    gen = torch.Generator().manual_seed(seed)
    layers = prunable_layers(model)
    last = list(layers)[-1]
    scores = {}
    for name, m in layers.items():
        s = scorer(m.weight.detach(), stats.layers[name], gen).float()
        if (scorer.structured or keep_last) and name == last:
            # class outputs are not units to drop (see restrict_outputs); a prototype head
            # replaces the output layer, so ranking its old weights would mask the new one at random
            s = torch.full_like(s, math.inf)
        scores[name] = s
    return scores


def mask_at(scores: dict, base: Mask, sparsity: float, scope: str, structured: bool = False) -> Mask:
    """Keep the highest-scoring connections so that `sparsity` of all weights are pruned.
    Already-pruned connections (base mask) stay pruned. `structured`: scores are per output unit
    and whole units go (never a part of one)."""
    if structured:
        return _units_at(scores, base, sparsity, scope)
    out = {}
    if scope == "global":
        flat = torch.cat([torch.where(base.layers[k], s.cpu(), -math.inf).flatten() for k, s in scores.items()])
        n_prune = int(round(sparsity * flat.numel()))
        if n_prune == 0:
            return base.copy()
        order = torch.argsort(flat, stable=True)
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[order[:n_prune]] = False
        off = 0
        for k, s in scores.items():
            out[k] = keep[off:off + s.numel()].view(s.shape) & base.layers[k]
            off += s.numel()
        return Mask(out)
    for k, s in scores.items():
        # "row": every output unit keeps the same share of its inputs (Wanda's comparison group)
        rows = s.reshape(s.shape[0], -1) if scope == "row" else s.reshape(1, -1)
        ranked = torch.where(base.layers[k].reshape(rows.shape), rows.cpu(), -math.inf)
        n_prune = int(round(sparsity * ranked.shape[1]))
        keep = torch.ones(ranked.shape, dtype=torch.bool)
        keep.scatter_(1, torch.argsort(ranked, dim=1, stable=True)[:, :n_prune], False)
        out[k] = keep.view(s.shape) & base.layers[k]
    return Mask(out)


def masker(scores: dict, dense: Mask, scope: str, structured: bool):
    """sparsity -> Mask from fixed scores. The global unstructured ranking is sorted once: the
    stop-rule search asks for masks at several sparsities of the same scores."""
    if structured or scope != "global":
        return lambda sparsity: mask_at(scores, dense, sparsity, scope, structured)
    names = list(scores)
    shapes = [scores[k].shape for k in names]
    flat = torch.cat([scores[k].flatten() for k in names])  # sorted where the scores are (a GPU sorts
    order = torch.argsort(flat, stable=True)                 # ResNet50's 25M scores in milliseconds)

    def at(sparsity: float) -> Mask:
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[order[:int(round(sparsity * flat.numel()))]] = False
        parts = torch.split(keep, [math.prod(sh) for sh in shapes])
        return Mask({k: v.view(sh) for k, v, sh in zip(names, parts, shapes)})
    return at


def _units_at(scores: dict, base: Mask, sparsity: float, scope: str) -> Mask:
    """Structured pruning: rank output units by their score and drop the lowest whole units
    (units already dead in `base` count first) until `sparsity` of the weights are gone."""
    unit = {k: torch.where(base.layers[k].reshape(s.shape[0], -1).any(1), s.reshape(s.shape[0], -1)[:, 0].cpu(),
                           -math.inf) for k, s in scores.items()}
    size = {k: s[0].numel() for k, s in scores.items()}
    groups = [list(scores)] if scope == "global" else [[k] for k in scores]
    out = {k: base.layers[k].clone() for k in scores}
    for names in groups:
        budget = sparsity * sum(scores[k].numel() for k in names)
        cand = sorted(((float(unit[k][i]), k, i) for k in names for i in range(len(unit[k]))),
                      key=lambda t: t[0])
        pruned = 0
        for score, k, i in cand:
            if pruned + size[k] / 2 > budget or score == math.inf:
                break
            out[k][i] = False
            pruned += size[k]
    return Mask(out)


def schedule(step: float, max_sparsity: float, target: float | None = None) -> list[float]:
    """Sparsity after each step when `step` of the remaining weights go each time."""
    top = target if target is not None else max_sparsity
    levels, k = [], 1
    while True:
        s = 1 - (1 - step) ** k
        if s >= top - 1e-9:
            levels.append(top)
            return levels
        levels.append(s)
        k += 1


class StopRule:
    """Judges a pruned model against the reference (unpruned) model on probe data, no labels."""

    def __init__(self, name: str, tolerance: float, ref_logits: torch.Tensor, ref_stats: UsageStats | None):
        self.name, self.tol = name, tolerance
        self.ref_pred = ref_logits.argmax(1)
        p = F.softmax(ref_logits, 1)
        self.ref_conf = p.max(1).values.mean().item()
        self.ref_ent = _entropy(p)
        self.ref_stats = ref_stats

    def value(self, logits: torch.Tensor, stats: UsageStats | None) -> float:
        p = F.softmax(logits, 1)
        if self.name == "agreement":
            return (logits.argmax(1) == self.ref_pred).float().mean().item()
        if self.name == "confidence":
            return p.max(1).values.mean().item()
        if self.name == "entropy":
            return _entropy(p)
        if self.name == "drift":
            return activation_drift(self.ref_stats, stats)
        return 0.0

    def passes(self, v: float) -> bool:
        if self.name == "agreement":
            return v >= 1 - self.tol
        if self.name == "confidence":
            return v >= self.ref_conf - self.tol
        if self.name == "entropy":
            return v <= self.ref_ent + self.tol
        if self.name == "drift":
            return v <= self.tol
        return True


def _entropy(p: torch.Tensor) -> float:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean().item()


def activation_drift(ref: UsageStats, cur: UsageStats) -> float:
    """Mean over layers of the relative change of per-unit mean activation."""
    vals = []
    for k, r in ref.layers.items():
        a, b = r.mean_activation(), cur.layers[k].mean_activation()
        vals.append(((a - b).norm() / (a.norm() + 1e-12)).item())
    return sum(vals) / max(len(vals), 1)


def restricted_classes(logits: torch.Tensor, min_frac: float) -> list[int]:
    counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    keep = torch.nonzero(counts >= max(1, math.ceil(min_frac * len(logits)))).flatten().tolist()
    return keep or [int(counts.argmax())]


def apply_restriction(model: nn.Module, mask: Mask, classes: list[int]) -> Mask:
    """Prune the output rows of classes this user never gets; returns the new mask."""
    last = list(prunable_layers(model))[-1]
    mask = mask.copy()
    drop = torch.ones(mask.layers[last].shape[0], dtype=torch.bool)
    drop[classes] = False
    mask.layers[last][drop] = False
    return mask


def fine_prune(model: nn.Module, x: torch.Tensor, cfg: PruneConfig, device: str = "cpu",
               progress=None) -> PruneResult:
    """Personalize `model` in place on unlabeled inputs `x`. Returns the mask and a report.
    `progress(done, total, text)` is called as work advances."""
    cfg.validate()
    if len(x) == 0:
        raise ValueError("no personalization data: the user's data set is empty")
    t0 = time.perf_counter()
    tick = progress or (lambda *a: None)
    model.to(device).eval()
    fwd = 0
    scorer = get_scorer(cfg.scoring)
    structured = scorer.structured
    need_outputs = "outputs" in scorer.needs or cfg.stop_rule == "drift"
    need_classes = "classes" in scorer.needs
    if cfg.recalibrate_bn and not cfg.base_stats:
        # One pass both adapts BatchNorm to the user and measures usage on the adapted network:
        # under a domain shift the base's own activations mislead the ranking (digits users
        # with their own style, 70% sparsity: 0.728 with base statistics, 0.812 adapted).
        logits, stats = recalibrate_bn(model, x, cfg.batch_size, device, hooks=need_outputs, classes=need_classes)
    else:
        stats, logits = collect_stats(model, x, cfg.batch_size, device, outputs=need_outputs, classes=need_classes)
    fwd += len(x)
    tick(1, 3, "statistics collected")
    dense = Mask.dense(model)
    restricted = restricted_classes(logits, cfg.restrict_min_frac) if cfg.restrict_outputs else None
    scores = compute_scores(model, stats, cfg.scoring, cfg.seed, keep_last=cfg.head == "prototypes")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.probe_samples(len(x))]
    probe = x[pick]
    need_stats = cfg.stop_rule == "drift"
    recalibrated = {}  # sparsity -> BatchNorm statistics recalibrated in that probe pass

    def evaluate(mask: Mask):
        """One pass over the probe with `mask` applied. With recalibrate_bn the same pass
        re-estimates BatchNorm statistics, so the rule judges the model as it will be kept."""
        nonlocal fwd
        model.load_state_dict(original)
        mask.apply(model)
        fwd += len(probe)
        if cfg.recalibrate_bn:
            lg, st = recalibrate_bn(model, probe, cfg.batch_size, device, hooks=True if need_stats else None)
            recalibrated[round(mask.sparsity(), 9)] = _bn_buffers(model)
            return lg, st
        if need_stats:
            st, lg = collect_stats(model, probe, cfg.batch_size, device)
            return lg, st
        return predict_logits(model, probe, cfg.batch_size, device), None

    if cfg.target_sparsity is not None or cfg.stop_rule == "none":
        levels = schedule(cfg.step, cfg.max_sparsity, cfg.target_sparsity)
        mask = masker(scores, dense, cfg.scope, structured)(levels[-1]) if cfg.target_sparsity != 0 else dense
        reason = (f"reached target sparsity {cfg.target_sparsity:.3f}" if cfg.target_sparsity is not None
                  else f"reached max sparsity {cfg.max_sparsity:.3f} (stop rule 'none')")
        history = []
    else:
        # The reference is the unpruned model's own output on the probe, taken from the statistics
        # pass (no extra forward pass); with output restriction, the restricted outputs. With
        # BatchNorm recalibration it is the unpruned model recalibrated the same way (one probe
        # pass), so the rule measures what pruning changes, not what recalibration changes.
        ref_logits, ref_stats = logits[pick].clone(), stats
        if cfg.recalibrate_bn:
            ref_logits, probe_stats = evaluate(dense)
            ref_stats = probe_stats if need_stats else stats
        if restricted is not None:
            drop = torch.ones(ref_logits.shape[1], dtype=torch.bool)
            drop[restricted] = False
            ref_logits[:, drop] = -math.inf
        rule = StopRule(cfg.stop_rule, cfg.tolerance, ref_logits, ref_stats if need_stats else None)
        levels = schedule(cfg.step, cfg.max_sparsity)
        mask, reason, history = _search(levels, scores, dense, cfg, rule, evaluate, model, x, device,
                                        restricted, tick)
        fwd += sum(h.get("stat_samples", 0) for h in history)
    if restricted is not None:
        mask = apply_restriction(model, mask, restricted)
    model.load_state_dict(original)
    mask.apply(model)
    if cfg.recalibrate_bn:  # BatchNorm statistics of the pruned network on this user's data
        bn = recalibrated.get(round(mask.sparsity(), 9))
        if bn is None:  # not probed (fixed target): one pass over the probe
            recalibrate_bn(model, probe, cfg.batch_size, device)
            fwd += len(probe)
        else:
            model.load_state_dict(bn, strict=False)
    if cfg.head == "prototypes":
        imprint_prototypes(model, x, mask, cfg.batch_size, device)
        fwd += len(x)
    tick(3, 3, reason)
    return PruneResult(mask, mask.sparsity(), reason, restricted, time.perf_counter() - t0, fwd, history, stats)


@torch.no_grad()
def imprint_prototypes(model: nn.Module, x: torch.Tensor, mask: Mask, batch_size: int, device: str) -> None:
    """Replace the output layer by T3A's prototype classifier (forward only, no labels): each
    class's weight row becomes the normalized mean of the normalized features the adapted, pruned
    network predicts as that class (lowest-entropy supports, the old row as a warm-up support);
    the bias goes. The output layer is not ranked for pruning under this head, so its mask holds
    only the rows of restricted-away classes, which stay pruned."""
    from common.baselines import T3AHead

    feats, logits, last = features_and_logits(model, x, batch_size, device)
    head = T3AHead(last.weight, last.bias, feats, logits)
    name = list(prunable_layers(model))[-1]
    w = head.weight.T.reshape(last.weight.shape).to(last.weight)
    last.weight.copy_(w * mask.layers[name].to(w.device))
    if last.bias is not None:
        last.bias.zero_()


def personalized_model(model: nn.Module, result: PruneResult) -> nn.Module:
    """The model as a device uses it: wrapped so excluded classes can never be predicted."""
    if result.restricted_classes is None:
        return model
    n = list(prunable_layers(model).values())[-1].weight.shape[0]
    return OutputRestricted(model, result.restricted_classes, n, result.restricted_classes)


def _search(levels, scores, dense, cfg, rule, evaluate, model, x, device, restricted, tick):
    history = []
    structured = get_scorer(cfg.scoring).structured
    at = masker(scores, dense, cfg.scope, structured)

    def check(mask):
        m = apply_restriction(model, mask, restricted) if restricted is not None else mask
        logits, st = evaluate(m)
        if restricted is not None:  # as OutputRestricted does: excluded classes are impossible
            allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
            allowed[restricted] = True
            logits[:, ~allowed] = -math.inf
        v = rule.value(logits, st)
        ok = rule.passes(v)
        history.append({"sparsity": round(mask.sparsity(), 4), "value": round(v, 4), "passed": ok})
        tick(2, 3, f"sparsity {mask.sparsity():.2f}: {rule.name}={v:.3f} {'ok' if ok else 'fail'}")
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
            return masks[lo], f"reached max sparsity {cfg.max_sparsity:.3f} within tolerance", history
        return masks[lo], failed(fail_v, levels[hi]), history

    mask = dense
    for level in levels:
        # fixed scores give nested masks; re-scored ones rank what is left of the current mask
        cand = mask_at(scores, mask, level, cfg.scope, structured) if cfg.rescore else at(level)
        ok, v = check(cand)
        if not ok:
            return mask, failed(v, level), history
        mask = cand
        if cfg.rescore:  # usage of the surviving connections, measured in the pruned network
            probe_x = x[:cfg.probe_samples(len(x))]
            st, _ = collect_stats(model, probe_x, cfg.batch_size, device,
                                  classes="classes" in get_scorer(cfg.scoring).needs)
            history[-1]["stat_samples"] = len(probe_x)
            scores = compute_scores(model, st, cfg.scoring, cfg.seed, keep_last=cfg.head == "prototypes")
    return mask, f"reached max sparsity {cfg.max_sparsity:.3f} within tolerance", history
