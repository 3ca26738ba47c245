"""Label-free stop rules: each judges a pruned model's outputs on the probe against a reference
(the unpruned model, adapted the same way), and says what it needs. Add one with @register."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine.stats import UsageStats

RULES = {}


def register(name: str, needs_stats: bool = False):
    """`needs_stats`: the rule reads activation statistics of the probe pass (output hooks)."""
    def deco(cls):
        cls.name, cls.needs_stats = name, needs_stats
        RULES[name] = cls
        return cls
    return deco


def _entropy(p: torch.Tensor) -> float:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean().item()


class StopRule:
    """value(logits, stats) -> a number; passes(value) -> whether the pruned model is kept."""

    def __init__(self, tolerance: float, ref_logits: torch.Tensor, ref_stats: UsageStats | None):
        self.tol = tolerance
        self.ref_logits, self.ref_stats = ref_logits, ref_stats

    def value(self, logits: torch.Tensor, stats: UsageStats | None) -> float:
        raise NotImplementedError

    def passes(self, v: float) -> bool:
        raise NotImplementedError


@register("agreement")
class Agreement(StopRule):
    """Share of the probe on which the pruned model predicts what the reference predicts."""

    def value(self, logits, stats):
        return (logits.argmax(1) == self.ref_logits.argmax(1)).float().mean().item()

    def passes(self, v):
        return v >= 1 - self.tol


@register("confidence")
class Confidence(StopRule):
    """Mean top-class probability, at most `tolerance` below the reference's."""

    def value(self, logits, stats):
        return F.softmax(logits, 1).max(1).values.mean().item()

    def passes(self, v):
        return v >= F.softmax(self.ref_logits, 1).max(1).values.mean().item() - self.tol


@register("entropy")
class Entropy(StopRule):
    """Mean prediction entropy, at most `tolerance` above the reference's."""

    def value(self, logits, stats):
        return _entropy(F.softmax(logits, 1))

    def passes(self, v):
        return v <= _entropy(F.softmax(self.ref_logits, 1)) + self.tol


@register("drift", needs_stats=True)
class Drift(StopRule):
    """Mean over layers of the relative change of per-unit mean activation."""

    def value(self, logits, stats):
        return activation_drift(self.ref_stats, stats)

    def passes(self, v):
        return v <= self.tol


@register("none")
class Never(StopRule):
    """No rule: prune to max-sparsity."""

    def value(self, logits, stats):
        return 0.0

    def passes(self, v):
        return True


def activation_drift(ref: UsageStats, cur: UsageStats) -> float:
    vals = []
    for k, r in ref.layers.items():
        a, b = r.mean_activation(), cur.layers[k].mean_activation()
        vals.append(((a - b).norm() / (a.norm() + 1e-12)).item())
    return sum(vals) / max(len(vals), 1)


def make_rule(name: str, tolerance: float, ref_logits: torch.Tensor, ref_stats: UsageStats | None) -> StopRule:
    if name not in RULES:
        raise ValueError(f"unknown stop rule '{name}' (choose from: {', '.join(RULES)})")
    return RULES[name](tolerance, ref_logits, ref_stats)
