"""UNet2DConditionModel (diffusers layout, NHWC inside), sized entirely from its config.json.

Per-block heads, transformer depth, cross-attention width and linear/conv proj_in are all config-driven,
so SDXL's variant only adds the extra time/text embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..conditioning import Site, StepConditioning
from ..config import UNetConfig
from ..errors import UserError
from .attention import Attention
from .ops import Conv2d, GroupNorm, geglu, silu


def group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


def upsample_nearest(x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
    """Nearest-neighbour upsampling of (B, H, W, C): x2, or to an explicit (height, width) picked the way torch's
    F.interpolate(mode="nearest", size=...) picks: source index floor(dst * in / out), scale in float32."""
    B, H, W, C = x.shape
    if size is None or tuple(size) == (2 * H, 2 * W):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return x.reshape(B, H * 2, W * 2, C)

    def source(n_in: int, n_out: int) -> mx.array:
        scale = mx.array(n_in, mx.float32) / n_out
        return mx.minimum(mx.floor(mx.arange(n_out, dtype=mx.float32) * scale).astype(mx.int32), n_in - 1)

    return mx.take(mx.take(x, source(H, size[0]), axis=1), source(W, size[1]), axis=2)


def timestep_embedding(t: mx.array, dim: int, flip_sin_to_cos: bool, shift: float) -> mx.array:
    """diffusers' `Timesteps`: sinusoidal features of the (float) timestep."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - shift))
    args = t.astype(mx.float32)[:, None] * freqs[None]
    sin, cos = mx.sin(args), mx.cos(args)
    return mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float,
                 conv: type[nn.Conv2d] = Conv2d):
        super().__init__()
        self.norm1 = group_norm(groups, in_ch, eps)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        if temb_ch:
            self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(groups, out_ch, eps)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.conv_shortcut = conv(in_ch, out_ch, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(self.norm1(x, then_silu=True))
        if temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.conv2(self.norm2(h, then_silu=True))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def __call__(self, x: mx.array) -> mx.array:
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]  # index 1: dropout

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, cond: StepConditioning) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), cond.text, cond.image_attention(self.attn2.name, x.shape[1]))
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """A 1x1-conv proj_in/out (SD 1.x) and a linear one (SD 2.x, SDXL) are the same map: both are Linear here."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = group_norm(groups, channels, 1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, cond: StepConditioning) -> mx.array:
        B, H, W, C = x.shape
        h = self.proj_in(self.norm(x).reshape(B, H * W, C))
        for block in self.transformer_blocks:
            h = block(h, cond)
        return x + self.proj_out(h).reshape(B, H, W, C)


class Downsample2D(nn.Module):
    def __init__(self, ch: int, padding: int = 1, conv: type[nn.Conv2d] = Conv2d):
        super().__init__()
        self.padding = padding
        self.conv = conv(ch, ch, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:  # the VAE pads right/bottom only
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int, conv: type[nn.Conv2d] = Conv2d):
        super().__init__()
        self.conv = conv(ch, ch, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        return self.conv(upsample_nearest(x, size))


class UNetBlock2D(nn.Module):
    """A down block (skip_channels None) or an up block; with attentions when `heads` is given."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        num_layers: int,
        groups: int,
        eps: float,
        heads: int | None = None,
        depth: int = 1,
        context_dim: int = 0,
        prev_out_ch: int | None = None,
        skip_channels: list[int] | None = None,
        add_downsample: bool = False,
        add_upsample: bool = False,
    ):
        super().__init__()
        if skip_channels is None:  # down block
            ins = [in_ch] + [out_ch] * (num_layers - 1)
        else:
            ins = [(prev_out_ch if j == 0 else out_ch) + skip_channels[j] for j in range(num_layers)]
        self.resnets = [ResnetBlock2D(i, out_ch, temb_ch, groups, eps) for i in ins]
        if heads:
            self.attentions = [Transformer2DModel(out_ch, heads, depth, context_dim, groups) for _ in ins]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_ch)]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_ch)]

    def __call__(self, x, temb, cond: StepConditioning, skips: list[mx.array] | None = None,
                 residual: mx.array | None = None):
        """`residual` (T2I-Adapter, attention blocks only): added to the last resnet+attention output, before
        it becomes a skip and before downsampling, as diffusers' CrossAttnDownBlock2D does."""
        outputs = []
        for j, resnet in enumerate(self.resnets):
            if skips is not None:
                x = mx.concatenate([x, skips.pop()], axis=-1)
            x = resnet(x, temb)
            if "attentions" in self:
                x = self.attentions[j](x, cond)
                if residual is not None and j == len(self.resnets) - 1:
                    x = x + residual
            outputs.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            outputs.append(x)
        if "upsamplers" in self:
            # Back to the next skip's size, as diffusers forwards it: an odd side halved by the stride-2
            # downsampling (25 -> 13) would come back one too long (26) from a plain x2.
            x = self.upsamplers[0](x, skips[-1].shape[1:3])
        return x, outputs


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch: int, temb_ch: int, groups: int, eps: float, heads: int, depth: int, context_dim: int):
        super().__init__()
        self.resnets = [ResnetBlock2D(ch, ch, temb_ch, groups, eps) for _ in range(2)]
        self.attentions = [Transformer2DModel(ch, heads, depth, context_dim, groups)]

    def __call__(self, x, temb, cond: StepConditioning):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, cond)
        return self.resnets[1](x, temb)


