"""Quantized Linear layers: at rest in 4 or 8 bits, computed through the fastest path of the device.

On Metal/CUDA MLX's quantized matmul kernels are fast. On the CPU they are not (~2 GFLOP/s against ~200 for
sgemm with OpenBLAS), so there a layer dequantizes its weight for the one product and lets BLAS do the work:
memory stays quantized, speed stays near float.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import UserError

BITS = (4, 8)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.gpu:
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                          mode=self.mode).astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self["bias"].astype(x.dtype), x, w.T)
        return x @ w.T


def quantizable(module: nn.Module, group_size: int) -> bool:
    """Linear layers whose input width splits into whole groups (convolutions stay as they are)."""
    return isinstance(module, nn.Linear) and module.weight.shape[1] % group_size == 0


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 64) -> int:
    """Replace every quantizable Linear in place; returns how many were replaced."""
    if bits not in BITS:
        raise UserError(f"quantization bits must be one of {BITS}, got {bits}")
    if group_size not in (32, 64, 128):
        raise UserError(f"group size must be 32, 64 or 128, got {group_size}")
    swaps = [(name, QuantizedLinear.from_linear(m, group_size, bits))
             for name, m in model.named_modules() if quantizable(m, group_size)]
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)
