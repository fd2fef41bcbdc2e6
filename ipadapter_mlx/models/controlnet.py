"""ControlNetModel (diffusers layout, NHWC inside), sized from its config.json.

A ControlNet is a trainable copy of the UNet's input half: conv_in, the time (and SDXL's text_time) embedding,
the down blocks and the mid block, the very classes of unet.py. The control image enters through a small
convolutional embedding added to conv_in's output; every skip connection and the mid block's output leave
through a zero-initialised 1x1 convolution (a Linear here, the same map) as residuals for the UNet.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..conditioning import StepConditioning
from ..config import ControlNetConfig
from .ops import silu
from .unet import Residuals, UNet2DConditionModel


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (B, H, W, 3) in [0, 1] -> (B, H/8, W/8, width of conv_in): a 3x3 conv, then per
    width a 3x3 conv and a stride-2 one, SiLU after each, and a (zero-initialised) 3x3 conv out."""

    def __init__(self, out_channels: int, in_channels: int, widths: list[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = []
        for a, b in zip(widths, widths[1:]):
            self.blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = silu(self.conv_in(x))
        for block in self.blocks:
            x = silu(block(x))
        return self.conv_out(x)


class ControlNetModel(UNet2DConditionModel):
    """The UNet's input half (built by UNet2DConditionModel from a config without up blocks) plus the
    control image's embedding and the zero convolutions."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        del self.up_blocks, self.conv_norm_out, self.conv_out  # the output half is the UNet's own
        c = config
        ch = c.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], c.conditioning_channels, c.conditioning_embedding_out_channels)
        # one per skip connection, in the UNet's order: conv_in, each down layer, each downsampler
        widths = [ch[0]] + [w for i, w in enumerate(ch) for _ in range(c.layers_per_block[i] + (i < len(ch) - 1))]
        self.controlnet_down_blocks = [nn.Linear(w, w) for w in widths]
        self.controlnet_mid_block = nn.Linear(ch[-1], ch[-1])

    @property
    def num_residuals(self) -> int:
        """How many down residuals it gives (12 on SD 1.5, 9 on SDXL); the mid one comes on top."""
        return len(self.controlnet_down_blocks)

    def __call__(self, x: mx.array, timestep: mx.array, cond: StepConditioning, image: mx.array,
                 scale: float = 1.0, guess_mode: bool = False) -> Residuals:
        """x: (B, H, W, C) scaled latents; `cond`: the text context (and SDXL's added inputs) only; `image`:
        (B, 8H, 8W, 3) in [0, 1]. The residuals times `scale`, as diffusers' ControlNetModel.forward: in guess
        mode residual i times logspace(-1, 0, n + 1)[i] too; a global-pool net's averaged over the picture."""
        c = self.config
        if c.controlnet_conditioning_channel_order == "bgr":
            image = image[..., ::-1]
        temb = self.time_embed(timestep, cond, x.dtype)
        x, skips = self.encode(x, temb, cond, hint=self.controlnet_cond_embedding(image.astype(x.dtype)))
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        n = len(down)
        if guess_mode and not c.global_pool_conditions:  # 0.1 for the first skip up to 1 for the mid block
            scales = [scale * 10 ** (-1 + i / n) for i in range(n + 1)]
        else:
            scales = [scale] * (n + 1)
        down = [d * s for d, s in zip(down, scales)]
        mid = mid * scales[-1]
        if c.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return Residuals(down, mid)

