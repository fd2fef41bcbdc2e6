"""Linux (glibc), MLX's CPU backend: large buffers reused from the heap instead of freshly mapped each time.

MLX's CPU allocator is plain malloc, and glibc serves every block above its mmap threshold (32 MiB at most)
with a new mmap, unmapped again on free: each 64 MiB activation of the VAE at 256x256 is faulted in page by
page, every time (measured on a 2-core EPYC: `x + 1` over 64 MiB 35 ms, over 31 MiB 1.8 ms; 1.9 against
20 GB/s). With malloc's mmap off and a high trim threshold, freed blocks stay in the heap and are reused: the
VAE decode at 256x256 went from 2.80 to 2.15 s. Memory freed stays with the process (as MLX's GPU buffer cache
does) until `release()`, which the pipeline calls where it clears MLX's cache. It changes malloc for the whole
process (torch's large tensors come from the heap too, which is faster, not slower).
`IPADAPTER_MLX_MALLOC=system` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the heap's top before glibc gives them back (mallopt takes an int)

state = "system malloc"  # what `bench` and `generate --verbose` report


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has neither
    except OSError:
        return None


def keep_large_buffers() -> str:
    """On glibc with MLX's CPU backend: large blocks from the heap, reused. Safe to call again."""
    global state
    import mlx.core as mx

    if os.environ.get("IPADAPTER_MLX_MALLOC") == "system" or mx.default_device() != mx.cpu:
        return state
    libc = _libc()
    if libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
        state = "heap malloc (large buffers reused)"
    return state


def release() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim)."""
    if state != "system malloc":
        _libc().malloc_trim(0)
