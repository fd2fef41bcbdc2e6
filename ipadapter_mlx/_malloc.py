"""Linux (glibc), MLX's CPU backend: large buffers reused from the heap instead of freshly mapped each time.

MLX's CPU allocator is plain malloc, and glibc serves every block above its mmap threshold (32 MiB at most)
with a new mmap, unmapped again on free: each 64 MiB activation of the VAE at 256x256 is faulted in page by
page, every time (measured on a 2-core EPYC: `x + 1` over 64 MiB 35 ms, over 31 MiB 1.8 ms; 1.9 against
20 GB/s). With malloc's mmap off, one arena for all threads (a thread's own arena would map large blocks
anyway) and a high trim threshold, freed blocks stay in the heap and are reused: the VAE decode at 256x256 went
from 2.80 to 2.15 s. Memory freed stays with the process until `release()` (pipeline.release_memory: at the
end of `generate` and of each `batch` job, in low-memory mode before the UNet). It changes malloc for the whole
process (other libraries' large allocations are reused too: faster, not slower). Nothing is changed where another
allocator (jemalloc, tcmalloc) replaces glibc's malloc. `IPADAPTER_MLX_MALLOC=system` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the heap's top before glibc gives them back (mallopt takes an int)
SYSTEM = "system malloc"

state = SYSTEM  # what `bench` and `generate --verbose` report


def _glibc() -> ctypes.CDLL | None:
    """glibc, when it is also the malloc in use (not musl, not an interposed allocator)."""
    if sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION"):
        return None
    try:
        libc, process = ctypes.CDLL("libc.so.6"), ctypes.CDLL(None)
    except OSError:
        return None
    address = lambda lib: ctypes.cast(lib.malloc, ctypes.c_void_p).value  # noqa: E731
    return libc if address(libc) == address(process) else None


def keep_large_buffers() -> str:
    """On glibc with MLX's CPU backend: large blocks from the heap, reused. Safe to call again."""
    global state
    import mlx.core as mx

    if state != SYSTEM or os.environ.get("IPADAPTER_MLX_MALLOC") == "system" or mx.default_device() != mx.cpu:
        return state
    libc = _glibc()
    if libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1:  # the one that matters; the others help it
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        state = "heap malloc (large buffers reused)"
    return state


def release() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim)."""
    if state != SYSTEM:
        _glibc().malloc_trim(0)
