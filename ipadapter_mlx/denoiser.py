"""The denoiser the samplers call: latents at noise level sigma -> the model's estimate of the clean latents.

It scales the input, runs the UNet on the CFG batch with this step's conditioning, applies classifier-free
guidance and converts the model's prediction type. Hooks see (and may replace) the UNet's input at every step:
that is where ControlNet residuals and inpainting channels enter, without this function growing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from .conditioning import Conditioning, StepConditioning
from .errors import UserError
from .models.unet import Residuals


@dataclass
class UNetInput:
    """What the UNet is called with at one step (the CFG batch: [uncond, cond] when guided)."""

    x: mx.array  # (B, H, W, C), already scaled to unit variance
    t: mx.array  # (B,) timesteps
    cond: StepConditioning
    residuals: Residuals | None = None  # ControlNet / T2I-Adapter hooks add theirs (Residuals.__add__)


# (the UNet's input, step index, sigma) -> the input to use instead
StepHook = Callable[[UNetInput, int, float], UNetInput]


@dataclass
class Denoiser:
    unet: Callable
    cond: Conditioning
    timesteps: list[float]
    sigmas: list[float]
    cfg: float = 7.5
    prediction: str = "epsilon"
    dtype: mx.Dtype = mx.float32
    hooks: list[StepHook] = field(default_factory=list)

    def __post_init__(self):
        if self.prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"unsupported prediction_type {self.prediction!r}")

    @property
    def guided(self) -> bool:
        return self.cfg > 1.0

    def __call__(self, x: mx.array, i: int) -> mx.array:
        sigma = float(self.sigmas[i])
        scale = 1.0 / math.sqrt(sigma**2 + 1)
        x_in = (x * scale).astype(self.dtype)
        if self.guided:
            x_in = mx.concatenate([x_in, x_in])
        step = UNetInput(x_in, mx.full((x_in.shape[0],), float(self.timesteps[i])), self.cond.at(i, sigma))
        for hook in self.hooks:
            step = hook(step, i, sigma)
        out = self.unet(step.x, step.t, step.cond, step.residuals).astype(mx.float32)
        if self.guided:
            uncond, cond = mx.split(out, 2)
            out = uncond + self.cfg * (cond - uncond)
        if self.prediction == "epsilon":
            return x - sigma * out
        return x * scale**2 - out * sigma * scale  # v_prediction
