"""The vendor's own class directions (S59): per class, the mean of the centred, scaled penultimate
features of the vendor's labelled data (the federation's class means, common/engine/class_prior.py,
with true labels instead of pseudo-labels), recorded in the base checkpoint (`class_directions`).
Where no federation sends directions, a device of a few samples per class blends these with the
base's layer, under the same gates as the federation's. The pool's directions lie within 11-21
degrees of the vendor's on data-poor speech devices (cosine 0.935-0.982), and the vendor's lift
those devices alone by as much as the pool's did (docs/personalization.md, S59)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.class_prior import MAX_NORM, ClassPrior, class_shape
from common.model.batches import BATCH_SIZE
from common.model.checkpoint import VENDOR_LIMITS, recorded_rows


def _last(model: nn.Module) -> tuple[str, nn.Module]:
    from common.model.architectures import prunable_layers

    return list(prunable_layers(model).items())[-1]


@torch.no_grad()
def record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH_SIZE) -> dict:
    """The vendor's side (labels allowed): the output layer's name and, per class, the mean of the
    centred, scaled features of the vendor's samples of it (centred on the mean of all of them and
    divided by their mean norm, as a device does its own: class_means with true labels); a class it
    has no sample of is zeros. None where they would be more numbers than a device accepts
    (checkpoint.VENDOR_LIMITS)."""
    from common.engine.hidden_shift import over_labelled

    name, last = _last(model)
    n_cls, width = class_shape(model)
    if n_cls * width > VENDOR_LIMITS["direction_values"]:
        return {"class_directions": None}
    acc = {"sum": torch.zeros(n_cls, width), "count": torch.zeros(n_cls), "norm": 0.0}

    def add(labels, h):  # per class the sum of the features and their count; the sum of their norms
        h = h.detach().flatten(1).float().cpu()
        onehot = F.one_hot(labels.long(), n_cls).float()
        acc["sum"] += onehot.T @ h
        acc["count"] += onehot.sum(0)
        acc["norm"] += float(h.norm(dim=1).sum())

    over_labelled(model, x, y, {last: add}, outputs=False, batch_size=batch_size)
    n = max(float(acc["count"].sum()), 1.0)
    mu, scale = acc["sum"].sum(0) / n, max(acc["norm"] / n, 1e-12)
    have = acc["count"] > 0
    means = torch.where(have[:, None], (acc["sum"] / acc["count"].clamp_min(1.0)[:, None] - mu) / scale,
                        torch.zeros(()))
    means = means * (MAX_NORM / means.norm(dim=1, keepdim=True).clamp_min(MAX_NORM))  # within what a device accepts
    return {"class_directions": {"layer": name, "mean": [[round(float(v), 5) for v in row] for row in means]}}


def vendor_prior(model: nn.Module, meta: dict | None) -> ClassPrior | None:
    """The vendor's class directions as a ClassPrior (its frequencies from the record's class
    counts, else even), where the record names this model's output layer and fits its shape; else
    None."""
    means = recorded_rows(meta, "class_directions", _last(model)[0], class_shape(model))
    if means is None or (means.norm(dim=1) > MAX_NORM * (1 + 1e-3)).any():
        return None
    counts = (meta or {}).get("class_counts")
    freq = torch.tensor(counts, dtype=torch.float32) if isinstance(counts, list) and len(counts) == len(means) \
        else torch.ones(len(means))
    if not float(freq.sum()) > 0:
        freq = torch.ones(len(means))
    return ClassPrior(means, freq / freq.sum(), 0)
