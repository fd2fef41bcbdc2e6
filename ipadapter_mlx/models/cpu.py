"""Kernels for MLX's CPU backend where its own are slow: attention's softmax, SiLU, GELUs and GroupNorm.

MLX's CPU `exp` and `erf` are scalar and single-threaded (~16 ns and ~70 ns per float32 on an EPYC Zen 5): the
softmax of one 512x512 self-attention (16 x 4096 x 4096 scores) takes seconds, and the VAE's SiLUs a fifth of
its decode. numpy's `exp` is vectorised (AVX2 / AVX-512) and releases the GIL, so these run in numpy, in
cache-sized pieces, on every core. For attention the scores are computed by MLX's matrix product a block of
queries at a time (the whole score matrix is never held: 1 GiB at 512x512), exponentiated in place by numpy on
every core, and multiplied by V in MLX again. Exact to float32 rounding: the same max-shifted
softmax, its row sums taken over the same exponentials, applied to P @ V instead of P (one division per output
element instead of per score).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

BLOCK_SCORES = 1 << 25  # scores per query block (128 MiB in float32): measured best among 2**21..2**26 at
# SD's 4096-token self-attention (0.60 s at 2**22, 0.40 s here: fewer syncs, taller products)
MIN_SPLIT = 1 << 16  # below this many scores one thread is faster than handing out work
_pool: ThreadPoolExecutor | None = None


_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:  # one pool, even when two threads make their first call at once
        if _pool is None:
            # the cores this process may run on (taskset, a container's cpuset), not the machine's
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            _pool = ThreadPoolExecutor(max(1, min(cores, 16)), thread_name_prefix="ipadapter-softmax")
    return _pool


def _exp_shifted(rows: np.ndarray) -> np.ndarray:
    """In place: rows -> exp(rows - max(rows)); returns the row sums (kept 2-D for broadcasting)."""
    rows -= rows.max(axis=-1, keepdims=True)
    np.exp(rows, out=rows)
    return rows.sum(axis=-1, keepdims=True)


def softmax_numerator(scores: np.ndarray) -> np.ndarray:
    """In place over the last axis of a C-contiguous float32 array, split across the CPU's cores.
    Returns the row sums, shaped (..., 1)."""
    rows = scores.reshape(-1, scores.shape[-1])
    n = min(_workers()._max_workers, len(rows))
    if scores.size < MIN_SPLIT or n == 1:
        sums = _exp_shifted(rows)
    else:
        sums = np.concatenate(list(_workers().map(_exp_shifted, np.array_split(rows, n))))
    return sums.reshape(*scores.shape[:-1], 1)


_write_through: bool | None = None


def views_write_through() -> bool:
    """Whether numpy's view of an evaluated MLX array is that array's buffer (then the exponentials written into
    it are what MLX reads next, and the 4-byte-per-score copy back is skipped). Checked once."""
    global _write_through
    if _write_through is None:
        product, zeros = mx.ones((2, 2)) @ mx.ones((2, 2)), mx.zeros((2, 2))  # the scores, Winograd's buffers
        mx.eval(product, zeros)
        for a in (product, zeros):
            view = np.asarray(a)
            if view.flags.writeable and view.flags.c_contiguous:
                view[0, 0] = 5
        _write_through = product[0, 0].item() == 5 and zeros[0, 0].item() == 5 and zeros[1, 1].item() == 0
    return _write_through


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(scale * q k^T + mask) v over (N, L, d) float32 arrays, N = batch x heads; `mask` additive,
    (Lq, Lk). Evaluates as it goes."""
    N, Lq, _ = q.shape
    kt, q = k.swapaxes(-1, -2), q * scale
    mx.eval(q, kt, v)
    rows = max(1, min(Lq, BLOCK_SCORES // (N * k.shape[1])))
    out = []
    for start in range(0, Lq, rows):
        s = q[:, start : start + rows] @ kt
        if mask is not None:
            s = s + mask[start : start + rows].astype(mx.float32)
        mx.eval(s)
        scores = np.asarray(s)  # a view of MLX's buffer: exponentiated in place below
        sums = softmax_numerator(scores)
        p = s if views_write_through() else mx.array(scores)  # no copy where the view is the buffer
        o = (p @ v) * mx.array(1.0 / sums)
        mx.eval(o)  # frees this block's probabilities before the next is made
        out.append(o)
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=1)


CHUNK = 1 << 18  # elements per piece of an element-wise map or GroupNorm pass: measured best among 2**15..2**19


def pieces(rows: int, per_row: int = 1) -> list[tuple[int, int]]:
    """(first, end) row pieces of about CHUNK elements each, fewer where that would leave a many-core CPU under
    two pieces per core (at least 2**14 elements or one row)."""
    size = max(min(CHUNK, rows * per_row // (2 * _workers()._max_workers)), 1 << 14)
    step = max(1, size // per_row)
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _map(fn, x: mx.array) -> mx.array:
    """fn(in, out) over cache-sized pieces of x (evaluated, as float32), on every core; the result in x's dtype."""
    if x.size == 0:
        return x
    src = np.asarray(x.astype(mx.float32)).reshape(-1)  # evaluates x: a view of MLX's buffer, read only here
    out = np.empty_like(src)
    parts = [slice(i, j) for i, j in pieces(src.size)]

    def run(piece: slice) -> None:
        with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: x / inf = -0 is right
            fn(src[piece], out[piece])

    list(_workers().map(run, parts)) if len(parts) > 1 else run(parts[0])
    return mx.array(out).reshape(x.shape).astype(x.dtype)


def _silu(x: np.ndarray, out: np.ndarray) -> None:
    np.negative(x, out=out)
    np.exp(out, out=out)
    out += 1
    np.divide(x, out, out=out)


# erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): erf(z) = 1 - q for z >= 0, q = poly(t) exp(-z^2)
ERF_P = np.float32(0.3275911)
ERF_A = [np.float32(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]


def _gelu(x: np.ndarray, out: np.ndarray) -> None:
    """0.5 x (1 + erf(x / sqrt 2)), written as 0.5 x q for x < 0 and 0.5 x (2 - q) else: no cancellation."""
    a = np.abs(x) * np.float32(0.5**0.5)
    t = 1 / (1 + ERF_P * a)
    np.multiply(t, ERF_A[0], out=out)
    for c in ERF_A[1:]:
        out += c
        out *= t
    a *= a
    np.negative(a, out=a)
    np.exp(a, out=a)
    out *= a  # q
    np.subtract(2, out, out=out, where=x >= 0)
    out *= x
    out *= np.float32(0.5)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), as mlx.nn.silu."""
    return _map(_silu, x)


def _quick_gelu(x: np.ndarray, out: np.ndarray) -> None:
    np.multiply(x, np.float32(-1.702), out=out)
    np.exp(out, out=out)
    out += 1
    np.divide(x, out, out=out)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP text encoders."""
    return _map(_quick_gelu, x)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, as mlx.nn.gelu and torch's default; |error| <= 1e-7 |x|."""
    return _map(_gelu, x)


def geglu(x: mx.array) -> mx.array:
    """h * gelu(gate) for x = [h, gate] (its last axis in two halves), as diffusers' GEGLU: per piece of rows on
    every core, both halves read from x's own buffer and the result written into an MLX array's (where numpy's
    views write through), so neither half is copied out and no separate multiply runs."""
    inner = x.shape[-1] // 2
    src = np.asarray(x.astype(mx.float32)).reshape(-1, 2 * inner)  # evaluates x; read only here
    result, out = _written((src.shape[0], inner)) if views_write_through() else (None, np.empty_like(src[:, :inner]))

    def run(rows: tuple[int, int]) -> None:
        r = slice(*rows)
        with np.errstate(over="ignore"):
            _gelu(src[r, inner:], out[r])
        out[r] *= src[r, :inner]

    parts = pieces(src.shape[0], inner)
    list(_workers().map(run, parts)) if len(parts) > 1 else run(parts[0])
    result = mx.array(out) if result is None else result
    return result.reshape(*x.shape[:-1], inner).astype(x.dtype)


def group_norm(x: mx.array, groups: int, weight: mx.array, bias: mx.array, eps: float,
               then_silu: bool = False) -> mx.array:
    """PyTorch's GroupNorm over (B, ..., C), optionally followed by SiLU, in two passes on every core: channel
    sums and sums of squares per cache-sized piece (float32 inside a piece, float64 across pieces), then one
    multiply-add (+ SiLU) per element. MLX's reductions run on one core and sum a whole image's pixels in
    float32: 2x slower, and 4e-4 off torch at 512x512 where this is 2e-6 off."""
    B, C = x.shape[0], x.shape[-1]
    src = np.asarray(x.astype(mx.float32)).reshape(B, -1, C)  # evaluates x; read only here
    parts = [(b, slice(i, j)) for b in range(B) for i, j in pieces(src.shape[1], C)]

    def sums(piece):
        b, rs = piece
        block = src[b, rs]
        return b, block.sum(axis=0), (block * block).sum(axis=0)

    s1, s2 = np.zeros((B, C)), np.zeros((B, C))
    for b, total, squares in _workers().map(sums, parts):
        s1[b] += total
        s2[b] += squares
    n = src.shape[1] * (C // groups)
    mean = s1.reshape(B, groups, -1).sum(-1) / n
    var = np.maximum(s2.reshape(B, groups, -1).sum(-1) / n - mean * mean, 0)  # float64: no cancellation to fear
    scale = np.repeat(1 / np.sqrt(var + eps), C // groups, axis=1) * np.asarray(weight.astype(mx.float32))
    shift = (np.asarray(bias.astype(mx.float32)) - np.repeat(mean, C // groups, axis=1) * scale).astype(np.float32)
    scale = scale.astype(np.float32)
    out = np.empty_like(src)

    def normalise(piece):
        b, rs = piece
        o = out[b, rs]
        np.multiply(src[b, rs], scale[b], out=o)
        o += shift[b]
        if then_silu:  # o / (1 + exp(-o)), in place
            with np.errstate(over="ignore"):
                t = np.negative(o)
                np.exp(t, out=t)
                t += 1
                np.divide(o, t, out=o)

    list(_workers().map(normalise, parts))
    return mx.array(out).reshape(x.shape).astype(x.dtype)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 3x3 convolution's 2x2 output tile from its 4x4 input tile with 16
# products per channel pair instead of 36. The three transforms are additions in numpy on every core; the 16
# products are one batched MLX matrix product. Measured on SD's shapes (C >= 256, 32x32 and up): 0.6-0.85x the
# time of the direct products. Each transform is exact up to float32 rounding: the result is within 1e-6
# (relative) of the direct convolution.


def _transform_weights(w: np.ndarray, u: np.ndarray) -> None:
    """u[4a + b] = (G g G^T)[a, b] for w (O, 3, 3, C) into u (16, O, C), G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]."""
    def g(a0, a1, a2):
        return [a0, (a0 + a1 + a2) * np.float32(0.5), (a0 - a1 + a2) * np.float32(0.5), a2]

    def row(a: int, r: np.ndarray) -> None:
        for b, t in enumerate(g(r[:, 0], r[:, 1], r[:, 2])):
            u[4 * a + b] = t

    list(_workers().map(lambda ar: row(*ar), enumerate(g(w[:, 0], w[:, 1], w[:, 2]))))


def _written(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """An evaluated MLX float32 array and numpy's writable view of its buffer (views_write_through)."""
    a = mx.zeros(shape, mx.float32)
    mx.eval(a)
    return a, np.asarray(a)


WINOGRAD_BAND = 1 << 24  # elements of the transformed input (or output) per band of tile rows: measured best
# among 2**20..2**25 and unbanded (at 512x512x256 unbanded took 2.2x as long)


def conv3x3_winograd(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """A 3x3, stride 1, padding 1 convolution of float32 (B, H, W, C) input, H and W even; needs
    views_write_through(). Done in bands of tile rows: the transformed input and products of a band (4x its
    input and output) stay small and in cache. Infinite inputs give NaN where the direct convolution gives
    +-inf (the transforms subtract them); the pipeline refuses either (its NaN/Inf checks)."""
    B, H, W, C = x.shape
    O, Th, Tw = weight.shape[0], H // 2, W // 2
    xp = np.asarray(mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]))  # evaluates; read only here
    Um, u = _written((16, O, C))
    _transform_weights(np.asarray(weight.astype(mx.float32)), u)
    Ut = Um.swapaxes(1, 2)
    Ym, y = _written((B, Th, 2, Tw, 2, O))
    shift = np.zeros(O, np.float32) if bias is None else np.asarray(bias.astype(mx.float32))
    rows = max(1, WINOGRAD_BAND // (16 * Tw * max(C, O)))  # tile rows per band

    for b in range(B):
        for i0 in range(0, Th, rows):
            n = min(rows, Th - i0)
            Vm, v = _written((16, n, Tw, C))

            def inputs(piece):  # V = B^T d B per tile, rows then columns; B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
                j0, j1 = piece
                r = [xp[b, k + 2 * (i0 + j0) : k + 2 * (i0 + j1) : 2] for k in range(4)]  # input rows 2i + k
                for a, t in enumerate((r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])):
                    c = [t[:, k : k + 2 * Tw : 2] for k in range(4)]
                    np.subtract(c[0], c[2], out=v[4 * a, j0:j1])
                    np.add(c[1], c[2], out=v[4 * a + 1, j0:j1])
                    np.subtract(c[2], c[1], out=v[4 * a + 2, j0:j1])
                    np.subtract(c[1], c[3], out=v[4 * a + 3, j0:j1])

            with np.errstate(invalid="ignore", over="ignore"):  # inf inputs: NaN out, as documented, no warning
                list(_workers().map(inputs, pieces(n, 2 * (W + 2) * C)))
            M = Vm.reshape(16, n * Tw, C) @ Ut
            mx.eval(M)
            m = np.asarray(M).reshape(4, 4, n, Tw, O)

            def outputs(piece):  # Y = A^T M A per tile, A^T = [[1,1,1,0],[0,1,-1,-1]]
                j0, j1 = piece
                t = m[:, :, j0:j1]
                for p, s in enumerate(([t[0, k] + t[1, k] + t[2, k] for k in range(4)],
                                       [t[1, k] - t[2, k] - t[3, k] for k in range(4)])):
                    o = y[b, i0 + j0 : i0 + j1, p, :, 0]
                    np.add(s[0], s[1], out=o)
                    o += s[2]
                    o += shift
                    o = y[b, i0 + j0 : i0 + j1, p, :, 1]
                    np.subtract(s[1], s[2], out=o)
                    o -= s[3]
                    o += shift

            with np.errstate(invalid="ignore", over="ignore"):
                list(_workers().map(outputs, pieces(n, 4 * Tw * O)))
            del Vm, v, M, m  # before the next band's are made: two bands' buffers at most, never three
    return Ym.reshape(B, H, W, O)
