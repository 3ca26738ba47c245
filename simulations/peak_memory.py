"""Peak memory a method adds on top of the loaded model and data, measured in a spawned child."""
from __future__ import annotations

import copy
import ctypes
from pathlib import Path

import torch

from common.engine.prune import fine_prune
from common.model.train import time_inference, train_supervised
from common.settings import PruneConfig


def peak_mb(kind: str, base, x, y=None, cfg: PruneConfig | None = None) -> float | None:
    """Peak memory one method adds on top of the loaded model and data, in MB. It runs in a fresh
    (spawned) child process: forking a process whose torch thread pool has run deadlocks. The
    child returns free heap to the OS first, so reuse cannot hide growth, and resets the kernel's
    high-water mark (VmHWM) before the run."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_child, (kind, base, x, y, cfg, torch.get_num_threads()))


def _peak_child(kind, base, x, y, cfg, threads) -> float:
    torch.set_num_threads(threads)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = _status_kb("VmHWM")
    if kind == "inference":
        time_inference(base, x, repeats=1)
    elif kind == "prune":
        fine_prune(copy.deepcopy(base), x, cfg)
    else:  # one epoch of backprop
        train_supervised(copy.deepcopy(base), x, y, epochs=1, batch_size=32)
    return (_status_kb("VmHWM") - start) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


