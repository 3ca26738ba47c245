"""How users are cut from a dataset: by a few classes each, by label skew (Dirichlet), by a group
such as a speaker, or drawn from their own few classes; the vendor's share apart from the users';
each user's unlabeled personalization inputs and its labeled held-out split (evaluation only)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.data.readers import DataError, Dataset


@dataclass
class UserData:
    user_id: str
    unlabeled: torch.Tensor      # personalization inputs, labels never given to the pruner
    heldout_x: torch.Tensor      # evaluation only
    heldout_y: torch.Tensor


def split_heldout(idx: np.ndarray, frac: float, rng: np.random.Generator):
    idx = rng.permutation(idx)
    n_eval = max(1, int(round(len(idx) * frac)))
    return idx[n_eval:], idx[:n_eval]


def make_users(ds: Dataset, groups: list, heldout_frac: float, seed: int, prefix: str = "user"):
    """Turn lists of sample indices into users with unlabeled and held-out splits."""
    rng = np.random.default_rng(seed)
    users = []
    for i, idx in enumerate(groups):
        pers, ev = split_heldout(np.asarray(idx), heldout_frac, rng)
        users.append(UserData(f"{prefix}{i}", ds.x[torch.as_tensor(pers)], ds.x[torch.as_tensor(ev)],
                              ds.y[torch.as_tensor(ev)]))
    return users


def make_user(ds: Dataset, groups: list, i: int, heldout_frac: float, seed: int, prefix: str = "user") -> UserData:
    """make_users(...)[i] without building the others: the random stream is replayed over the
    groups before i (index permutations only, no tensors), so user i is bit-identical."""
    rng = np.random.default_rng(seed)
    for idx in groups[:i]:
        split_heldout(np.asarray(idx), heldout_frac, rng)
    pers, ev = split_heldout(np.asarray(groups[i]), heldout_frac, rng)
    return UserData(f"{prefix}{i}", ds.x[torch.as_tensor(pers)], ds.x[torch.as_tensor(ev)], ds.y[torch.as_tensor(ev)])


def sampled_group(y: np.ndarray, user: int, n_samples: int, classes_per_user: tuple, seed: int = 0) -> np.ndarray:
    """One user's sample indices, drawn from its own few classes, independent of how many users
    there are (users may share samples): what lets a simulation have more users than samples,
    and each client build only its own user."""
    rng = np.random.default_rng([seed, user])
    classes = np.unique(y)
    k = min(len(classes), int(rng.integers(classes_per_user[0], classes_per_user[1] + 1)))
    held = rng.choice(classes, size=k, replace=False)
    idx = np.flatnonzero(np.isin(y, held))
    return np.sort(rng.choice(idx, size=min(n_samples, len(idx)), replace=False))


def partition_class_subsets(y: np.ndarray, n_users: int, classes_per_user: tuple, seed: int = 0):
    """Each user holds a few classes; samples of a class are shared out among the users holding it."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    held = [rng.choice(classes, size=rng.integers(classes_per_user[0], classes_per_user[1] + 1),
                       replace=False) for _ in range(n_users)]
    groups = [[] for _ in range(n_users)]
    for c in classes:
        owners = [u for u in range(n_users) if c in held[u]]
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        for part, u in zip(np.array_split(idx, len(owners)), owners):
            groups[u].extend(part.tolist())
    return groups


def partition_by_group(groups_arr: np.ndarray):
    """One user per group value (e.g. one speaker per user)."""
    names = sorted(set(groups_arr.tolist()))
    return names, [np.flatnonzero(groups_arr == g).tolist() for g in names]


def partition_dirichlet(y: np.ndarray, n_users: int, alpha: float, seed: int = 0, min_size: int = 10):
    """Label skew: class c's samples are split among users by proportions ~ Dirichlet(alpha)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        groups = [[] for _ in range(n_users)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_users)) * len(idx)).astype(int)[:-1]
            for u, part in enumerate(np.split(idx, cuts)):
                groups[u].extend(part.tolist())
        if min(len(g) for g in groups) >= min_size:
            return groups
    raise DataError(f"cannot give {n_users} users at least {min_size} samples each with alpha={alpha}")


def vendor_user_split(n: int, vendor_frac: float, seed: int):
    """Disjoint sample indices: the vendor's labeled training set and the pool users draw from."""
    idx = np.random.default_rng(seed).permutation(n)
    k = int(n * vendor_frac)
    return np.sort(idx[:k]), np.sort(idx[k:])
