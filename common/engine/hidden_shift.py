"""Whether a head built from pseudo-labels can be trusted where the network's features cannot
follow the user (no BatchNorm layer to recalibrate, or recalibration turned off): only where its
last hidden layer moved no further than the user's class mix explains (S26).

- The vendor records, per channel of the last hidden layer's output (the pre-activation the
  penultimate features come from), its mean, variance and the share of its variance that lies
  between the classes (eta^2) on its training data: `hidden_record`, a few numbers per channel.
- The device sums the same channels' moments over its statistics pass (a hook on a pass it runs
  anyway) and measures how far they moved beyond the class mix as S13 does for BatchNorm layers
  (explained_weight), over the channels that vary on the vendor's data.
- A user holding a few classes moves them by its class mix alone; a new style moves them beyond
  it. Prototypes of a shifted network's pseudo-labels learn its errors (a BatchNorm-free digits
  CNN, styled users: T3A -6.8 points, one user -20), where on unshifted features they gain (users
  holding 2-3 classes: +1.5).
- Where they moved, the head is kept still where it spreads the model's mean prediction over the
  user's data over more classes than the base's layer (S58, heads.spreads_wider, at no pass): a
  shift that collapsed the predictions onto a few classes is what prototypes undo (new voices on
  the speech network without BatchNorm: T3A +9 points, every user's predictions wider), where
  prototypes that learn a style's errors narrow them (styled digits: 1 user of 32 wider).
- Where they did not move, prototypes can learn only the user's class mix: none where the
  pseudo-labels spread over nearly every class (NO_LABEL_SHIFT), and there the base's layer stays
  (S36: users holding every class, unshifted, whom prototypes cost; docs/personalization.md)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.bn import explained_weight
from common.engine.stats import eta_squared
from common.model.architectures import prunable_layers
from common.model.batches import BATCH_SIZE

# the share of the classes the pseudo-labels must spread over for no label shift to show (S36;
# leave-one-cohort-out, every fold: docs/personalization.md)
NO_LABEL_SHIFT = 0.6


def hidden_layer(model: nn.Module) -> str | None:
    """The last hidden layer: the prunable layer before the output layer (None without one)."""
    names = list(prunable_layers(model))
    return names[-2] if len(names) >= 2 else None


def _moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel, the mean and the mean square over positions: (N, C) each."""
    h = h.detach().float()
    if h.dim() > 2:
        dims = tuple(range(2, h.dim()))
        return h.mean(dims), (h ** 2).mean(dims)
    return h, h ** 2


@torch.no_grad()
def over_labelled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hooks: dict, outputs: bool,
                  batch_size: int = BATCH_SIZE) -> None:
    """The vendor's side (labels allowed): `model` over the vendor's data in eval mode, batch by
    batch, each module of `hooks` calling its function with (that batch's labels, the module's
    input, or its output where `outputs`). Both vendor records are summed this way."""
    cur = {}

    def hook(add):
        return (lambda _m, _args, out: add(cur["y"], out)) if outputs else (lambda _m, args: add(cur["y"], args[0]))

    handles = [m.register_forward_hook(hook(add)) if outputs else m.register_forward_pre_hook(hook(add))
               for m, add in hooks.items()]
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            cur["y"] = y[i:i + batch_size]
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()


def hidden_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH_SIZE) -> dict:
    """The vendor's record of the last hidden layer: its name and, per output channel over the
    vendor's data in eval mode, mean, variance (samples and positions) and eta^2; {} for a model
    with no hidden layer."""
    name = hidden_layer(model)
    if name is None:
        return {}
    n_cls = int(y.max()) + 1
    acc = {}

    def add(labels, out):
        per, sq = _moments(out)
        onehot = F.one_hot(labels, n_cls).float()
        for k, v in (("cls", onehot.T @ per), ("sq", sq.sum(0)), ("cnt", onehot.sum(0)), ("s1", per.sum(0))):
            acc[k] = v if k not in acc else acc[k] + v

    over_labelled(model, x, y, {prunable_layers(model)[name]: add}, outputs=True, batch_size=batch_size)
    n = acc["cnt"].sum()
    mean = acc["s1"] / n
    var = (acc["sq"] / n - mean ** 2).clamp_min(0)
    spread = eta_squared(acc["cls"], acc["cnt"], acc["sq"])
    r = lambda t: [round(float(v), 5) for v in t]  # noqa: E731
    return {"hidden_record": {"layer": name, "mean": r(mean), "var": r(var), "spread": r(spread)}}


def record_for(model: nn.Module, meta: dict | None) -> dict | None:
    """The checkpoint's hidden_record as tensors, if it fits this model's last hidden layer."""
    rec = (meta or {}).get("hidden_record")
    name = hidden_layer(model)
    if not isinstance(rec, dict) or name is None or rec.get("layer") != name:
        return None
    try:
        out = {k: torch.tensor(rec[k], dtype=torch.float32) for k in ("mean", "var", "spread")}
    except (KeyError, TypeError, ValueError):
        return None
    layer = prunable_layers(model)[name]
    channels = layer.weight.shape[0]
    return out if all(v.dim() == 1 and len(v) == channels for v in out.values()) else None


class HiddenMoments:
    """The last hidden layer's per-channel moments summed over the passes it is open for (the
    statistics pass); a no-op where `on` is false."""

    def __init__(self, model: nn.Module, on: bool):
        name = hidden_layer(model) if on else None
        self.layer = prunable_layers(model)[name] if name is not None else None
        self.s1 = self.sq = None
        self.n = 0

    def _hook(self, _m, _args, out):
        per, sq = _moments(out)
        self.s1 = per.sum(0) if self.s1 is None else self.s1 + per.sum(0)
        self.sq = sq.sum(0) if self.sq is None else self.sq + sq.sum(0)
        self.n += per.shape[0]

    def __enter__(self):
        self._handle = self.layer.register_forward_hook(self._hook) if self.layer is not None else None
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()

    def shift(self, record: dict | None, kappa: float) -> float | None:
        """How far the channels that vary on the vendor's data moved beyond what the user's class
        mix explains: the mean of explained_weight against the record (None without one)."""
        if record is None or not self.n:
            return None
        mean = (self.s1 / self.n).cpu()
        var = (self.sq / self.n).cpu() - mean ** 2
        varies = record["var"] > 1e-8
        if not bool(varies.any()):
            return None
        w = explained_weight(mean, var.clamp_min(0), record["mean"], record["var"], record["spread"], kappa)
        return float(w[varies].mean())
