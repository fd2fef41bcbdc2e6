"""Attention, and the decoupled image attention of IP-Adapter: the paper's idea lives here and only here.

`out = to_out( Attn(q, K_text, V_text) + sum_i scale_i * Attn(q, to_k_ip_i(c_i), to_v_ip_i(c_i)) )`
Each image-token set has its own softmax. With no adapter acting on a layer it costs nothing. How scale_i enters
is ComfyUI_IPAdapter_plus' "embeds scaling" (`scale_embeds`); a regional mask multiplies an output where it acts.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cpu


# Head widths Metal's fused attention kernel takes. SD 1.5's widest layers use 40: padded with zeros to 64 they
# get the fused kernel and the same result (zero columns add nothing to q.k, and the padded outputs are cut).
FUSED_HEAD_DIMS = (64, 80, 128)


def padded_head_dim(d: int) -> int:
    if mx.default_device() != mx.gpu or d in FUSED_HEAD_DIMS or d > FUSED_HEAD_DIMS[-1]:
        return d
    return next(f for f in FUSED_HEAD_DIMS if f > d)


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, pad_to: int | None = None,
              mask: mx.array | None = None) -> mx.array:
    """Multi-head softmax(q k^T / sqrt(d) + mask) v over (B, L, heads*d) inputs; `mask` (Lq, Lk), additive or
    boolean (True: attend), e.g. CLIP's causal mask. On the CPU `cpu_attention`, unless `pad_to` asks for MLX's
    fused kernel at a padded head width."""
    B, Lq, D = q.shape
    d = D // heads
    if mask is not None:
        if mask.ndim != 2:
            raise ValueError(f"attention takes a (queries, keys) mask, got shape {mask.shape}")
        if mask.dtype == mx.bool_:  # True = attend, as MLX's fused kernel reads a boolean mask
            mask = mx.where(mask, mx.array(0.0, q.dtype), mx.array(-mx.inf, q.dtype))
    if mx.default_device() == mx.cpu and pad_to is None:
        return cpu_attention(q, k, v, heads, mask)
    q = q.reshape(B, Lq, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(B, k.shape[1], heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(B, v.shape[1], heads, d).transpose(0, 2, 1, 3)
    width = pad_to or padded_head_dim(d)
    if width != d:
        q, k, v = (mx.pad(t, [(0, 0), (0, 0), (0, 0), (0, width - d)]) for t in (q, k, v))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
    if width != d:
        out = out[..., :d]
    return out.transpose(0, 2, 1, 3).reshape(B, Lq, D)


def cpu_attention(q: mx.array, k: mx.array, v: mx.array, heads: int, mask: mx.array | None = None) -> mx.array:
    """`attention` on the CPU backend: heads folded into the batch, softmax by `cpu.attention` (MLX's own CPU
    softmax is scalar: 5-7x slower at SD's shapes), in float32 whatever the model's dtype."""
    B, Lq, D = q.shape
    d = D // heads

    def split(t: mx.array) -> mx.array:
        return t.astype(mx.float32).reshape(B, -1, heads, d).transpose(0, 2, 1, 3).reshape(B * heads, -1, d)

    out = cpu.attention(split(q), split(k), split(v), scale=d**-0.5, mask=mask)
    return out.reshape(B, heads, Lq, d).transpose(0, 2, 1, 3).reshape(B, Lq, D).astype(q.dtype)


# ComfyUI's embeds_scaling: 'V only', 'K+V', 'K+V w/ C penalty', 'K+mean(V) w/ C penalty'
EMBEDS_SCALINGS = ("V", "K+V", "K+V-C-penalty", "K+mean-V")


def scale_embeds(k: mx.array, v: mx.array, w: float, mode: str) -> tuple[mx.array, mx.array, float]:
    """(keys, values, output weight) of an image attention of scale `w`, as ComfyUI's CrossAttentionPatch:
    V scales the output (diffusers' scale); K+V the keys and values; the C penalties first take w * C / 1280
    (C: the layer's width), and K+mean-V then scales only the values' mean over the tokens."""
    if mode == "V":
        return k, v, w
    if mode in ("K+V-C-penalty", "K+mean-V"):
        w = w * k.shape[-1] / 1280
    if mode == "K+mean-V":
        mean = v.mean(axis=1, keepdims=True)
        return k * w, v - mean + mean * w, 1.0
    return k * w, v * w, 1.0


class IPAttention(nn.Module):
    """One adapter's `to_k_ip` / `to_v_ip` for one cross-attention layer (bias-free, as in the checkpoints)."""

    def __init__(self, context_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)


class Attention(nn.Module):
    """diffusers' `Attention` (to_q, to_k, to_v, to_out.0): self-attention when `context` is None."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = [nn.Linear(inner, query_dim)]
        self.name = ""  # diffusers' module name; the UNet sets it (the conditioning is looked up by it)

    def __call__(
        self,
        x: mx.array,
        context: mx.array | None = None,
        image: list = (),
    ) -> mx.array:
        """`image`: the ImageAttentions (conditioning.py) acting here at this step, masks already at this
        layer's query count."""
        ctx = x if context is None else context
        q = self.to_q(x)
        out = attention(q, self.to_k(ctx), self.to_v(ctx), self.heads)
        for a in image:
            k, v, w = scale_embeds(a.layer.to_k_ip(a.tokens), a.layer.to_v_ip(a.tokens), a.scale, a.scaling)
            ip = attention(q, k, v, self.heads)
            out = out + w * (ip if a.mask is None else ip * a.mask)
        return self.to_out[0](out)
