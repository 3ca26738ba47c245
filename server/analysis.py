"""Shared-sparsity analysis over validated client summaries: per-layer sparsity, consensus mask,
pairwise similarity (exact from bitmaps, estimated from sketches or from private bitmaps), clusters,
layer agreement. Private (randomized-response) bitmaps are debiased into unbiased estimates."""
from __future__ import annotations

import numpy as np
import torch

from common.engine import class_prior as CPR
from common.model.mask import Mask
from common.wire.privacy import debias, estimate_pruned_count
from common.wire.summary import SKETCH_BITS, Summary


def pruned_per_layer(s: Summary, sizes: list[int]) -> list[float]:
    """Pruned connections per layer: exact, or debiased from a private summary."""
    if s.epsilon is None:
        return [float(p) for p in s.pruned]
    return [min(float(n), max(0.0, estimate_pruned_count(p, n, s.epsilon))) for p, n in zip(s.pruned, sizes)]


def robust_voters(bitmaps: dict[str, Mask]) -> tuple[dict[str, Mask], list[str]]:
    """The masks that may vote on a shared base: not (nearly) all-pruned or all-kept, and with a
    sparsity within 3 median absolute deviations (at least 0.05) of the median. Returns (voters,
    ids of the outliers)."""
    sp = {k: m.sparsity() for k, m in bitmaps.items()}
    med = float(np.median(list(sp.values())))
    mad = max(float(np.median([abs(v - med) for v in sp.values()])), 0.05 / 3)
    bad = [k for k, v in sp.items() if v > 0.99 or v < 0.01 or abs(v - med) > 3 * mad]
    return {k: m for k, m in bitmaps.items() if k not in bad}, sorted(bad)


def consensus(bitmaps: dict[str, Mask], quorum: float, epsilon: float | None = None) -> Mask | None:
    """Connections pruned by at least `quorum` of the clients are pruned in the consensus mask.
    With private bitmaps (`epsilon`), the prune votes are debiased estimates."""
    if not bitmaps:
        return None
    masks = list(bitmaps.values())
    need = max(1, int(np.ceil(quorum * len(masks) - 1e-9)))
    out = {}
    for k in masks[0].layers:
        votes = _prune_votes(masks, k)
        if epsilon is None:
            out[k] = votes < need
        else:  # estimated votes, rounded to the nearest whole client
            out[k] = torch.from_numpy(len(masks) * debias(votes.double().numpy() / len(masks), epsilon) < need - 0.5)
    return Mask(out)


def _prune_votes(masks: list[Mask], layer: str) -> torch.Tensor:
    """How many of the masks prune each connection of `layer`, counted one mask at a time (5,000
    masks are never held stacked)."""
    count = torch.zeros(masks[0].layers[layer].shape, dtype=torch.int32)
    for m in masks:
        count += ~m.layers[layer]
    return count


def similarity(summaries: dict[str, Summary]) -> tuple[list[str], np.ndarray, str, np.ndarray | None]:
    """(client ids, Jaccard matrix of pruned sets, method, per-layer mean agreement).
    Exact from bitmaps, estimated from sketches or from private (randomized-response) bitmaps.
    All pairs at once, layer by layer, as matrix products: 5,000 clients are 12.5 M pairs, which a
    Python loop over pairs would take hours for (docs/engine_cost.md)."""
    ids = sorted(summaries)
    n = len(ids)
    if n == 0:
        return ids, np.eye(0), "none", None
    ss = [summaries[i] for i in ids]
    if all(s.bitmap is not None for s in ss):
        eps = ss[0].epsilon
        method = "exact (bitmap)" if eps is None else f"estimated (private bitmap, epsilon {eps:g})"
        layer_stats = (_bitmap_layer(ss, k, eps) for k in ss[0].bitmap.layers)
    elif all(s.sketch is not None for s in ss):
        method = "estimated (sketch)"
        layer_stats = (_sketch_layer(ss, layer) for layer in range(len(ss[0].sketch)))
    else:
        return ids, np.full((n, n), np.nan), "unavailable (stats level)", None
    inter_total, union_total, agreement = np.zeros((n, n)), np.zeros((n, n)), []
    off = ~np.eye(n, dtype=bool)
    for j, inter, union in layer_stats:
        inter_total += inter
        union_total += union
        agreement.append(float(j[off].mean()) if n > 1 else np.nan)
        del j, inter, union
    sim = _jaccard(inter_total, union_total, clip=method.startswith("estimated (private"))
    np.fill_diagonal(sim, 1.0)
    return ids, sim, method, (np.array(agreement) if n > 1 else None)


