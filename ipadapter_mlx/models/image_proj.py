"""IP-Adapter projections: CLIP image features -> image tokens of the UNet's cross-attention width.

Parameter names are those of the tencent-ailab checkpoints (`image_proj.*` without the prefix), so the
files map 1:1. Which class, and every size, is read from the weights' keys and shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from .attention import attention

RESAMPLER_HEAD_DIM = 64  # the released Resamplers all use 64-wide heads; shapes give only heads * 64


@dataclass
class ImageProjConfig:
    kind: str  # "linear" (ImageProjModel), "resampler" (plus), "mlp" (full-face), "faceid", "faceid-plus"
    input_dim: int  # width of the features it reads: CLIP's, or the face identity embedding's (FaceID)
    output_dim: int  # cross-attention width of the UNet it serves
    tokens: int  # image tokens per reference image
    dim: int = 0  # resampler width
    depth: int = 0
    heads: int = 0
    ff_mult: int = 4
    # FaceID: the identity MLP's hidden width; Plus: the CLIP hidden-state width its perceiver also reads, and
    # v2's shortcut (tokens = identity tokens + scale x perceiver output; the weights do not tell v1 from v2)
    mlp_dim: int = 0
    clip_dim: int = 0
    shortcut: bool = False
    face: bool = False  # reads face identity embeddings (ArcFace), not CLIP features

    @property
    def reads_hidden_states(self) -> bool:
        """Plus, full-face and FaceID Plus read CLIP's penultimate hidden states; base adapters the projected
        embedding; the other FaceID adapters no CLIP feature at all."""
        return self.kind in ("resampler", "mlp", "faceid-plus") and not (self.face and self.kind == "resampler")

    @property
    def clip_width(self) -> int | None:
        """The CLIP feature width it reads (None: no vision tower)."""
        if self.face:
            return self.clip_dim or None
        return self.input_dim

    def to_dict(self) -> dict:
        return asdict(self)


def infer_image_proj_config(w: dict[str, mx.array], face: bool = False) -> ImageProjConfig:
    """From an adapter's `image_proj.*` tensors (prefix removed). `face`: a Resampler reading face embeddings
    (portrait-unnorm: its shapes are a plus adapter's, only its name tells)."""
    if "perceiver_resampler.proj_in.weight" in w:  # FaceID Plus: identity MLP + face perceiver over CLIP states
        p = {k[len("perceiver_resampler."):]: v for k, v in w.items() if k.startswith("perceiver_resampler.")}
        out = w["norm.weight"].shape[0]
        if out != p["proj_in.weight"].shape[0] or out != p["proj_out.weight"].shape[0]:  # queries, shortcut
            raise UserError(f"FaceID Plus projection is inconsistent: {out}-d identity tokens, a perceiver of "
                            f"{p['proj_in.weight'].shape[0]}-d in and {p['proj_out.weight'].shape[0]}-d out")
        return ImageProjConfig("faceid-plus", w["proj.0.weight"].shape[1], p["proj_out.weight"].shape[0],
                               w["proj.2.weight"].shape[0] // out, **_perceiver(p), mlp_dim=w["proj.0.weight"].shape[0],
                               clip_dim=p["proj_in.weight"].shape[1], face=True)
    if "proj.0.weight" in w and "proj.2.weight" in w and "norm.weight" in w:  # FaceID: MLP to tokens, LayerNorm
        out = w["norm.weight"].shape[0]
        return ImageProjConfig("faceid", w["proj.0.weight"].shape[1], out, w["proj.2.weight"].shape[0] // out,
                               mlp_dim=w["proj.0.weight"].shape[0], face=True)
    if "proj.weight" in w and "norm.weight" in w:
        out = w["norm.weight"].shape[0]
        return ImageProjConfig("linear", w["proj.weight"].shape[1], out, w["proj.weight"].shape[0] // out)
    if "proj.0.weight" in w and "proj.3.weight" in w:
        hidden = w["proj.0.weight"].shape[1]
        # full-face projects every token of the ViT's hidden states: 257 for a 224 px ViT-*/14
        return ImageProjConfig("mlp", hidden, w["proj.3.weight"].shape[0], 0)
    if "latents" in w:
        return ImageProjConfig("resampler", w["proj_in.weight"].shape[1], w["proj_out.weight"].shape[0],
                               w["latents"].shape[1], **_perceiver(w), face=face)
    raise UserError(f"unknown IP-Adapter projection (keys: {', '.join(sorted(w)[:6])} ...)")


def _perceiver(w: dict[str, mx.array]) -> dict[str, int]:
    """A Perceiver's sizes from its tensors (proj_in, layers.i.0 attention, layers.i.1 feed-forward)."""
    dim = w["proj_in.weight"].shape[0]
    return dict(dim=dim, depth=len({k.split(".")[1] for k in w if k.startswith("layers.")}),
                heads=w["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM,
                ff_mult=w["layers.0.1.1.weight"].shape[0] // dim)


class ImageProjModel(nn.Module):
    """Base / light / vit-G: one Linear to `tokens` tokens, then LayerNorm."""

    def __init__(self, c: ImageProjConfig):
        super().__init__()
        self.tokens = c.tokens
        self.proj = nn.Linear(c.input_dim, c.tokens * c.output_dim)
        self.norm = nn.LayerNorm(c.output_dim)

    def __call__(self, embeds: mx.array) -> mx.array:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class MLPProjModel(nn.Module):
    """Full-face: Linear-GELU-Linear-LayerNorm on every hidden-state token."""

    def __init__(self, c: ImageProjConfig):
        super().__init__()
        self.proj = [nn.Linear(c.input_dim, c.input_dim), nn.GELU(), nn.Linear(c.input_dim, c.output_dim),
                     nn.LayerNorm(c.output_dim)]

    def __call__(self, hidden: mx.array) -> mx.array:
        for layer in self.proj:
            hidden = layer(hidden)
        return hidden


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        inner = heads * RESAMPLER_HEAD_DIM
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def __call__(self, x: mx.array, latents: mx.array) -> mx.array:
        x, latents = self.norm1(x), self.norm2(latents)
        # keys and values over the image tokens and the latents together
        k, v = mx.split(self.to_kv(mx.concatenate([x, latents], axis=1)), 2, axis=-1)
        q = self.to_q(latents)
        dtype = q.dtype
        out = attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), self.heads)
        return self.to_out(out.astype(dtype))


class Resampler(nn.Module):
    """Plus / plus-face: learned queries attend to the ViT's hidden states (a Perceiver). Without `learned`
    queries it is FaceID Plus' FacePerceiverResampler: the caller gives them (the identity tokens)."""

    def __init__(self, c: ImageProjConfig, learned: bool = True):
        super().__init__()
        if learned:
            self.latents = mx.zeros((1, c.tokens, c.dim))
        self.proj_in = nn.Linear(c.input_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        inner = c.dim * c.ff_mult
        # names as in the checkpoints: layers.i.0 = attention, layers.i.1.{0,1,3} = LN, Linear, (GELU), Linear
        self.layers = [
            [PerceiverAttention(c.dim, c.heads),
             [nn.LayerNorm(c.dim), nn.Linear(c.dim, inner, bias=False), nn.GELU(), nn.Linear(inner, c.dim, bias=False)]]
            for _ in range(c.depth)
        ]

    def __call__(self, hidden: mx.array, latents: mx.array | None = None) -> mx.array:
        if latents is None:
            latents = mx.broadcast_to(self.latents, (hidden.shape[0], *self.latents.shape[1:])).astype(hidden.dtype)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            h = latents
            for layer in ff:
                h = layer(h)
            latents = h + latents
        return self.norm_out(self.proj_out(latents))


class FaceIDProjModel(nn.Module):
    """FaceID (tencent's MLPProjModel, diffusers' IPAdapterFaceIDImageProjection): the identity embedding through
    Linear-GELU-Linear to `tokens` tokens, each LayerNormed."""

    def __init__(self, c: ImageProjConfig):
        super().__init__()
        self.tokens = c.tokens
        self.proj = [nn.Linear(c.input_dim, c.mlp_dim), nn.GELU(), nn.Linear(c.mlp_dim, c.tokens * c.output_dim)]
        self.norm = nn.LayerNorm(c.output_dim)

    def id_tokens(self, embeds: mx.array) -> mx.array:
        for layer in self.proj:
            embeds = layer(embeds)
        return self.norm(embeds.reshape(embeds.shape[0], self.tokens, -1))

    def __call__(self, embeds: mx.array) -> mx.array:
        return self.id_tokens(embeds)


class FaceIDPlusProjModel(FaceIDProjModel):
    """FaceID Plus (tencent's ProjPlusModel, diffusers' IPAdapterFaceIDPlusImageProjection): the identity tokens
    are the queries of a perceiver over CLIP's hidden states of the aligned face crop. v2 adds a shortcut:
    tokens = identity tokens + shortcut_scale x perceiver output (authors' default scale 1)."""

    def __init__(self, c: ImageProjConfig):
        super().__init__(ImageProjConfig("faceid", c.input_dim, c.dim, c.tokens, mlp_dim=c.mlp_dim))
        self.perceiver_resampler = Resampler(replace(c, input_dim=c.clip_dim), learned=False)
        self.shortcut = c.shortcut

    def __call__(self, embeds: mx.array, clip_hidden: mx.array, shortcut_scale: float | None = None) -> mx.array:
        """`shortcut_scale` None: the file's way (v2: the shortcut at 1, v1: none); a number: the shortcut at that
        scale (ComfyUI's v2 switch, for a v2 file under another name)."""
        x = self.id_tokens(embeds)
        out = self.perceiver_resampler(clip_hidden, x)
        if shortcut_scale is None and self.shortcut:
            shortcut_scale = 1.0
        return out if shortcut_scale is None else x + shortcut_scale * out


PROJECTIONS = {"linear": ImageProjModel, "mlp": MLPProjModel, "resampler": Resampler, "faceid": FaceIDProjModel,
               "faceid-plus": FaceIDPlusProjModel}


def build_image_proj(c: ImageProjConfig) -> nn.Module:
    return PROJECTIONS[c.kind](c)
