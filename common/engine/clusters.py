"""The user's own groups of samples: a user holding a few classes of the base's kind of input (one
speaker saying four digits) forms as many tight groups in the penultimate features as it holds
classes, whatever the base predicts for them. The normalized Laplacian of the features'
k-nearest-neighbour graph then has that many near-zero eigenvalues and a gap after them (spectral
clustering's eigengap; von Luxburg 2007). A user of all the classes with a couple of samples each
forms no such groups: its spectrum rises gradually. Where the gap shows fewer groups than the
model has classes, each group takes one class, its samples' mean predicted probabilities deciding
and no two groups taking one class (an assignment, the Hungarian method), and those are the head's pseudo-labels: one
wrong prediction no longer takes a sample to another class, a group decides together (S68)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.engine import adapt as AD

KNN = 5             # each sample's neighbours in the graph (a group needs more members than this to stand apart)
GAP = 0.5           # the least eigengap that shows groups (leave one cohort out: docs/personalization.md, S68)
MAX_SAMPLES = 128   # the graph is samples x samples; groups stand apart only where a class has few more samples
                    # than KNN (no screened user of more than 42 showed any), and the spectrum grows as n^3
CONFIDENT = 0.99    # a prediction no group overturns: a group that would has merged classes (S68)


@dataclass(frozen=True)
class Groups:
    """The groups the spectrum shows: how many, the gap after them, each sample's group."""
    count: int
    gap: float
    labels: torch.Tensor

    def info(self) -> dict:
        return {"groups": self.count, "eigengap": round(self.gap, 4),
                "group_sizes": torch.bincount(self.labels, minlength=self.count).tolist()}


def group_labels(feats: torch.Tensor, logits: torch.Tensor, gap: float = GAP,
                 confident: float = CONFIDENT) -> tuple[Groups | None, torch.Tensor | None, dict]:
    """(the groups, their pseudo-labels as logits (group_logits), what the check saw), or None for
    both where the features form no groups (user_groups), or where the groups are not the user's
    classes: the model predicts more than SLACK classes beyond them (the BatchNorm check's slack
    for the classes a model's errors add: a user of every class whose features group by something
    else, a voice's noise or a style), or their classes overturn a prediction the model makes with
    at least `confident` probability (groups that merged classes the model tells apart)."""
    feats, logits = feats.detach().float().cpu(), logits.detach().float().cpu()
    groups = user_groups(feats, logits.shape[1], gap)
    if groups is None:
        return None, None, {}
    p = F.softmax(logits, 1)
    labels = group_logits(groups, p)
    top, own = p.max(1)
    overturned = labels.argmax(1) != own
    predicted = AD.classes_predicted(logits)
    info = dict(groups.info(), classes_predicted=predicted,
                group_agreement=round(float((~overturned).float().mean()), 4),
                group_overturns=round(float(top[overturned].max()) if bool(overturned.any()) else 0.0, 4))
    used = predicted - groups.count <= AD.SLACK and info["group_overturns"] < confident
    info["groups_used"] = used
    return (groups, labels, info) if used else (None, None, info)


def spectrum(feats: torch.Tensor, knn: int = KNN) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the normalized Laplacian of the samples'
    symmetric k-nearest-neighbour graph, on centred, unit-length features, each edge weighted by a
    Gaussian of its length over the local scales of its two ends (self-tuning; Zelnik-Manor &
    Perona 2004)."""
    z = feats.double()
    z = z - z.mean(0)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = len(z)
    d = torch.cdist(z, z)
    k = min(knn, n - 1)
    near = d.sort(1)
    scale = near.values[:, k]
    w = torch.exp(-d ** 2 / (scale[:, None] * scale[None, :]).clamp_min(1e-12))
    edge = torch.zeros_like(w)
    edge.scatter_(1, near.indices[:, 1:k + 1], 1.0)
    w = w * ((edge + edge.T) > 0).double()
    w.fill_diagonal_(0)
    deg = w.sum(1).clamp_min(1e-12)
    lap = torch.eye(n, dtype=w.dtype) - w / torch.sqrt(deg[:, None] * deg[None, :])
    return torch.linalg.eigh(lap)


def _kmeans(z: torch.Tensor, k: int, iters: int = 100) -> torch.Tensor:
    """k-means from farthest-point seeds (deterministic): each row's group."""
    seeds = [0]
    for _ in range(1, k):
        seeds.append(int(torch.cdist(z, z[seeds]).min(1).values.argmax()))
    centres = z[seeds].clone()
    labels = torch.cdist(z, centres).argmin(1)
    for _ in range(iters):
        centres = torch.stack([z[labels == j].mean(0) if bool((labels == j).any()) else centres[j] for j in range(k)])
        new = torch.cdist(z, centres).argmin(1)
        if bool((new == labels).all()):
            break
        labels = new
    return labels


def user_groups(feats: torch.Tensor, n_classes: int, gap: float = GAP) -> Groups | None:
    """The groups the user's features form, where the spectrum shows fewer than `n_classes` of
    them with an eigengap of at least `gap`; None otherwise (or too few or too many samples)."""
    n = len(feats)
    if n < 3 or n > MAX_SAMPLES or n_classes < 2:
        return None
    values, vectors = spectrum(feats)
    m = min(n_classes, n - 1)
    gaps = values[1:m + 1] - values[:m]
    count = int(gaps.argmax()) + 1
    if count < 2 or count >= n_classes or float(gaps[count - 1]) < gap:
        return None
    # spectral clustering's embedding (Ng, Jordan & Weiss 2001): the first eigenvectors, rows normalized
    z = vectors[:, :count]
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = _kmeans(z, count)
    return Groups(count, float(gaps[count - 1]), labels)


def assignment(gain: np.ndarray) -> list[tuple[int, int]]:
    """The rows-to-columns assignment (rows <= columns, no column twice) that maximizes the summed
    gain: the shortest augmenting path form of the Hungarian method (Jonker & Volgenant), one row at
    a time, vectorized over the columns. Written here, checked against SciPy's in a test: SciPy's
    import alone costs a device more than the personalization of a small user (S47)."""
    cost = -np.asarray(gain, dtype=np.float64)
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    match = np.zeros(m + 1, dtype=np.int64)  # column j's row, 1-based; 0: free (column 0 is the root)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        best = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < best[1:])
            best[1:][better] = reduced[better]
            way[1:][better] = j0
            j1 = int(np.argmin(np.where(free, best[1:], np.inf))) + 1
            delta = best[j1]
            u[match[used]] += delta
            v[used] -= delta
            best[~used] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    return sorted((int(match[j]) - 1, j - 1) for j in range(1, m + 1) if match[j])


def group_logits(groups: Groups, p: torch.Tensor) -> torch.Tensor:
    """Pseudo-labels by group: each group takes one class, no two the same, the assignment that
    maximizes the summed log of each group's mean predicted probability `p` of its class; returned
    as logits (0 for a sample's group's class, -30 elsewhere) for a head to read."""
    ids = groups.labels.unique()
    mean = torch.stack([p[groups.labels == j].mean(0) for j in ids])
    out = torch.full_like(p, -30.0)
    for r, c in assignment(torch.log(mean.clamp_min(1e-12)).double().numpy()):
        out[groups.labels == ids[r], c] = 0.0
    return out
