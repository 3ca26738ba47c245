"""The data protocol: for a task, who is the vendor (labeled data that trains and tests the base)
and who are the users (a pool the vendor never sees, cut into users by a partitioning, each with
unlabeled personalization data and a labeled held-out split). Every caller asks here."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from common.data import partition as PT
from common.data import readers as D
from common.data.tasks import get_task, load_task_data

TEST_TAKES = 5    # FSDD/official: takes 0-4 of every speaker are the test takes
VENDOR_FRAC = 0.5         # digits: the share of the images the vendor trains on; the rest are users'
VENDOR_TRAIN = 0.9        # of the vendor's data, the share it trains on; the rest tests the base
VENDOR_TAKE = 25  # federation and seen-speaker users: takes >= 25 are the vendor's, 5-24 users'


def vendor_indices(task_name: str, ds: D.Dataset, seed: int, vendor_frac: float, exclude_speaker=None):
    """(train, test) indices of the vendor's data. digits: a seeded share of the images (the rest
    is the users' pool). Speech: official training takes of all speakers but the excluded one."""
    if task_name == "digits":
        vend, _ = PT.vendor_user_split(len(ds), vendor_frac, seed)
        rng = np.random.default_rng(seed)
        vend = rng.permutation(vend)
        k = int(len(vend) * VENDOR_TRAIN)
        return np.sort(vend[:k]), np.sort(vend[k:])
    idx = np.arange(len(ds))
    if exclude_speaker is not None and ds.groups is not None:
        if exclude_speaker not in set(ds.groups.tolist()):
            raise D.DataError(f"speaker '{exclude_speaker}' not in the data")
        idx = idx[ds.groups != exclude_speaker]
    if ds.takes is not None:
        return idx[ds.takes[idx] >= 5], idx[ds.takes[idx] < 5]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(idx)
    k = int(len(idx) * VENDOR_TRAIN)
    return np.sort(idx[:k]), np.sort(idx[k:])


def vendor_train_test(task: str, ds: D.Dataset, seed: int):
    """The federation's base: the vendor's share of the data, VENDOR_TRAIN of it to train and the rest to test."""
    vendor, _ = vendor_and_pool(task, ds, seed)
    vendor = np.random.default_rng(seed).permutation(vendor)
    k = int(len(vendor) * VENDOR_TRAIN)
    return np.sort(vendor[:k]), np.sort(vendor[k:])


def seen_speaker_split(ds: D.Dataset):
    """Speech users the vendor has heard: the vendor trains on takes >= 25 of every speaker and
    tests on takes 0-4; a user's unlabeled data is its takes 5-24, its held-out data takes 0-4."""
    idx = np.arange(len(ds))
    return idx[ds.takes >= VENDOR_TAKE], idx[ds.takes < TEST_TAKES]


def speaker_user(ds: D.Dataset, speaker: str, takes=None):
    """One speaker as a user: (unlabeled indices, held-out indices = the official test takes).
    `takes` = (first, end) limits the unlabeled takes (default: every take from 5 on)."""
    idx = np.flatnonzero(ds.groups == speaker)
    lo, hi = takes or (TEST_TAKES, None)
    pers = idx[(ds.takes[idx] >= lo) & (ds.takes[idx] < (hi if hi is not None else np.inf))]
    return pers, idx[ds.takes[idx] < TEST_TAKES]


@lru_cache(maxsize=4)
def task_dataset(task: str, data_path: str) -> D.Dataset:
    return load_task_data(get_task(task), data_path or None)


def vendor_and_pool(task: str, ds: D.Dataset, seed: int):
    """Disjoint indices: the vendor's labeled training data and the users' pool."""
    if ds.takes is not None:
        idx = np.arange(len(ds))
        return idx[ds.takes >= VENDOR_TAKE], idx[ds.takes < VENDOR_TAKE]
    return PT.vendor_user_split(len(ds), VENDOR_FRAC, seed)


