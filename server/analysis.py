"""Shared-sparsity analysis over validated client summaries: per-layer sparsity, consensus mask,
pairwise similarity (exact from bitmaps, estimated from sketches), clusters, layer agreement."""
from __future__ import annotations

import numpy as np
import torch

from common.mask import Mask
from common.summary import Summary, layer_sketch_jaccard, sketch_jaccard


def layer_sparsity_table(summaries: dict[str, Summary], sizes: dict[str, int]) -> dict[str, list[float]]:
    names = list(sizes)
    return {cid: [s.pruned[i] / sizes[n] for i, n in enumerate(names)] for cid, s in summaries.items()}


def consensus(bitmaps: dict[str, Mask], quorum: float) -> Mask | None:
    """Connections pruned by at least `quorum` of the clients are pruned in the consensus mask."""
    if not bitmaps:
        return None
    masks = list(bitmaps.values())
    need = max(1, int(np.ceil(quorum * len(masks) - 1e-9)))
    out = {}
    for k in masks[0].layers:
        pruned_votes = torch.stack([~m.layers[k] for m in masks]).sum(0)
        out[k] = pruned_votes < need
    return Mask(out)


def similarity(summaries: dict[str, Summary]) -> tuple[list[str], np.ndarray, str, np.ndarray | None]:
    """(client ids, Jaccard matrix of pruned sets, method, per-layer mean agreement).
    Exact when every summary carries a bitmap, estimated when they carry sketches."""
    ids = sorted(summaries)
    n = len(ids)
    sim = np.eye(n)
    if n == 0:
        return ids, sim, "none", None
    if all(summaries[i].bitmap is not None for i in ids):
        method = "exact (bitmap)"
        pair = lambda a, b: a.bitmap.jaccard(b.bitmap)
        layer = lambda a, b: [_layer_jaccard(x, y) for x, y in zip(a.bitmap.layers.values(), b.bitmap.layers.values())]
    elif all(summaries[i].sketch is not None for i in ids):
        method = "estimated (sketch)"
        pair, layer = sketch_jaccard, layer_sketch_jaccard
    else:
        return ids, np.full((n, n), np.nan), "unavailable (stats level)", None
    per_layer = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = summaries[ids[i]], summaries[ids[j]]
            sim[i, j] = sim[j, i] = pair(a, b)
            per_layer.append(layer(a, b))
    agreement = np.mean(per_layer, axis=0) if per_layer else None
    return ids, sim, method, agreement


def _layer_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    pa, pb = ~a, ~b
    union = int((pa | pb).sum())
    return 1.0 if union == 0 else int((pa & pb).sum()) / union


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
    table = layer_sparsity_table(summaries, sizes)
    ids, sim, method, agreement = similarity(summaries)
    bitmaps = {k: s.bitmap for k, s in summaries.items() if s.bitmap is not None}
    cons = consensus(bitmaps, quorum) if len(bitmaps) == len(summaries) else None
    upper = sum(min(s.pruned[i] for s in summaries.values()) for i in range(len(sizes))) if summaries else 0
    off = ~np.eye(len(ids), dtype=bool)
    layers = list(sizes)
    out = {
        "clients": len(summaries),
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
