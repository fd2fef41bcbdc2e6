"""The denoiser the samplers call: latents at noise level sigma -> the model's estimate of the clean latents.

It scales the input, runs the UNet on the CFG batch with this step's conditioning, applies classifier-free
guidance and converts the model's prediction type. Hooks see (and may replace) the UNet's input at every step:
that is where ControlNet residuals and inpainting channels enter, without this function growing.

With a `CFGSplit` (`generate --parallel cfg` under `mlx.launch -n 2`) each of two ranks runs the UNet on one half
of the CFG batch, after the hooks, and the halves are exchanged (all_gather of the UNet's output: the latents'
size, 64 KB a step at 512x512): both ranks then hold the whole prediction and sample identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

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
    # the rows the UNet will run on (one rank's half with parallel cfg; None: all): a hook may compute its
    # residuals for these rows alone (the ControlNet hook does), and those are then not cut again
    keep: slice | None = None

    def rows(self, rows: slice) -> "UNetInput":
        """The same input for some rows of the batch (a tensor of one row, broadcast to every row, or of the kept
        rows already, stays whole)."""
        take = batch_rows(self.x.shape[0], rows)
        return UNetInput(self.x[rows], self.t[rows], self.cond.rows(take),
                         self.residuals.map(take) if self.residuals is not None else None, rows)


def batch_rows(batch: int, rows: slice) -> Callable[[mx.array], mx.array]:
    """A tensor -> its `rows` when it holds the whole batch; any other (one row broadcast to every row, or rows
    already cut) as it is."""
    return lambda a: a[rows] if a.shape[0] == batch else a


@dataclass
class CFGSplit:
    """Classifier-free guidance over the two ranks of `group`: rank 0 runs the UNet on the unconditional half of
    the batch, rank 1 on the conditional half."""

    group: "mx.distributed.Group"

    def __post_init__(self):
        if self.group.size() != 2:
            raise UserError(f"parallel cfg splits the guidance batch over exactly 2 ranks (mlx.launch -n 2); this "
                            f"run has {self.group.size()}")

    def rows(self, batch: int) -> slice:
        half = batch // 2
        return slice(self.group.rank() * half, (self.group.rank() + 1) * half)

    def gather(self, half: mx.array) -> mx.array:
        return mx.distributed.all_gather(half, group=self.group, stream=mx.cpu)

    def rank0s(self, x: mx.array) -> mx.array:
        """Rank 0's x on both ranks (the starting latents: computed on different machines they could differ in
        the last bits, and the halves must belong to one picture)."""
        mine = x if self.group.rank() == 0 else mx.zeros_like(x)
        return mx.distributed.all_sum(mine, group=self.group, stream=mx.cpu)

    def seed(self) -> int:
        """A random seed, rank 0's on both ranks (each rank would draw its own)."""
        mine = mx.array([np.random.randint(0, 2**31 - 1)], dtype=mx.int32)
        return int(self.rank0s(mine).item())


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
    split: CFGSplit | None = None

    def __post_init__(self):
        if self.prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"unsupported prediction_type {self.prediction!r}")
        if self.split is not None and not self.guided:
            raise UserError(f"parallel cfg splits the guidance batch; with cfg {self.cfg} (<= 1) there is none")

    @property
    def guided(self) -> bool:
        return self.cfg > 1.0

    def __call__(self, x: mx.array, i: int) -> mx.array:
        sigma = float(self.sigmas[i])
        scale = 1.0 / math.sqrt(sigma**2 + 1)
        x_in = (x * scale).astype(self.dtype)
        if self.guided:
            x_in = mx.concatenate([x_in, x_in])
        if self.split is None:
            out = self.model_output(x_in, i, sigma)
        else:  # in the model's dtype: float16 halves what crosses the link
            out = self.split.gather(self.model_output(x_in, i, sigma, self.split.rows(x_in.shape[0])))
        out = out.astype(mx.float32)
        if self.guided:
            uncond, cond = mx.split(out, 2)
            out = uncond + self.cfg * (cond - uncond)
        if self.prediction == "epsilon":
            return x - sigma * out
        return x * scale**2 - out * sigma * scale  # v_prediction

    def model_output(self, x_in: mx.array, i: int, sigma: float, rows: slice | None = None) -> mx.array:
        """The UNet's output at step i for the CFG batch x_in (scaled), or for some of its rows: the hooks see the
        whole batch and which rows are kept, the UNet runs on those rows alone."""
        step = UNetInput(x_in, mx.full((x_in.shape[0],), float(self.timesteps[i])), self.cond.at(i, sigma),
                         keep=rows)
        for hook in self.hooks:
            step = hook(step, i, sigma)
        if rows is not None:
            step = step.rows(rows)
        return self.unet(step.x, step.t, step.cond, step.residuals)
