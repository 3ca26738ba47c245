"""Running a model over inputs in batches, forward only: the batch order (a probe's samples first
where asked), batches on a GPU copied without the host waiting, logits back in the order of the
inputs, and which device runs. The engine's passes build on it; so do training and inference."""
from __future__ import annotations

import torch
import torch.nn as nn

from common.settings import BY_NAME

BATCH_SIZE = BY_NAME["batch-size"].default  # where a caller passes no run's batch size


def _first_order(n: int, first: torch.Tensor) -> torch.Tensor:
    """Sample order of a pass that takes `first` first: those indices, then the rest in order."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[first] = False
    return torch.cat([first, torch.nonzero(rest).flatten()])


def _selections(n: int, batch_size: int, first: torch.Tensor | None = None):
    """What each batch takes of n samples: slices in order; with `first` (sample indices), those
    samples come first, in batches of their own, then the rest in order (index tensors)."""
    if first is None:
        for i in range(0, n, batch_size):
            yield slice(i, i + batch_size)
        return
    order = _first_order(n, first)
    for part in (order[:len(first)], order[len(first):]):
        for i in range(0, len(part), batch_size):
            yield part[i:i + batch_size]


def batches(x: torch.Tensor, batch_size: int, first: torch.Tensor | None = None):
    """x in batches of `batch_size`; with `first` (sample indices), those samples come first, in
    batches of their own, then the rest in order."""
    for sel in _selections(len(x), batch_size, first):
        yield x[sel]


# A GPU pass keeps the host at most this many batches ahead of the model: enough for the host
# to gather and copy the next batch while the GPU runs the queued ones, with the batches' memory
# bounded at a few however large the user's data is (docs/engine_cost.md: the measurements)
_IN_FLIGHT = 3


def _copy_stream(device) -> torch.cuda.Stream:
    """The side stream a device's batches are copied on, one per device for the process."""
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _COPY_STREAMS:
        _COPY_STREAMS[idx] = torch.cuda.Stream(idx)
    return _COPY_STREAMS[idx]


_COPY_STREAMS: dict = {}


def device_batches(x: torch.Tensor, batch_size: int, device: str, first: torch.Tensor | None = None):
    """batches(x, ...) on `device`. To a GPU from the CPU each batch is gathered straight into
    pinned memory and copied without the host waiting (a pageable copy blocks the host for the
    whole transfer, the GPU idle meanwhile), on a side stream, so the next batch crosses while
    the model runs on this one (docs/engine_cost.md: what each of these saved)."""
    if not str(device).startswith("cuda") or x.is_cuda:
        for b in batches(x, batch_size, first):
            yield b.to(device)
        return
    compute = torch.cuda.current_stream(device)
    side = _copy_stream(device)
    queued = []  # per batch handed out: an event on the compute stream after the work queued for it
    for sel in _selections(len(x), batch_size, first):
        if len(queued) >= _IN_FLIGHT:
            # the host stays at most _IN_FLIGHT batches ahead of the model: the batches' memory on
            # the GPU and in pinned memory stays bounded (the caching host allocator itself
            # reuses a pinned buffer only once its copy has finished)
            queued.pop(0).synchronize()
        if isinstance(sel, slice):  # a view of x: one copy into pinned memory
            part = x[sel]
            pinned = torch.empty(part.shape, dtype=x.dtype, pin_memory=True)
            pinned.copy_(part)
        else:  # probe-first order: gathered straight into pinned memory
            pinned = torch.empty((len(sel), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
            torch.index_select(x, 0, sel, out=pinned)
        # the model waits for the copy; the copy waits for nothing the model does (its memory
        # comes from the side stream's own blocks, each reused only after record_stream's uses)
        with torch.cuda.stream(side):
            b = pinned.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        compute.wait_event(copied)
        b.record_stream(compute)  # used on the compute stream: its memory is not reused before that is done
        yield b
        mark = torch.cuda.Event()
        mark.record(compute)  # the caller asks for the next batch: this one's work is queued
        queued.append(mark)


def unorder(logits: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """Logits of a pass that took `first` first, back in the order of x."""
    if first is None:
        return logits
    out = torch.empty_like(logits)
    out[_first_order(len(logits), first)] = logits
    return out


def pass_logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: str, first) -> torch.Tensor:
    # the logits stay on the device until the pass ends: one copy back, not a host sync per batch
    return torch.cat([model(b) for b in device_batches(x, batch_size, device, first)]).float().cpu()


def run_logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
               first: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of x in the model's current mode, on the CPU, in the order of x."""
    return unorder(pass_logits(model, x, batch_size, device, first), first)


@torch.no_grad()
def batched_forward(model: nn.Module, x: torch.Tensor, batch_size: int = BATCH_SIZE, device: str = "cpu"):
    """Logits of x in eval mode."""
    model.eval()
    return run_logits(model, x, batch_size, device)



def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{name}' (choose from: auto, cpu, cuda)")
    return name
