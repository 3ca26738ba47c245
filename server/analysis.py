"""Shared-sparsity analysis over validated client summaries: per-layer sparsity, consensus mask,
pairwise similarity (exact from bitmaps, estimated from sketches or from private bitmaps), clusters,
layer agreement. Private (randomized-response) bitmaps are debiased into unbiased estimates."""
from __future__ import annotations

import numpy as np
import torch

from common.mask import Mask
from common.privacy import debias, estimate_jaccard, estimate_pruned_count
from common.summary import Summary, layer_sketch_jaccard, sketch_jaccard


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
        pruned = torch.stack([~m.layers[k] for m in masks])
        if epsilon is None:
            out[k] = pruned.sum(0) < need
        else:  # estimated votes, rounded to the nearest whole client
            out[k] = torch.from_numpy(debias(pruned.numpy(), epsilon).sum(0) < need - 0.5)
    return Mask(out)


def similarity(summaries: dict[str, Summary]) -> tuple[list[str], np.ndarray, str, np.ndarray | None]:
    """(client ids, Jaccard matrix of pruned sets, method, per-layer mean agreement).
    Exact from bitmaps, estimated from sketches or from private (randomized-response) bitmaps."""
    ids = sorted(summaries)
    n = len(ids)
    sim = np.eye(n)
    if n == 0:
        return ids, sim, "none", None
    ss = [summaries[i] for i in ids]
    if all(s.bitmap is not None for s in ss):
        eps = ss[0].epsilon
        jac = _bits_jaccard if eps is None else (lambda a, b: estimate_jaccard(a, b, eps))
        method = "exact (bitmap)" if eps is None else f"estimated (private bitmap, epsilon {eps:g})"
        items = [[(~m).flatten().numpy() for m in s.bitmap.layers.values()] for s in ss]
        flat = [np.concatenate(layers) for layers in items]
        pair = lambda i, j: jac(flat[i], flat[j])
        layer = lambda i, j: [jac(a, b) for a, b in zip(items[i], items[j])]
    elif all(s.sketch is not None for s in ss):
        method = "estimated (sketch)"
        pair = lambda i, j: sketch_jaccard(ss[i], ss[j])
        layer = lambda i, j: layer_sketch_jaccard(ss[i], ss[j])
    else:
        return ids, np.full((n, n), np.nan), "unavailable (stats level)", None
    per_layer = []
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = pair(i, j)
            per_layer.append(layer(i, j))
    agreement = np.mean(per_layer, axis=0) if per_layer else None
    return ids, sim, method, agreement


def _bits_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two pruned sets given as boolean arrays (True = pruned)."""
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


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


def analyze(summaries: dict[str, Summary], shapes: dict[str, tuple], quorum: float, threshold: float) -> dict:
    sizes = {k: int(np.prod(v)) for k, v in shapes.items()}
    total = sum(sizes.values())
    counts = {cid: pruned_per_layer(s, list(sizes.values())) for cid, s in summaries.items()}
    table = {cid: [p / n for p, n in zip(c, sizes.values())] for cid, c in counts.items()}
    ids, sim, method, agreement = similarity(summaries)
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
        "similarity": None if np.isnan(sim).any() else np.round(sim, 4).tolist(),
        "mean_pairwise_similarity": float(sim[off].mean()) if off.any() and not np.isnan(sim).any() else None,
        "clusters": clusters(ids, sim, threshold),
        "consensus_quorum": quorum,
        "consensus_sparsity": None if cons is None else cons.sparsity(),
        "consensus_layer_sparsity": None if cons is None else cons.layer_sparsity(),
        # without bitmaps, the connections all users pruned are at most min over users, per layer
        "consensus_all_upper_bound": upper / total if total else None,
    }
    if agreement is not None:
        order = np.argsort(agreement)
        out["layer_agreement"] = {layers[i]: round(float(agreement[i]), 4) for i in range(len(layers))}
        out["layer_agreed_most"] = layers[int(order[-1])]
        out["layer_agreed_least"] = layers[int(order[0])]
    return out