def simulated_user(cfg: dict, partition_id: int, num_partitions: int) -> PT.UserData:
    """Client `partition_id` of `num_partitions`: only its own user is built (the partition of the
    pool into index groups is computed once per process and cached), so a client's work does not
    grow with the number of clients."""
    sub = _pool(cfg["task"], cfg["data-path"], cfg["seed"])
    if cfg["partitioning"] == "sampled":
        idx = PT.sampled_group(sub.y.numpy(), partition_id, cfg["client-samples"],
                              (cfg["classes-min"], cfg["classes-max"]), cfg["seed"])
        user = PT.make_user(sub, [idx], 0, cfg["heldout-frac"], cfg["seed"] + partition_id)
        user.user_id = f"user{partition_id}"
        return user
    if cfg["partitioning"] == "speaker":
        if sub.groups is None:
            raise D.DataError(f"task '{cfg['task']}' has no speakers to partition by")
        names, groups = PT.partition_by_group(sub.groups)
        if num_partitions > len(names):
            raise D.DataError(f"{num_partitions} clients but only {len(names)} speakers")
        idx = np.asarray(groups[partition_id])
        if sub.takes is not None:  # official split: takes 0-4 are the held-out test takes
            pers, ev = idx[sub.takes[idx] >= TEST_TAKES], idx[sub.takes[idx] < TEST_TAKES]
            return PT.UserData(names[partition_id], sub.x[torch.as_tensor(pers)], sub.x[torch.as_tensor(ev)],
                              sub.y[torch.as_tensor(ev)])
        groups = [idx]
        partition_id = 0
    else:
        groups = _groups(cfg["task"], cfg["data-path"], cfg["seed"], cfg["partitioning"], num_partitions,
                         cfg["classes-min"], cfg["classes-max"], cfg["dirichlet-alpha"])
    return PT.make_user(sub, groups, partition_id, cfg["heldout-frac"], cfg["seed"] + partition_id)


@lru_cache(maxsize=4)
def _pool(task: str, data_path: str, seed: int) -> D.Dataset:
    ds = task_dataset(task, data_path)
    return ds.subset(vendor_and_pool(task, ds, seed)[1])


@lru_cache(maxsize=8)
def _groups(task, data_path, seed, partitioning, n, cmin, cmax, alpha) -> tuple:
    y = _pool(task, data_path, seed).y.numpy()
    if partitioning == "classes":
        groups = PT.partition_class_subsets(y, n, (cmin, cmax), seed)
    else:
        groups = PT.partition_dirichlet(y, n, alpha, seed)
    return tuple(np.asarray(g, dtype=np.int64) for g in groups)


def check_partition(cfg: dict) -> None:
    """Refuse, before any device starts, a run whose data cannot give every client some: a task
    that needs a data path without one, more speaker clients than speakers, empty partitions."""
    task = get_task(cfg["task"])
    if task.name != "digits" and not cfg["data-path"]:
        raise D.DataError(f"task '{task.name}' needs a data path (--data or data-path)")
    sub = _pool(cfg["task"], cfg["data-path"], cfg["seed"])  # the same cached pool the clients use
    n = cfg["num-clients"]
    if cfg["partitioning"] == "speaker":
        if sub.groups is None:
            raise D.DataError(f"task '{cfg['task']}' has no speakers to partition by")
        speakers = len(set(sub.groups.tolist()))
        if n > speakers:
            raise D.DataError(f"{n} speaker clients but only {speakers} speakers in the data")
        return
    y = sub.y.numpy()
    if cfg["partitioning"] == "sampled":  # users draw independently: only the classes must hold enough
        smallest = min(np.count_nonzero(y == c) for c in np.unique(y))
        if smallest * cfg["classes-min"] < 2:
            raise D.DataError(f"a class of the pool has {smallest} samples: too few to draw users from")
        return
    groups = _groups(cfg["task"], cfg["data-path"], cfg["seed"], cfg["partitioning"], n,
                     cfg["classes-min"], cfg["classes-max"], cfg["dirichlet-alpha"])
    if min(len(g) for g in groups) < 2:  # one unlabeled sample and one held out, at the least
        raise D.DataError(f"{len(sub)} pool samples cannot give each of {n} clients data "
                          f"({sum(len(g) < 2 for g in groups)} would get fewer than 2); "
                          f"partitioning='sampled' lets users overlap and serves any number")

