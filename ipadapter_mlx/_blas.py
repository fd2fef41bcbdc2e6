"""Linux: route MLX's matrix products to OpenBLAS when it is installed.

The `mlx[cpu]` wheel links the reference (netlib) BLAS, ~30x slower than OpenBLAS. Loading OpenBLAS with
RTLD_GLOBAL before MLX itself is loaded makes the dynamic linker resolve MLX's BLAS calls to it. This must run
before `mlx.core` is imported, so the package does it first thing. IPADAPTER_MLX_BLAS=reference turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = ("libopenblas.so.0", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
              "/usr/lib/aarch64-linux-gnu/libopenblas.so.0", "/usr/lib64/libopenblas.so.0")
loaded: str | None = None


def preload_openblas() -> str | None:
    global loaded
    if sys.platform != "linux" or os.environ.get("IPADAPTER_MLX_BLAS") == "reference" or "mlx.core" in sys.modules:
        return loaded
    for name in (ctypes.util.find_library("openblas"), *CANDIDATES):
        if not name:
            continue
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return name
    return None


def slow_blas_warning() -> str | None:
    """One line for the CLI when MLX on Linux runs on the reference BLAS."""
    from .bench import blas_in_use

    if sys.platform == "linux" and blas_in_use().startswith("reference"):
        return ("note: MLX is using the slow reference BLAS; install OpenBLAS for ~30x faster CPU runs "
                "(Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    return None
