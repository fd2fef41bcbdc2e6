"""Linux: route MLX's matrix products to OpenBLAS, with kernels that fit the CPU, touching nothing else.

The `mlx[cpu]` wheel links the reference (netlib) BLAS, ~30x slower than OpenBLAS. MLX calls it through its
import table (the GOT slots of `cblas_sgemm`, `sgetrf_`, ...). We load OpenBLAS privately (RTLD_LOCAL) and
write its functions' addresses into those slots of `libmlx.so` alone. Loading it globally instead would
also rebind torch's own `sgemm_` (and any other library's) to it in the same process: that made torch 3.5x
slower on an Intel machine. A small product is checked against numpy once; if it is wrong, the slots are
put back and MLX keeps the reference BLAS.

OpenBLAS 0.3.21 (Debian 12) does not know recent CPUs and falls back to its SSE3 `Prescott` kernels (27
against 226 GFLOP/s on a Sapphire Rapids VM). Unless `OPENBLAS_CORETYPE` is set (the user's choice wins),
the core matching the CPU's flags is chosen before OpenBLAS initialises. `IPADAPTER_MLX_BLAS=reference`
turns all of this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("libopenblas.so.0", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
              "/usr/lib/aarch64-linux-gnu/libopenblas.so.0", "/usr/lib64/libopenblas.so.0")
# OpenBLAS cores with no AVX: what it falls back to on a CPU it does not recognise
SSE_CORES = {"prescott", "katmai", "coppermine", "northwood", "banias", "core2", "penryn", "dunnington",
             "nehalem", "atom", "opteron", "opteron_sse3", "barcelona", "bobcat", "unknown"}
BLAS_NAME = re.compile(r"^(cblas_\w+|[sdcz][a-z0-9]+_)$")  # the BLAS/LAPACK entry points MLX imports


@dataclass
class BlasState:
    """What MLX's CPU matrix products run on in this process (`generate --verbose` and `bench` print it)."""

    library: str = "reference BLAS"
    core: str | None = None
    cpu_core: str | None = None  # the OpenBLAS core this CPU's flags call for
    note: str | None = None  # why OpenBLAS is not in use, or a warning about its kernels

    def describe(self) -> str:
        core = f", {self.core} kernels" if self.core else ""
        return f"{self.library}{core}" + (f" ({self.note})" if self.note else "")

    @property
    def generic(self) -> bool:
        """OpenBLAS runs SSE-only kernels on a CPU that has AVX2 or AVX-512."""
        return bool(self.core and self.cpu_core and self.core.lower() in SSE_CORES)


state = BlasState()


def cpu_core(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS core type for this x86 CPU's flags (None where the flags say nothing better than SSE)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    line = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        # Sapphire Rapids too: Debian 12's OpenBLAS (0.3.21) has no such core; its float32 kernels are SkylakeX's
        return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return "Sandybridge" if "avx" in flags else None


# OpenBLAS's worker threads spin after each product (2**28 cycles, ~0.1 s, by default) before sleeping: here the
# products alternate with numpy kernels on every core (cpu.py), which the spinning threads slow. 2**4 cycles:
# a UNet step at 256x256 2-3 % faster on the 2-core EPYC (measured), more where more threads would spin.
THREAD_TIMEOUT = "4"


def _open_openblas(core: str | None) -> tuple[ctypes.CDLL, str] | None:
    """Load OpenBLAS privately; `core` sets OPENBLAS_CORETYPE, and THREAD_TIMEOUT OPENBLAS_THREAD_TIMEOUT, while it
    initialises, each unless the user set it (then the variables are restored, so numpy's own OpenBLAS, loaded
    later, and child processes are not affected)."""
    settings = {"OPENBLAS_CORETYPE": core, "OPENBLAS_THREAD_TIMEOUT": THREAD_TIMEOUT}
    ours = [k for k, v in settings.items() if v and k not in os.environ]
    for k in ours:
        os.environ[k] = settings[k]
    try:
        for name in (ctypes.util.find_library("openblas"), *CANDIDATES):
            if not name:
                continue
            try:
                return ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL), name
            except OSError:
                continue
        return None
    finally:
        for k in ours:
            del os.environ[k]


