"""Local differential privacy for mask summaries: randomized response on every mask bit.

A device flips each bit of its exact mask independently with probability 1 / (1 + e^epsilon)
before it leaves the device, so any single connection's bit is epsilon-locally-private (the whole
mask of n bits composes to n * epsilon: the guarantee is per connection, not per user). The server
never sees the exact mask; it debiases the noisy bits into unbiased estimates of per-connection
prune frequencies (the consensus), per-layer sparsity and pairwise intersections (Jaccard).
"""
from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
import torch

from common.model.mask import Mask

MAX_EPSILON = 20.0  # beyond this randomized response flips < 1 bit in 10^8: no privacy at all


def check_epsilon(epsilon) -> float:
    """A usable epsilon, or ValueError naming the problem."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise ValueError(f"privacy epsilon must be a number, got {epsilon!r}")
    if not math.isfinite(epsilon) or not 0 < epsilon <= MAX_EPSILON:
        raise ValueError(f"privacy epsilon must be in (0, {MAX_EPSILON}], got {epsilon}")
    return float(epsilon)


def keep_probability(epsilon: float) -> float:
    """Probability that randomized response reports a bit truthfully: e^eps / (1 + e^eps)."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def randomize(mask: Mask, epsilon: float, seed: int | None = None) -> Mask:
    """The mask with every bit flipped with probability 1 / (1 + e^epsilon). Without a seed the
    randomness comes from the OS (the server cannot replay it); a seed is for tests only."""
    flip_p = 1.0 - keep_probability(check_epsilon(epsilon))
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    out = {}
    for name, kept in mask.layers.items():
        flip = torch.from_numpy(rng.random(kept.shape) < flip_p)
        out[name] = kept ^ flip
    return Mask(out)


def permanent_randomize(mask: Mask, epsilon: float, key: bytes) -> Mask:
    """Randomized response that is the same every time it is asked (RAPPOR's permanent randomized
    response): whether bit i is reported truthfully when it is b is decided once, by the device's
    secret `key`, i and b alone. Asking again, with other settings, another base of the same
    architecture or another epsilon the device allows, gives the same noisy bit for the same true
    bit: a server cannot collect fresh noise to vote it away. (Independent draws for b = 0 and
    b = 1: a bit that really changes is not revealed by two reports either.)"""
    keep = keep_probability(check_epsilon(epsilon))
    out = {}
    for name, kept in mask.layers.items():
        draws = []
        for b in (0, 1):
            seed = int.from_bytes(hashlib.sha256(key + f"|{name}|{b}".encode()).digest()[:16], "big")
            draws.append(torch.from_numpy(np.random.default_rng(seed).random(kept.shape) < keep))
        truthful = torch.where(kept, draws[1], draws[0])
        out[name] = torch.where(truthful, kept, ~kept)
    return Mask(out)


def information(epsilon: float | None) -> float:
    """How much of a mask bit's information its randomized report keeps, at most: (2p - 1)^2 =
    tanh(epsilon / 2)^2 (the Fisher information about a share of 1/2 that one report carries,
    against the exact bit's; less at shares near 0 or 1). 0.21 at epsilon 1, 0.58 at 2; 1 without
    privacy."""
    return 1.0 if not epsilon else math.tanh(epsilon / 2) ** 2


def effective_voters(voters: int, epsilon: float | None) -> float:
    """How many exact masks the shares of `voters` randomized ones are worth, at most (P11): a
    private prior counts as an aggregate of this many devices against slim-min-clients."""
    return voters * information(epsilon)


def debias(pruned_bits: np.ndarray, epsilon: float) -> np.ndarray:
    """Unbiased estimate of the true pruned indicator (0/1) of each reported bit:
    E[(b - (1 - p)) / (2p - 1)] = true bit, for randomized response with keep probability p."""
    p = keep_probability(epsilon)
    return (pruned_bits.astype(np.float64) - (1.0 - p)) / (2.0 * p - 1.0)


def estimate_pruned_count(noisy_pruned: int, size: int, epsilon: float) -> float:
    """Unbiased estimate of how many of `size` connections were really pruned."""
    p = keep_probability(epsilon)
    return (noisy_pruned - size * (1.0 - p)) / (2.0 * p - 1.0)


def estimate_jaccard(a: np.ndarray, b: np.ndarray, epsilon: float) -> float:
    """Jaccard similarity of two users' pruned sets from their noisy pruned bits. Intersection and
    sizes are unbiased (the two users' noise is independent); the ratio is consistent."""
    da, db = debias(a, epsilon), debias(b, epsilon)
    inter = float(da @ db)
    union = float(da.sum() + db.sum()) - inter
    if union <= 0:
        return 1.0
    return min(1.0, max(0.0, inter / union))