def _bitmap_layer(ss: list[Summary], name: str, eps: float | None):
    """One layer's (Jaccard matrix, intersection sizes, union sizes) from bitmaps. Exact counts
    when not private; from debiased bits (unbiased intersections and sizes) when private."""
    pruned = np.stack([(~s.bitmap.layers[name]).flatten().numpy() for s in ss])  # N x M, True = pruned
    n, m = pruned.shape
    inter = np.zeros((n, n))
    sizes = np.zeros(n)
    for c in range(0, m, 4096):  # column chunks bound memory: N x 4096 at a time
        block = pruned[:, c:c + 4096]
        block = block.astype(np.float32) if eps is None else debias(block, eps)
        inter += block @ block.T
        sizes += block.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return _jaccard(inter, union, clip=eps is not None), inter, union


def _jaccard(inter: np.ndarray, union: np.ndarray, clip: bool) -> np.ndarray:
    """inter / union, 1 where both sets are empty; clipped to [0, 1] for debiased (private)
    estimates, which can stray outside it."""
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)
    return np.clip(j, 0.0, 1.0) if clip else j


def _sketch_layer(ss: list[Summary], layer: int):
    """One layer's (Jaccard estimate, intersection, union) from b-bit MinHash sketches: the share
    of equal bins for all pairs is one product of one-hot codes; per pair, the share of equal bins
    less the chance collision rate (Li and Koenig's b-bit MinHash), the pair's intersection and
    union following from the estimate and the two set sizes."""
    pruned = np.array([s.pruned[layer] for s in ss], dtype=np.float64)
    vals = np.stack([s.sketch[layer] for s in ss]).astype(np.int64)  # N x bins, 255 = empty set
    bins = vals.shape[1]
    onehot = np.concatenate([(vals == v).astype(np.float64) for v in range(2 ** SKETCH_BITS)], axis=1)
    match = (onehot @ onehot.T) / bins
    collide = 2.0 ** -SKETCH_BITS
    j = np.clip((match - collide) / (1 - collide), 0.0, 1.0)
    empty = pruned == 0
    either = empty[:, None] | empty[None, :]
    j = np.where(either, (pruned[:, None] == pruned[None, :]).astype(np.float64), j)
    total = pruned[:, None] + pruned[None, :]
    inter = j * total / (1 + j)
    return j, inter, total - inter


def clusters(ids: list[str], sim: np.ndarray, threshold: float) -> list[list[str]]:
    """Average-linkage clusters of users whose masks are within `threshold` (1 - Jaccard)."""
    if len(ids) < 2 or np.isnan(sim).any():
        return [ids] if ids else []
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    dist = np.clip(1 - sim, 0, 1)
    np.fill_diagonal(dist, 0)
    labels = fcluster(linkage(squareform(dist, checks=False), "average"), t=threshold, criterion="distance")
    groups = {}
    for cid, lab in zip(ids, labels):
        groups.setdefault(int(lab), []).append(cid)
    return sorted(groups.values(), key=lambda g: (-len(g), g))


MATRIX_MAX = 200  # clients up to which report.json holds the whole similarity matrix
VIEW_MAX = 200    # cells per side of the heatmap's matrix, whatever the number of clients


def similarity_view(ids: list[str], sim: np.ndarray, groups: list[list[str]]) -> dict:
    """The heatmap's matrix: clients ordered by cluster (largest first), and beyond VIEW_MAX
    clients, averaged over blocks of consecutive clients in that order, so the plot and the
    report stay the same size at 5,000 clients as at 200."""
    pos = {cid: i for i, cid in enumerate(ids)}
    order = np.array([pos[c] for g in groups for c in g], dtype=np.int64)
    n = len(order)
    if n <= VIEW_MAX:
        view, per_cell, labels = sim[np.ix_(order, order)], 1, [ids[i] for i in order]
    else:
        starts = np.linspace(0, n, VIEW_MAX + 1).astype(np.int64)[:-1]
        sizes = np.diff(np.append(starts, n))
        rows = np.add.reduceat(sim[order], starts, axis=0)          # VIEW_MAX x n
        view = np.add.reduceat(rows[:, order], starts, axis=1) / np.outer(sizes, sizes)
        per_cell, labels = int(sizes.max()), None
    bounds = np.cumsum([len(g) for g in groups])[:-1]
    return {"matrix": np.round(view, 3).tolist(), "labels": labels, "clients_per_cell": per_cell,
            "cluster_bounds": [int(b) for b in bounds if len(bounds) <= VIEW_MAX]}