# -- the import table of libmlx.so -------------------------------------------------------------------------

GOT_RELOCATIONS = {62: (6, 7), 183: (1025, 1026)}  # e_machine: (GLOB_DAT, JUMP_SLOT) on x86-64 and aarch64


def import_slots(path: str) -> dict[str, int]:
    """{symbol: offset of its GOT slot} for the BLAS/LAPACK functions the shared library `path` imports."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}  # only 64-bit little-endian ELF
    machine, = struct.unpack_from("<H", data, 18)
    if machine not in GOT_RELOCATIONS:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    slots = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 4 or not entsize:  # SHT_RELA
            continue
        symtab, strtab = sections[link], sections[sections[link][6]]
        for r in range(size // entsize):
            r_offset, r_info = struct.unpack_from("<QQ", data, offset + r * entsize)
            if r_info & 0xFFFFFFFF not in GOT_RELOCATIONS[machine]:
                continue
            st_name, = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * symtab[9])
            start = strtab[4] + st_name
            name = data[start : data.index(b"\0", start)].decode()
            if BLAS_NAME.match(name):
                slots[name] = r_offset
    return slots


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def _libdl() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "dlinfo") else ctypes.CDLL("libdl.so.2")  # glibc < 2.34 keeps them in libdl


def _load_base(lib: ctypes.CDLL) -> int:
    """The address libmlx.so is loaded at (link_map.l_addr, via dlinfo)."""
    link_map = ctypes.c_void_p()
    dl = _libdl()
    if dl.dlinfo(ctypes.c_void_p(lib._handle), 2, ctypes.byref(link_map)) != 0:  # RTLD_DI_LINKMAP
        raise OSError("dlinfo failed")
    return ctypes.c_size_t.from_address(link_map.value).value


def _object_base(address: int) -> int | None:
    """The load address of the shared object that holds `address` (dladdr)."""
    info = _DlInfo()
    return info.dli_fbase if _libdl().dladdr(ctypes.c_void_p(address), ctypes.byref(info)) else None


def _writable_slots(addresses: list[int]):
    """Make the pages holding these slots writable for a moment (under full RELRO they are read-only)."""
    page = os.sysconf("SC_PAGE_SIZE")
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split("-"))
        maps.append((lo, hi, perms))
    pages = {a - a % page for a in addresses}
    readonly = [p for p in pages if any(lo <= p < hi and "w" not in perms for lo, hi, perms in maps)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for p in readonly:
        if libc.mprotect(p, page, 3) != 0:  # PROT_READ | PROT_WRITE
            raise OSError(ctypes.get_errno(), "mprotect failed")
    return lambda: [libc.mprotect(p, page, 1) for p in readonly]  # back to PROT_READ


def _write_slots(values: dict[int, int]) -> dict[int, int]:
    """Write {slot address: function address}; returns the previous values."""
    restore = _writable_slots(list(values))
    try:
        old = {a: ctypes.c_void_p.from_address(a).value or 0 for a in values}
        for a, v in values.items():
            ctypes.c_void_p.from_address(a).value = v
        return old
    finally:
        restore()


def _mlx_library() -> tuple[str, int, int] | None:
    """The path of the libmlx.so this process loaded (mlx.core must be imported) and its address range."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith("/libmlx.so"):
            spans.append((parts[5], *(int(x, 16) for x in parts[0].split("-"))))
    return (spans[0][0], min(s[1] for s in spans), max(s[2] for s in spans)) if spans else None


