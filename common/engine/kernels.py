"""One fused GPU reduction for the output statistics: a single read of an activation laid out as
rows of channels gives each channel's sum of positive values and count of positive values. Which
activations are such rows, and the view as rows, live here too (the CPU's hooks read the same
rows a piece at a time).

In PyTorch the output hook takes four passes over every BatchNorm output (the positive part
written out, its sum, the comparison written out, its count), and its reductions over (N, H, W)
of a channels_last tensor were slow besides; this kernel reads it once, with no full-size
temporaries (docs/engine_cost.md: the measurements). Triton, where it is installed (it comes with
PyTorch's CUDA wheels); elsewhere the hook keeps PyTorch's reductions. The first use on a
machine compiles the kernel (seconds); Triton's disk cache serves later processes."""
from __future__ import annotations

import warnings

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # not installed (CPU-only PyTorch) or unusable here: PyTorch's reductions
    triton = None

_BLOCK_R = 64    # rows per tile
_BLOCK_C = 64    # channels per tile: 64 float32 = 256 contiguous bytes per row
_TILES = 16      # tiles per program: 1,024 rows (ResNet50's 64 x 112 x 112 map: 784 programs)

if triton is not None:
    @triton.jit
    def _positive_sum_count(y_ptr, sum_ptr, cnt_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            TILES: tl.constexpr):
        # program (pr, pc): TILES tiles of rows from pr * TILES * BLOCK_R on, channel block pc;
        # each writes its own partial sums (no atomics: the same input gives the same bits). The
        # loop's bound is a compile-time constant: one compiled kernel for every shape
        pr = tl.program_id(0)
        pc = tl.program_id(1)
        cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc_s = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_n = tl.zeros([BLOCK_C], dtype=tl.int32)
        start = pr * (TILES * BLOCK_R)
        for i in tl.static_range(TILES):
            rows = start + i * BLOCK_R + tl.arange(0, BLOCK_R)
            m = (rows[:, None] < R) & cmask[None, :]
            v = tl.load(y_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0.0)
            pos = v > 0
            acc_s += tl.sum(tl.where(pos, v, 0.0), axis=0)
            acc_n += tl.sum(pos.to(tl.int32), axis=0)
        tl.store(sum_ptr + pr * C + cols, acc_s, mask=cmask)
        tl.store(cnt_ptr + pr * C + cols, acc_n, mask=cmask)


def positive_sum_count(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an (R, C) float32 tensor stored row after row: per channel, the sum of its positive
    values (float64; float32 within each program's 1,024 rows) and how many are positive
    (int64). Runs the Triton kernel (interpreted on the CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("positive_sum_count needs Triton")
    if rows.dim() != 2 or rows.dtype != torch.float32 or not rows.is_contiguous():
        raise ValueError("positive_sum_count takes a contiguous (rows, channels) float32 tensor")
    r, c = rows.shape
    row_progs, col_blocks = triton.cdiv(r, _TILES * _BLOCK_R), triton.cdiv(c, _BLOCK_C)
    sums = torch.empty((row_progs, c), dtype=torch.float32, device=rows.device)
    counts = torch.empty((row_progs, c), dtype=torch.int32, device=rows.device)
    _positive_sum_count[(row_progs, col_blocks)](rows, sums, counts, r, c, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
                                                  TILES=_TILES)
    return sums.sum(0, dtype=torch.float64), counts.sum(0)


def is_nhwc(t: torch.Tensor) -> bool:
    """An (N, C, H, W) tensor laid out channels_last (and not also plain contiguous): its memory
    is rows (sample, position) of its channels."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as its (N*H*W, C) rows: a view, no copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def fusable(y: torch.Tensor) -> torch.Tensor | None:
    """y as (rows, channels) for positive_sum_count where the fused kernel applies (a float32
    CUDA tensor in channels_last, Triton installed and working), else None."""
    if triton is None or _failed or not y.is_cuda or y.dtype != torch.float32 or not is_nhwc(y):
        return None
    return as_rows(y)


_failed: list = []  # the error, once the kernel could not be compiled or run in this process


def positive_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """positive_sum_count of y's channels where the fused kernel applies, else None (the caller
    reduces with PyTorch). A kernel that cannot be built here (Triton needs a working CUDA
    toolchain at run time) is reported once and not tried again in this process."""
    rows = fusable(y)
    if rows is None:
        return None
    try:
        return positive_sum_count(rows)
    except Exception as exc:  # compilation or launch: the statistics still come, from PyTorch
        _failed.append(exc)
        warnings.warn(f"fused output statistics unavailable on this GPU ({type(exc).__name__}: {exc}); "
                      f"using PyTorch's reductions", stacklevel=2)
        return None