@dataclass
class Residuals:
    """What structural controls add to the UNet at one step (each list in the UNet's own order)."""

    down: list[mx.array] | None = None  # ControlNet: one per skip connection
    mid: mx.array | None = None  # ControlNet: added to the mid block's output
    intrablock: list[mx.array] | None = None  # T2I-Adapter: added inside the down blocks

    def __add__(self, other: "Residuals") -> "Residuals":
        """Several controls at once: their residuals are summed (diffusers' MultiControlNet)."""
        def add(a, b):
            if a is None or b is None:
                return a if b is None else b
            return [p + q for p, q in zip(a, b, strict=True)] if isinstance(a, list) else a + b
        return Residuals(add(self.down, other.down), add(self.mid, other.mid), add(self.intrablock, other.intrablock))

    def map(self, fn: Callable[[mx.array], mx.array]) -> "Residuals":
        """fn applied to every tensor (parallel cfg cuts each to this rank's rows)."""
        each = lambda a: None if a is None else [fn(v) for v in a] if isinstance(a, list) else fn(a)  # noqa: E731
        return Residuals(each(self.down), each(self.mid), each(self.intrablock))


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.block_out_channels
        n = len(ch)
        temb_ch = ch[0] * 4
        g, eps = c.norm_num_groups, c.norm_eps
        for t in c.down_block_types + c.up_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                raise UserError(f"unsupported UNet block type {t!r}")

        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        if c.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids join the time embedding
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_ch)

        def attn_kw(i: int, kind: str) -> dict:
            if not kind.startswith("CrossAttn"):
                return {}
            return dict(heads=c.num_attention_heads[i], depth=c.transformer_layers_per_block[i],
                        context_dim=c.cross_attention_dim[i])

        self.down_blocks = [
            UNetBlock2D(ch[max(i - 1, 0)], ch[i], temb_ch, c.layers_per_block[i], g, eps,
                        add_downsample=i < n - 1, **attn_kw(i, c.down_block_types[i]))
            for i in range(n)
        ]
        self.mid_block = UNetMidBlock2DCrossAttn(
            ch[-1], temb_ch, g, eps, c.num_attention_heads[-1], c.transformer_layers_per_block[-1],
            c.cross_attention_dim[-1],
        )
        # Up blocks mirror the down blocks: block i of the way up reads the reversed per-block settings.
        self.up_blocks = []
        for i, kind in enumerate(c.up_block_types):
            r = n - 1 - i
            num_layers = c.layers_per_block[r] + 1
            in_ch = ch[max(r - 1, 0)]
            skips = [ch[r]] * (num_layers - 1) + [in_ch]
            self.up_blocks.append(
                UNetBlock2D(0, ch[r], temb_ch, num_layers, g, eps, prev_out_ch=ch[min(r + 1, n - 1)],
                            skip_channels=skips, add_upsample=i < n - 1, **attn_kw(r, kind))
            )
        self.conv_norm_out = group_norm(g, ch[0], eps)
        self.conv_out = Conv2d(ch[0], c.out_channels, 3, padding=1)
        for site, attn in self.cross_attentions():
            attn.name = site.name

    def transformers(self) -> list[tuple[str, "Transformer2DModel"]]:
        """(diffusers name, module) of every Transformer2DModel, in ComfyUI's order: input, middle, output."""
        out = [(f"down_blocks.{i}.attentions.{j}", t) for i, b in enumerate(self.down_blocks)
               for j, t in enumerate(getattr(b, "attentions", []))]
        out += [("mid_block.attentions.0", self.mid_block.attentions[0])]
        out += [(f"up_blocks.{i}.attentions.{j}", t) for i, b in enumerate(self.up_blocks)
                for j, t in enumerate(getattr(b, "attentions", []))]
        return out

    def cross_attentions(self) -> list[tuple[Site, "Attention"]]:
        """Every cross-attention layer (attn2) with its Site, in ComfyUI's order (the mid block between)."""
        return [(Site(f"{name}.transformer_blocks.{k}.attn2", index), tb.attn2)
                for index, (name, t) in enumerate(self.transformers())
                for k, tb in enumerate(t.transformer_blocks)]

    def __call__(self, x: mx.array, timestep: mx.array, cond: StepConditioning,
                 residuals: Residuals | None = None) -> mx.array:
        """x: (B, H, W, C) latents; timestep: (B,) floats; `cond`: the text context (B, L, D), SDXL's added
        inputs (`text_embeds` (B, pooled), `time_ids` (B, 6): original size, crop, target size) and what each
        cross-attention layer's image attention reads at this step. `residuals`: what ControlNets and
        T2I-Adapters add (diffusers' down_block_additional_residuals, mid_block_additional_residual,
        down_intrablock_additional_residuals)."""
        r = residuals or Residuals()
        temb = self.time_embed(timestep, cond, x.dtype)
        x, skips = self.encode(x, temb, cond, r.intrablock)
        if r.down is not None:
            if len(r.down) != len(skips):
                raise UserError(f"{len(r.down)} down residuals for a UNet with {len(skips)} skip connections")
            skips = [s + d for s, d in zip(skips, r.down)]
        if r.mid is not None:
            x = x + r.mid
        for block in self.up_blocks:
            x, _ = block(x, temb, cond, skips=skips)
        return self.conv_out(self.conv_norm_out(x, then_silu=True))

    def time_embed(self, timestep: mx.array, cond: StepConditioning, dtype: mx.Dtype) -> mx.array:
        """The time embedding, plus SDXL's pooled-text and size/crop embedding."""
        c = self.config
        text_embeds, time_ids = cond.added.get("text_embeds"), cond.added.get("time_ids")
        temb = timestep_embedding(timestep, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(temb.astype(dtype))
        if "add_embedding" in self:
            if text_embeds is None or time_ids is None:
                raise UserError("this UNet (SDXL) needs text_embeds and time_ids")
            ids = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            added = mx.concatenate([text_embeds, ids.reshape(timestep.shape[0], -1).astype(text_embeds.dtype)], axis=-1)
            temb = temb + self.add_embedding(added.astype(dtype))
        return temb

    def encode(self, x: mx.array, temb: mx.array, cond: StepConditioning,
               intrablock: list[mx.array] | None = None, hint: mx.array | None = None) -> tuple[mx.array, list[mx.array]]:
        """conv_in, the down blocks and the mid block: (the mid block's output, the skip connections).
        `intrablock`: T2I-Adapter features, consumed in order as diffusers' UNet consumes them.
        `hint`: added to conv_in's output (a ControlNet's embedded control image)."""
        intra = list(intrablock or [])
        x = self.conv_in(x)
        if hint is not None:
            x = x + hint
        skips = [x]
        for block in self.down_blocks:
            has_attention = "attentions" in block
            x, out = block(x, temb, cond, residual=intra.pop(0) if intra and has_attention else None)
            if intra and not has_attention:  # diffusers adds in place: the block's last skip is that tensor
                x = out[-1] = x + intra.pop(0)
            skips.extend(out)
        x = self.mid_block(x, temb, cond)
        if intra and intra[0].shape == x.shape:  # T2I-Adapter-XL's last feature goes to the mid block
            x = x + intra.pop(0)
        return x, skips
