"""AutoencoderKL (diffusers layout, NHWC inside), sized from its config.json."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import VAEConfig
from .attention import Attention
from .ops import EagerConv2d, silu
from .unet import Downsample2D, ResnetBlock2D, Upsample2D, group_norm

EPS = 1e-6  # diffusers' VAE blocks use 1e-6 everywhere


class VAEAttention(Attention):
    """Single-head self-attention over pixels, with its own GroupNorm and residual (diffusers' VAE mid block)."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, heads=1, dim_head=ch, qkv_bias=True)
        self.group_norm = group_norm(groups, ch, EPS)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = super().__call__(self.group_norm(x).reshape(B, H * W, C))
        return x + h.reshape(B, H, W, C)


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(ch, ch, None, groups, EPS, EagerConv2d) for _ in range(2)]
        if attention:
            self.attentions = [VAEAttention(ch, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, EPS, EagerConv2d)
                        for j in range(layers)]
        if down:
            self.downsamplers = [Downsample2D(out_ch, padding=0, conv=EagerConv2d)]
        if up:
            self.upsamplers = [Upsample2D(out_ch, EagerConv2d)]

    def __call__(self, x: mx.array) -> mx.array:
        for r in self.resnets:
            x = r(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = EagerConv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            VAEBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, down=i < n - 1) for i in range(n)
        ]
        self.mid_block = VAEMidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = group_norm(g, ch[-1], EPS)
        self.conv_out = EagerConv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, then_silu=True))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = EagerConv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = [
            VAEBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, up=i < n - 1) for i in range(n)
        ]
        self.conv_norm_out = group_norm(g, ch[-1], EPS)
        self.conv_out = EagerConv2d(ch[-1], c.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.conv_norm_out(x, then_silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        lat = c.latent_channels
        if c.use_quant_conv:
            self.quant_conv = EagerConv2d(2 * lat, 2 * lat, 1)
        if c.use_post_quant_conv:
            self.post_quant_conv = EagerConv2d(lat, lat, 1)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along one side (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Pixels in [-1, 1], NHWC -> (mean, std) of the latent distribution (unscaled)."""
        h = self.encoder(x)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))

    def decode(self, z: mx.array) -> mx.array:
        """Unscaled latents, NHWC -> pixels in about [-1, 1]."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_latents(self, z: mx.array) -> mx.array:
        c = self.config
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def from_latents(self, z: mx.array) -> mx.array:
        c = self.config
        return z / c.scaling_factor + (c.shift_factor or 0.0)
