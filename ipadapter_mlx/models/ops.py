"""Layers whose CPU path differs from MLX's own: GroupNorm, SiLU/GELUs and 3x3 convolutions (Conv2d).

MLX's GroupNorm reduces over strided group axes, ~35 ns per element on the CPU (16x PyTorch). Here the
per-channel sums are contiguous reductions, groups are summed from them, and the normalisation is one
multiply-add: 2.7x faster, and closer to a float64 reference than MLX's own (max error 3e-5 against 2e-4).
On the CPU, large inputs go to numpy on every core instead (`cpu.group_norm`, fused with the SiLU that
follows every resnet's norm): 2x faster again, as fast as PyTorch's.
(A faster `exp` was tried the same way, from polynomials fused by mx.compile: no faster than MLX's. SiLU and
GELU therefore run in numpy on the CPU: `cpu.silu` / `cpu.gelu`.)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cpu


class GroupNorm(nn.Module):
    """PyTorch's GroupNorm (same parameters: weight, bias) over (B, ..., C) input."""

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array, then_silu: bool = False) -> mx.array:
        """`then_silu`: SiLU of the result (every resnet's norm is followed by one), fused on the CPU."""
        if mx.default_device() == mx.cpu and x.size >= cpu.MIN_SPLIT:
            return cpu.group_norm(x, self.groups, self.weight, self.bias, self.eps, then_silu)
        y = self._mlx(x)
        return nn.silu(y) if then_silu else y

    def _mlx(self, x: mx.array) -> mx.array:
        B, C, g = x.shape[0], x.shape[-1], self.groups
        flat = x.reshape(B, -1, C).astype(mx.float32)
        n = flat.shape[1] * (C // g)

        def per_channel(group_values: mx.array) -> mx.array:
            return mx.repeat(group_values, C // g, axis=1)[:, None, :]

        mean = flat.sum(axis=1).reshape(B, g, -1).sum(-1) / n
        d = flat - per_channel(mean)
        var = (d * d).sum(axis=1).reshape(B, g, -1).sum(-1) / n
        scale = per_channel(mx.rsqrt(var + self.eps)) * self.weight.astype(mx.float32)
        return (d * scale + self.bias.astype(mx.float32)).astype(x.dtype).reshape(x.shape)


WINOGRAD_MIN_PIXELS = 32 * 32  # below this the per-call weight transform costs more than the products save
WINOGRAD_MIN_CHANNELS = 256  # narrower inputs: the transforms' memory traffic outweighs the products (measured)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and numbers) that picks a faster way on the CPU for 3x3, stride 1, padding 1
    convolutions: Winograd F(2x2, 3x3) (`cpu.conv3x3_winograd`) for wide float32 inputs of even size, else MLX's
    own, or with `eager` (the VAE) the nine accumulated products of `conv3x3_taps`.

    `eager`: compute each result right away. MLX's CPU backend keeps several operations in flight, and each 3x3
    convolution holds an unfolded copy of its input (9x its size) until it is done: at the VAE's full-resolution
    levels that dominates memory. Evaluating each convolution as it comes halves the decoder's peak (measured:
    240 -> 116 bytes per pixel per channel); the taps skip the copy altogether."""

    eager = False

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        plain = (self.stride == (1, 1) and self.dilation in (1, (1, 1)) and self.groups == 1
                 and self.weight.shape[1:3] == (3, 3) and self.padding == (1, 1))
        if plain and winograd_fits(x, self.weight):
            y = cpu.conv3x3_winograd(x, self.weight, self.get("bias"))
        elif plain and self.eager:
            y = conv3x3_taps(x, self.weight, self.get("bias"))
        else:
            y = super().__call__(x)
        if self.eager:
            mx.eval(y)
        return y


class EagerConv2d(Conv2d):
    """Conv2d evaluated as it comes (the VAE: see Conv2d)."""

    eager = True


def winograd_fits(x: mx.array, weight: mx.array) -> bool:
    """Whether a 3x3 convolution of x takes the Winograd path on the CPU (a channel mismatch is left to MLX's
    convolution, which says so)."""
    B, H, W, C = x.shape
    return (x.dtype == mx.float32 and H % 2 == 0 and W % 2 == 0 and H * W >= WINOGRAD_MIN_PIXELS
            and C >= WINOGRAD_MIN_CHANNELS and C == weight.shape[-1] and cpu.views_write_through())


def silu(x: mx.array) -> mx.array:
    """nn.silu; on the CPU, above a few thousand elements, numpy's vectorised exp on every core (7-20x faster)."""
    if mx.default_device() == mx.cpu and x.size >= cpu.MIN_SPLIT:
        return cpu.silu(x)
    return nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    """nn.gelu (exact, erf); on the CPU, above a few thousand elements, numpy on every core (5x faster)."""
    if mx.default_device() == mx.cpu and x.size >= cpu.MIN_SPLIT:
        return cpu.gelu(x)
    return nn.gelu(x)


def geglu(x: mx.array) -> mx.array:
    """h * gelu(gate) for x = [h, gate] along the last axis (diffusers' GEGLU after its projection); on the CPU,
    above a few thousand elements, one numpy pass per piece on every core (cpu.geglu)."""
    if mx.default_device() == mx.cpu and x.size >= 2 * cpu.MIN_SPLIT:
        return cpu.geglu(x)
    h, gate = mx.split(x, 2, axis=-1)
    return h * nn.gelu(gate)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x) (CLIP's text encoders); on the CPU, above a few thousand elements, numpy on every core."""
    if mx.default_device() == mx.cpu and x.size >= cpu.MIN_SPLIT:
        return cpu.quick_gelu(x)
    return x * mx.sigmoid(1.702 * x)


def conv3x3_taps(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """A 3x3, stride 1, padding 1 convolution as nine matrix products accumulated in place (addmm), one per tap,
    each reading a contiguous slice of the padded input flattened row by row. MLX's CPU convolution instead
    copies its input 9x (im2col) before one product: at the VAE's wide, shallow levels that copy costs a third
    of the time and most of the memory. Each output row gets 2 junk columns (the padded width), cut at the end."""
    B, H, W, C = x.shape
    O, Wp = weight.shape[0], W + 2
    rows = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(B, -1, C)  # a 3rd pad row: the last slice fits
    taps = weight.transpose(1, 2, 3, 0)  # (3, 3, C, O)
    out = mx.zeros((O,), x.dtype) if bias is None else bias
    for dy in range(3):
        for dx in range(3):
            start = dy * Wp + dx
            out = mx.addmm(out, rows[:, start : start + H * Wp], taps[dy, dx])
    return out.reshape(B, H, Wp, O)[:, :, :W]