def products_agree() -> bool:
    """MLX's CPU matrix products (BLAS and LAPACK) against numpy in float64, on small odd shapes."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((67, 45)).astype(np.float32), rng.standard_normal((45, 33)).astype(np.float32)
    m = (rng.standard_normal((5, 5)) + 5 * np.eye(5)).astype(np.float32)
    with mx.stream(mx.cpu):
        prod = np.array(mx.matmul(mx.array(a), mx.array(b)))
        prod_t = np.array(mx.matmul(mx.array(b).T, mx.array(a).T))
        inv = np.array(mx.linalg.inv(mx.array(m)))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return bool(np.allclose(prod, ref, atol=1e-4, rtol=1e-4) and np.allclose(prod_t, ref.T, atol=1e-4, rtol=1e-4)
                and np.allclose(inv, np.linalg.inv(m.astype(np.float64)), atol=1e-4, rtol=1e-4))


def route_mlx_blas() -> BlasState:
    """Point MLX's BLAS/LAPACK imports at a privately loaded OpenBLAS (Linux). Safe to call again."""
    global state
    if sys.platform != "linux" or state.library != "reference BLAS" or state.note:
        return state
    if os.environ.get("IPADAPTER_MLX_BLAS") == "reference":
        state = BlasState(note="IPADAPTER_MLX_BLAS=reference")
        return state
    import mlx.core  # noqa: F401  (loads libmlx.so)

    want = cpu_core()
    opened = _open_openblas(want)
    mlx_lib = _mlx_library()
    if opened is None or mlx_lib is None:
        state = BlasState(cpu_core=want, note="OpenBLAS not found" if opened is None else "libmlx.so not found")
        return state
    openblas, name = opened
    (mlx_path, lo, hi) = mlx_lib
    try:
        base = _load_base(ctypes.CDLL(mlx_path))
        home = _object_base(ctypes.cast(openblas.openblas_get_corename, ctypes.c_void_p).value)
        new = {}
        for symbol, offset in import_slots(mlx_path).items():
            # dlsym also finds names in OpenBLAS's own dependencies (libc, libgfortran): keep OpenBLAS's own
            address = ctypes.cast(getattr(openblas, symbol), ctypes.c_void_p).value if hasattr(openblas, symbol) else 0
            if address and _object_base(address) == home and lo <= base + offset < hi:
                new[base + offset] = address
        if not new:
            raise OSError("no BLAS import found in libmlx.so")
        old = _write_slots(new)
    except Exception as e:  # an unexpected library layout: MLX keeps its reference BLAS, nothing was written
        state = BlasState(cpu_core=want, note=f"could not route MLX to OpenBLAS: {type(e).__name__}: {e}")
        return state
    try:
        openblas.openblas_get_corename.restype = ctypes.c_char_p
        core = openblas.openblas_get_corename().decode()
        agree = products_agree()
    except Exception:
        agree, core = False, "unknown"
    if not agree:
        _write_slots(old)
        state = BlasState(cpu_core=want, note=f"OpenBLAS ({core} kernels) gave wrong products on this CPU: "
                                              "MLX keeps the reference BLAS")
        return state
    state = BlasState(f"OpenBLAS ({Path(name).name})", core, want)
    if want and core.lower() != want.lower() and os.environ.get("OPENBLAS_CORETYPE") is None:
        state.note = (f"OpenBLAS runs {core} kernels where {want} fits this CPU: it was loaded before "
                      f"ipadapter_mlx; set OPENBLAS_CORETYPE={want} before starting")
    if state.generic:
        state.note = (f"generic SSE kernels on a CPU with {want}-class instructions: set "
                      f"OPENBLAS_CORETYPE={want} for several times faster matrix products")
    return state


def slow_blas_warning() -> str | None:
    """One line for the CLI when MLX on Linux runs on the reference BLAS or OpenBLAS's generic kernels."""
    if sys.platform != "linux":
        return None
    if state.generic:
        return f"note: OpenBLAS runs its {state.core} kernels: {state.note}"
    if state.library == "reference BLAS" and state.note == "OpenBLAS not found":
        return ("note: MLX is using the slow reference BLAS; install OpenBLAS for ~30x faster CPU runs "
                "(Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    if state.library == "reference BLAS" and state.note != "IPADAPTER_MLX_BLAS=reference":
        return f"note: MLX is using the slow reference BLAS: {state.note}"
    return None