def analyze(summaries: dict[str, Summary], shapes: dict[str, tuple], quorum: float, threshold: float) -> dict:
    sizes = {k: int(np.prod(v)) for k, v in shapes.items()}
    total = sum(sizes.values())
    counts = {cid: pruned_per_layer(s, list(sizes.values())) for cid, s in summaries.items()}
    table = {cid: [p / n for p, n in zip(c, sizes.values())] for cid, c in counts.items()}
    ids, sim, method, agreement = similarity(summaries)
    groups = clusters(ids, sim, threshold)
    bitmaps = {k: s.bitmap for k, s in summaries.items() if s.bitmap is not None}
    eps = next(iter(summaries.values())).epsilon if summaries else None
    cons = consensus(bitmaps, quorum, eps) if len(bitmaps) == len(summaries) else None
    upper = sum(min(c[i] for c in counts.values()) for i in range(len(sizes))) if summaries else 0
    off = ~np.eye(len(ids), dtype=bool)
    layers = list(sizes)
    out = {
        "clients": len(summaries),
        "privacy_epsilon": eps,
        "layer_names": layers,
        "layer_sizes": sizes,
        "layer_sparsity": {k: [round(v, 4) for v in row] for k, row in table.items()},
        "layer_sparsity_mean": {n: float(np.mean([row[i] for row in table.values()])) if table else None
                                for i, n in enumerate(layers)},
        "similarity_method": method,
        "similarity_ids": ids,
        # the full matrix only while it is small; always a bounded view for the plot
        "similarity": None if np.isnan(sim).any() or len(ids) > MATRIX_MAX else np.round(sim, 4).tolist(),
        "mean_pairwise_similarity": float(sim[off].mean()) if off.any() and not np.isnan(sim).any() else None,
        "clusters": groups,
        "consensus_quorum": quorum,
        "consensus_sparsity": None if cons is None else cons.sparsity(),
        "consensus_layer_sparsity": None if cons is None else cons.layer_sparsity(),
        # without bitmaps, the connections all users pruned are at most min over users, per layer
        "consensus_all_upper_bound": upper / total if total else None,
    }
    if not np.isnan(sim).any() and len(ids) > 1:
        out["similarity_view"] = similarity_view(ids, sim, groups)
    if agreement is not None:
        order = np.argsort(agreement)
        out["layer_agreement"] = {layers[i]: round(float(agreement[i]), 4) for i in range(len(layers))}
        out["layer_agreed_most"] = layers[int(order[-1])]
        out["layer_agreed_least"] = layers[int(order[0])]
    return out


def pruned_shares(bitmaps: dict[str, Mask], epsilon: float | None = None) -> dict[str, torch.Tensor]:
    """Per connection, the share of the clients that pruned it (the federation's prior). From
    private bitmaps (`epsilon`), the debiased estimate clipped to [0, 1]: post-processing of
    randomized response, so each device keeps its epsilon."""
    masks = list(bitmaps.values())
    out = {}
    for k in masks[0].layers:
        share = _prune_votes(masks, k).double() / len(masks)
        if epsilon is not None:  # debias is linear: the mean of debiased bits is the debiased mean
            share = torch.from_numpy(debias(share.numpy(), epsilon)).clamp(0, 1)
        out[k] = share.float()
    return out


def class_directions(summaries: dict[str, Summary], outliers: list[str], min_clients: int):
    """The class directions the next round gives back: the class means of every summary that
    carries them, outliers out, pooled (common/engine/class_prior.py: each device's mean of a class
    counts once), over at least `min_clients` devices. Returns (ClassPrior or None, its record)."""
    got = {k: s.classes for k, s in summaries.items() if s.classes is not None and k not in set(outliers)}
    if len(got) < min_clients:
        return None, {"skipped": f"{len(got)} devices sent class means (outliers out), slim-min-clients is "
                                 f"{min_clients}"}
    prior = CPR.pool(list(got.values()))
    return prior, {"voters": len(got), "spread": round(CPR.spread(prior.freq), 3),
                   "classes_predicted": int((prior.means.norm(dim=1) > 0).sum())}
