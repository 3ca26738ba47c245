"""What the ServerApp and the ClientApp agree on: run-config defaults, how a base model travels
(ArrayRecord + metadata), and how simulated users are cut from a task's data."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from common import data as D
from common.privacy import check_epsilon
from common.tasks import get_task, load_task_data

# Every key of [tool.flwr.app.config]; the ServerApp fills in what a run leaves out.
DEFAULTS = {
    "task": "digits",
    "data-path": "",
    "num-clients": 10,
    "min-clients": 2,
    "num-rounds": 1,
    "partitioning": "classes",        # classes | speaker | dirichlet
    "classes-min": 2,
    "classes-max": 3,
    "dirichlet-alpha": 0.5,
    "heldout-frac": 0.3,
    "scoring": "usage",
    "scope": "global",
    "stop-rule": "agreement",
    "tolerance": 0.02,
    "target-sparsity": -1.0,          # < 0: use the stop rule
    "recalibrate-bn": True,
    "restrict-outputs": True,
    "head": "linear",                 # linear | prototypes (output layer imprinted from the user's features)
    "summary-level": "sketch",        # stats | sketch | bitmap
    "privacy-epsilon": 0.0,           # > 0: local DP, randomized response on mask bits (bitmap level)
    "device": "auto",
    "research-accuracy": True,        # simulation only: held-out labeled accuracy, for research
    "slim-base": False,               # derive a slimmer shared base from the consensus, send it next round
    "slim-quorum": 1.0,               # ... pruning what at least this share of clients pruned
    "consensus-quorum": 0.5,
    "cluster-threshold": 0.1,         # users closer than this (1 - Jaccard) fall in one cluster
    "base-checkpoint": "",            # empty: pretrain the task's base model at the start
    "pretrain-epochs": 0,             # 0: the task's default
    "out-dir": "",                    # empty: ~/fineprune-runs/<time>
    "seed": 0,
    "round-timeout": 600.0,
    "crash-clients": "",              # fault injection for resilience tests: partition ids / device names that crash
    "stall-clients": "",              # ... that hang before personalizing, as a stuck device does
}

CLIENT_KEYS = ("task", "data-path", "partitioning", "classes-min", "classes-max", "dirichlet-alpha",
               "heldout-frac", "scoring", "scope", "stop-rule", "tolerance", "target-sparsity",
               "recalibrate-bn", "restrict-outputs", "head", "summary-level", "privacy-epsilon", "device",
               "research-accuracy", "seed", "crash-clients", "stall-clients")
PARTITIONINGS = ("classes", "speaker", "dirichlet")
FSDD_VENDOR_TAKE = 25  # fsdd federation: takes >= 25 train the base, 5-24 are users' unlabeled data


def merged_config(run_config: dict, overrides: dict | None = None) -> dict:
    cfg = dict(DEFAULTS)
    for src in (run_config or {}, overrides or {}):
        for k, v in src.items():
            if k not in DEFAULTS:
                raise ValueError(f"unknown run-config key '{k}' (known: {', '.join(DEFAULTS)})")
            cfg[k] = type(DEFAULTS[k])(v) if not isinstance(DEFAULTS[k], bool) else _as_bool(v)
    if cfg["partitioning"] not in PARTITIONINGS:
        raise ValueError(f"unknown partitioning '{cfg['partitioning']}' (choose from: {', '.join(PARTITIONINGS)})")
    get_task(cfg["task"])
    if cfg["privacy-epsilon"] != 0:
        check_epsilon(cfg["privacy-epsilon"])
        if cfg["summary-level"] != "bitmap":
            raise ValueError(f"privacy-epsilon needs summary-level 'bitmap', not '{cfg['summary-level']}'")
    return cfg


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


# ---------------------------------------------------------------- base model transport
def base_to_records(model: torch.nn.Module, meta: dict):
    from flwr.app import ArrayRecord, ConfigRecord

    keep = {k: meta[k] for k in ("arch", "arch_kwargs", "task", "classes", "features")}
    return ArrayRecord.from_torch_state_dict(model.state_dict()), ConfigRecord({"meta": json.dumps(keep)})


def records_to_base(arrays, meta_record):
    from common.models import build_model

    meta = json.loads(meta_record["meta"])
    meta["arch_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["arch_kwargs"].items()}
    model = build_model(meta["arch"], **meta["arch_kwargs"])
    model.load_state_dict(arrays.to_torch_state_dict())
    return model.eval(), meta


def model_bytes(model: torch.nn.Module) -> int:
    """Size of the dense fp32 model: the yardstick for upload sizes."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


# ---------------------------------------------------------------- simulated users
@lru_cache(maxsize=4)
def _dataset(task: str, data_path: str) -> D.Dataset:
    return load_task_data(get_task(task), data_path or None)


def vendor_and_pool(task: str, ds: D.Dataset, seed: int):
    """Disjoint indices: the vendor's labeled training data and the users' pool."""
    if ds.takes is not None:
        idx = np.arange(len(ds))
        return idx[ds.takes >= FSDD_VENDOR_TAKE], idx[ds.takes < FSDD_VENDOR_TAKE]
    return D.vendor_user_split(len(ds), 0.5, seed)


def simulated_user(cfg: dict, partition_id: int, num_partitions: int) -> D.UserData:
    ds = _dataset(cfg["task"], cfg["data-path"])
    _, pool = vendor_and_pool(cfg["task"], ds, cfg["seed"])
    sub = ds.subset(pool)
    if cfg["partitioning"] == "speaker":
        if sub.groups is None:
            raise D.DataError(f"task '{cfg['task']}' has no speakers to partition by")
        names, groups = D.partition_by_group(sub.groups)
        if num_partitions > len(names):
            raise D.DataError(f"{num_partitions} clients but only {len(names)} speakers")
        idx = np.asarray(groups[partition_id])
        if sub.takes is not None:  # official split: takes 0-4 are the held-out test takes
            pers, ev = idx[sub.takes[idx] >= 5], idx[sub.takes[idx] < 5]
            return D.UserData(names[partition_id], sub.x[torch.as_tensor(pers)], sub.x[torch.as_tensor(ev)],
                              sub.y[torch.as_tensor(ev)])
        groups = [idx]
        partition_id = 0
    elif cfg["partitioning"] == "classes":
        groups = D.partition_class_subsets(sub.y.numpy(), num_partitions,
                                           (cfg["classes-min"], cfg["classes-max"]), cfg["seed"])
    else:
        groups = D.partition_dirichlet(sub.y.numpy(), num_partitions, cfg["dirichlet-alpha"], cfg["seed"])
    users = D.make_users(sub, groups, cfg["heldout-frac"], cfg["seed"] + partition_id)
    return users[partition_id]
