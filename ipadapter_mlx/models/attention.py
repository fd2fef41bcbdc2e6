"""Attention, and the decoupled image attention of IP-Adapter: the paper's idea lives here and only here.

`out = to_out( Attn(q, K_text, V_text) + sum_i scale_i * Attn(q, to_k_ip_i(c_i), to_v_ip_i(c_i)) )`
Each image-token set has its own softmax. With no adapter loaded `self.ip` is empty and costs nothing.
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


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, pad_to: int | None = None) -> mx.array:
    """Multi-head softmax(q k^T / sqrt(d)) v over (B, L, heads*d) inputs. On the CPU `cpu_attention`, unless
    `pad_to` asks for MLX's fused kernel at a padded head width."""
    B, Lq, D = q.shape
    d = D // heads
    if mx.default_device() == mx.cpu and pad_to is None:
        return cpu_attention(q, k, v, heads)
    q = q.reshape(B, Lq, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(B, k.shape[1], heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(B, v.shape[1], heads, d).transpose(0, 2, 1, 3)
    width = pad_to or padded_head_dim(d)
    if width != d:
        q, k, v = (mx.pad(t, [(0, 0), (0, 0), (0, 0), (0, width - d)]) for t in (q, k, v))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
    if width != d:
        out = out[..., :d]
    return out.transpose(0, 2, 1, 3).reshape(B, Lq, D)


def cpu_attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """`attention` on the CPU backend: heads folded into the batch, softmax by `cpu.attention` (MLX's own CPU
    softmax is scalar: 5-7x slower at SD's shapes), in float32 whatever the model's dtype."""
    B, Lq, D = q.shape
    d = D // heads

    def split(t: mx.array) -> mx.array:
        return t.astype(mx.float32).reshape(B, -1, heads, d).transpose(0, 2, 1, 3).reshape(B * heads, -1, d)

    out = cpu.attention(split(q), split(k), split(v), scale=d**-0.5)
    return out.reshape(B, heads, Lq, d).transpose(0, 2, 1, 3).reshape(B, Lq, D).astype(q.dtype)


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
        image: list[tuple[IPAttention, mx.array, float]] = (),
    ) -> mx.array:
        """`image`: (the adapter's layer, its tokens, its scale) per adapter acting here at this step."""
        ctx = x if context is None else context
        q = self.to_q(x)
        out = attention(q, self.to_k(ctx), self.to_v(ctx), self.heads)
        for layer, tokens, scale in image:
            out = out + scale * attention(q, layer.to_k_ip(tokens), layer.to_v_ip(tokens), self.heads)
        return self.to_out[0](out)
