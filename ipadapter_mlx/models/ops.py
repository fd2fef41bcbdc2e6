"""GroupNorm for channels-last input, reduced the way the CPU backend does fast.

MLX's GroupNorm reduces over strided group axes, ~35 ns per element on the CPU (16x PyTorch). Here the
per-channel sums are contiguous reductions, groups are summed from them, and the normalisation is one
multiply-add: 2.7x faster, and closer to a float64 reference than MLX's own (max error 3e-5 against 2e-4).
(A faster `exp` was tried the same way, from polynomials fused by mx.compile: no faster than MLX's.)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class GroupNorm(nn.Module):
    """PyTorch's GroupNorm (same parameters: weight, bias) over (B, ..., C) input."""

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
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


class EagerConv2d(nn.Conv2d):
    """nn.Conv2d that, on the CPU, computes its result right away (the same numbers).

    MLX's CPU backend keeps several operations in flight, and each 3x3 convolution holds an unfolded copy of its
    input (9x its size) until it is done: at the VAE's full-resolution levels that dominates memory. Evaluating
    each convolution as it comes halves the decoder's peak (measured: 240 -> 116 bytes per pixel per channel)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        if mx.default_device() == mx.cpu:
            mx.eval(y)
        return y
