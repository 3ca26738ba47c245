"""Class-mix recalibration (S43): BatchNorm statistics that follow a user's shift without
absorbing the user's class mix. The vendor records each class's mean and mean square per
BatchNorm channel (recorded_moments); the device estimates its class mix from pseudo-labels that
cannot have absorbed it and computes the statistics that mix alone would give each channel
(class_mix); the recalibration then moves each channel only by what the mix does not predict
(common.engine.bn.class_mix_stats). A user holding the vendor's own mix is recalibrated in full.
Where only the input side follows the user, its first layer's own statistics, against the
recorded ones, estimate the mix for free (fit_mix, S47)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from common.engine.bn import bn_layers
from common.engine.class_prior import spread
from common.model.architectures import prunable_layers
from common.model.checkpoint import VENDOR_LIMITS

MOMENT_VALUES = VENDOR_LIMITS["moment_values"]  # the most a vendor record carries, as a device accepts


def recorded_moments(sums: list) -> list | None:
    """The vendor record's class_moments from adapt.class_sums: per BatchNorm layer, each class's
    channel means and mean squares to six significant digits; None where they would exceed
    MOMENT_VALUES (a model of many classes and channels: the device then recalibrates as before)."""
    moments = [(s1 / cnt[:, None].clamp_min(1), s2 / cnt[:, None].clamp_min(1)) for s1, s2, cnt in sums]
    if sum(2 * m.numel() for m, _ in moments) > MOMENT_VALUES:
        return None
    sig = lambda t: [[float(f"{v:.6g}") for v in row] for row in t.tolist()]  # noqa: E731
    return [{"mean": sig(m), "square": sig(q)} for m, q in moments]


def moments_for(model: nn.Module, meta: dict | None, first: int | None = None) -> list | None:
    """The checkpoint's per-class moments as (mean, mean square) tensors of (classes, channels) per
    BatchNorm layer, if they fit this model's layers and its number of outputs; else None. `first`:
    only that many layers' (a record for every layer still required; a ResNet18's whole record
    takes 5 ms to read)."""
    rec = (meta or {}).get("class_moments")
    bns = bn_layers(model)
    if not isinstance(rec, list) or len(rec) != len(bns) or not bns:
        return None
    classes = getattr(list(prunable_layers(model).values())[-1], "out_features", None)
    out = []
    for layer, m in list(zip(rec, bns))[:first]:
        try:
            mean, square = (torch.tensor(layer[k], dtype=torch.float32) for k in ("mean", "square"))
        except (TypeError, KeyError, ValueError):
            return None
        if mean.dim() != 2 or mean.shape != square.shape or mean.shape != (classes, m.num_features):
            return None
        out.append((mean, square))
    return out


def class_mix(moments: list, pi: torch.Tensor) -> list:
    """Per BatchNorm layer, the mean and variance each channel would have over the vendor's data
    drawn in the class mix `pi` (S43): what a user holding that mix moves a channel to without
    any shift of its own."""
    pi = pi.float() / pi.float().sum().clamp_min(1e-12)
    out = []
    for mean, square in moments:
        m = pi @ mean
        out.append((m, (pi @ square - m * m).clamp_min(1e-5)))
    return out


def fit_mix(mean: torch.Tensor, var: torch.Tensor, moments: tuple, var_b: torch.Tensor) -> tuple:
    """The class mix that best explains one BatchNorm layer's statistics over the user's data
    (`mean`, `var` per channel) from the vendor's per-class moments of that layer (`moments`: its
    (mean, mean square) of (classes, channels)): least squares over the channels' means and mean
    squares in the base's units (`var_b`), on the simplex (non-negative least squares, the sum held
    to one by a heavily weighted row). Returns (mix, the share of the move from the
    vendor's own mix that the fitted mix explains: near 1 where a class mix is all that moved the
    layer, low where a style moved it in ways no mix of classes does)."""
    m, q = moments
    scale = var_b.double().clamp_min(1e-5)
    a = torch.cat([m.double() / scale.sqrt(), q.double() / scale], 1).T  # (2C, classes)
    b = torch.cat([mean.double() / scale.sqrt(), (var.double() + mean.double() ** 2) / scale])
    k = a.shape[1]
    if not bool(torch.isfinite(b).all()):  # statistics of inputs no fit can explain
        return torch.full((k,), 1.0 / k), 0.0
    w = 1e3 * float(a.abs().max().clamp_min(1.0))  # the row that holds the sum to one
    try:
        pi = nnls(np.vstack([a.numpy(), np.full((1, k), w)]), np.append(b.numpy(), w), maxiter=50 * k)
    except RuntimeError:  # no fit within its steps: no mix is taken for explained
        return torch.full((k,), 1.0 / k), 0.0
    pi = torch.from_numpy(pi).clamp_min(0)
    pi = pi / pi.sum() if float(pi.sum()) > 0 else torch.full((k,), 1.0 / k, dtype=pi.dtype)
    uniform = float(((a @ torch.full((k,), 1.0 / k, dtype=a.dtype) - b) ** 2).sum())
    left = float(((a @ pi - b) ** 2).sum())
    return pi.float(), (1.0 - left / uniform) if uniform > 0 else 0.0


def nnls(a: np.ndarray, b: np.ndarray, maxiter: int) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0: Lawson and Hanson's active set (SciPy's algorithm; its
    import alone takes a third of a second on a device that has not loaded it, for a problem of a
    few classes). RuntimeError past `maxiter` inner steps."""
    n = a.shape[1]
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(0).max() * max(a.shape)
    x, free = np.zeros(n), np.zeros(n, dtype=bool)
    steps = 0
    w = a.T @ (b - a @ x)
    while (~free).any() and w[~free].max() > tol:
        free[np.argmax(np.where(free, -np.inf, w))] = True
        while True:
            steps += 1
            if steps > maxiter:
                raise RuntimeError("nnls: no solution within its steps")
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if (z[free] > tol).all():
                x = z
                break
            out = free & (z <= tol)  # step back to where the first of them reaches zero
            alpha = np.min(x[out] / (x[out] - z[out]))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
        w = a.T @ (b - a @ x)
    return x


def pseudo_label_share(logits: torch.Tensor) -> float:
    """Over what share of the classes hard pseudo-labels spread: exp of the entropy of their
    frequencies, over the number of classes (a user holding 3 of 10 classes evenly: 0.3)."""
    return spread(torch.bincount(logits.argmax(1), minlength=logits.shape[1])) / logits.shape[1]
