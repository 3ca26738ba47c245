"""Where freed memory goes between passes on the CPU. glibc's malloc serves every block above its
mmap threshold (at most 32 MB: most of a ResNet's activations over 64 images) with a fresh mmap
and unmaps it on free, so every pass faults its activations in page by page, and the kernel
zeroes each page first. Measured on this CPU (1 thread), ResNet50 over 64 images at 224: 2.44 M
minor page faults and 3.7 s of kernel time per inference pass, 7.0 s in all; with freed memory
kept in the process (no mmap, no trimming) the next pass reuses the pages: no faults, 3.4 s.
The price is memory: the process holds what it freed until it exits, and blocks that cannot be
reused pile up before they can (ResNet50, 64 images: 2.7 GB resident against a 1.6 GB peak; ResNet18
1.44 GB against 1.25 GB), which an edge device may not have. So it is asked for, never assumed: a
process-wide choice, like torch's thread count (`fineprune --memory keep`, a device's node config
`memory='keep'` for its ClientApp); 'release', the C library's own behaviour, is the default."""
from __future__ import annotations

import ctypes

CHOICES = ("release", "keep")
# glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# glibc's defaults, for 'release' after 'keep' in one process: blocks from 128 KB up are mmapped,
# and free memory above 128 KB at the top of the heap goes back to the system
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM = 65536, 128 * 1024
_in_force = "release"  # until a command chooses: the C library's own behaviour


def _mallopt():
    """glibc's mallopt, or None where the C library has none (macOS, Windows) or a stub (musl)."""
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None


def set_memory(policy: str) -> str:
    """'keep': freed memory stays in the process for the next pass (glibc only); 'release': the
    C library's default. Returns the policy in force."""
    global _in_force
    if policy not in CHOICES:
        raise ValueError(f"--memory must be one of {', '.join(CHOICES)}, got '{policy}'")
    fn = _mallopt()
    if policy == "release":
        # only to undo 'keep': setting them at all ends glibc's own adjustment of its mmap threshold
        if _in_force == "keep" and fn is not None:
            fn(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            fn(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        _in_force = "release"
        return _in_force
    # mallopt answers 1 where it took the value; musl's stub answers 0
    if fn is not None and fn(_M_MMAP_MAX, 0) == 1 and fn(_M_TRIM_THRESHOLD, -1) == 1:  # -1: never trim
        _in_force = "keep"
        return _in_force
    raise ValueError("memory 'keep' needs glibc's malloc (Linux); this C library cannot be told to keep freed "
                     "memory (use 'release')")


def in_force() -> str:
    """The policy this process runs under: 'keep' or 'release'."""
    return _in_force
