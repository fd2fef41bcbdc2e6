"""IP-Adapter: image features -> image tokens, and their hook-up to the UNet's cross-attention layers.

The decoupled attention itself lives in `models/attention.py`; this module decides which `to_k_ip/to_v_ip`
pair serves which layer, checks that an adapter fits the UNet and the image encoder, and turns reference
images (or saved embeddings) into the per-adapter token sets the UNet receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from PIL import Image

from .conditioning import Site
from .errors import UserError
from .images import clip_pixels
from .models.attention import Attention, IPAttention
from .models.clip import CLIPVisionModel
from .models.image_proj import ImageProjConfig, build_image_proj
from .models.unet import UNet2DConditionModel

COMBINE_MODES = ("concat", "average", "norm-average", "subtract", "add", "max", "min")


def encoder_name(width: int, hidden: bool) -> str:
    """A readable name for a CLIP vision tower of this feature width, for error messages."""
    names = ({1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"} if hidden
             else {768: "ViT-L/14", 1024: "ViT-H/14", 1280: "ViT-bigG/14"})
    return f"{width}-d {names[width]}" if width in names else f"{width}-d"


def cross_attention_slots(unet: UNet2DConditionModel) -> dict[str, tuple[Site, Attention]]:
    """Checkpoint index -> the cross-attention layer it serves. The index is the layer's position among all
    attention processors in diffusers' order (down, up, then mid blocks; attn1 before attn2), so the image
    layers sit at odd numbers (1, 3, ..., 31 for SD 1.5)."""
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    layers = sorted(unet.cross_attentions(), key=lambda sa: group[sa[0].name.split(".")[0]])  # stable
    return {str(2 * k + 1): site_layer for k, site_layer in enumerate(layers)}


@dataclass
class IPAdapterConfig:
    image_proj: ImageProjConfig
    cross_attention_dim: int
    layers: dict[str, int]  # checkpoint index -> inner width of that cross-attention layer

    def __post_init__(self):
        # A layer's number is its place among all attention processors, self- and cross-attention alternating:
        # a UNet with an image layer at number i has at least (i + 1) / 2 of them, so larger numbers fit no UNet
        # (and would make the layer list that long).
        names = list(self.layers)
        bad = [i for i in names if not (isinstance(i, str) and i.isascii() and i.isdigit() and str(int(i)) == i)]
        if bad or not names:
            raise UserError(f"IP-Adapter layers must be numbered like a UNet's attention layers, found "
                            f"{bad[0] if bad else 'none'!r:.40}")
        top = max(map(int, names))
        if top >= 2 * len(names):
            raise UserError(f"IP-Adapter has a layer number {top} among {len(names)} layers: it fits no UNet")
        sizes = [self.cross_attention_dim, *self.layers.values()]
        if not all(type(n) is int and 0 < n < 2**31 for n in sizes):
            raise UserError(f"IP-Adapter layer widths must be positive integers, found {sizes}"[:200])
        self.layers = dict(sorted(self.layers.items(), key=lambda kv: int(kv[0])))

    @classmethod
    def from_dict(cls, d: dict) -> "IPAdapterConfig":
        try:
            return cls(ImageProjConfig(**d["image_proj"]), d["cross_attention_dim"], dict(d["layers"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"IP-Adapter config.json is incomplete or invalid ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict:
        return {"image_proj": self.image_proj.to_dict(), "cross_attention_dim": self.cross_attention_dim,
                "layers": self.layers}


class IPAdapter(nn.Module):
    """`image_proj` and one `ip_adapter.<index>` (to_k_ip, to_v_ip) per cross-attention layer."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = config
        self.image_proj = build_image_proj(config.image_proj)
        self._lora: dict[str, mx.array] = {}  # FaceID: its UNet LoRA (faceid.py fuses it); not a parameter here
        # a list indexed like the checkpoint; the even places (self-attention) hold no weights
        last = max(int(i) for i in config.layers)
        self.ip_adapter = [
            IPAttention(config.cross_attention_dim, config.layers[str(i)]) if str(i) in config.layers else nn.Identity()
            for i in range(last + 1)
        ]

    def layers(self) -> dict[str, IPAttention]:
        return {i: self.ip_adapter[int(i)] for i in self.config.layers}

    @property
    def dtype(self) -> mx.Dtype:
        return next(iter(self.layers().values())).to_k_ip.weight.dtype

    def check_unet(self, unet: UNet2DConditionModel) -> dict[Site, IPAttention]:
        """This adapter's layers by the cross-attention they serve; fails naming both sides when it was made
        for another UNet. (The UNet is not changed: adapters stay separate modules.)"""
        slots = cross_attention_slots(unet)
        ctx = unet.config.cross_attention_dim[0]
        mine = self.config
        if mine.cross_attention_dim != ctx or set(mine.layers) != set(slots):
            raise UserError(
                f"adapter was made for a UNet with {len(mine.layers)} cross-attention layers of "
                f"{mine.cross_attention_dim}-d text context ({model_family(mine.cross_attention_dim)}), "
                f"this UNet has {len(slots)} of {ctx}-d ({model_family(ctx)})"
            )
        for i, (_, layer) in slots.items():
            if layer.to_q.weight.shape[0] != mine.layers[i]:
                raise UserError(f"adapter layer {i} is {mine.layers[i]} wide, the UNet's is {layer.to_q.weight.shape[0]}")
        return {site: self.ip_adapter[int(i)] for i, (site, _) in slots.items()}

    def check_encoder(self, encoder_config) -> None:
        p = self.config.image_proj
        hidden = p.reads_hidden_states
        width = encoder_config.hidden_size if hidden else encoder_config.projection_dim
        if p.clip_width is None:
            raise UserError("this FaceID adapter reads no CLIP features (give it face embeddings)")
        if width != p.clip_width:
            raise UserError(f"adapter expects a {encoder_name(p.clip_width, hidden)} encoder, "
                            f"got {encoder_name(width, hidden)}")


def model_family(context_dim: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(context_dim, "unknown family")


# ---------------------------------------------------------------------------------------------------
# Reference images -> features -> tokens


@dataclass
class Features:
    """CLIP features of reference images for one adapter: `cond` per image, `uncond` the CFG counterpart."""

    cond: mx.array  # (n, D) image_embeds or (n, tokens, hidden) penultimate hidden states; FaceID: (n, 512) faces
    uncond: mx.array  # same shape: the null image (or the negative image); FaceID: zeros
    hidden_states: bool
    face: bool = False  # cond/uncond are face identity embeddings (faceid.py)
    clip: mx.array | None = None  # FaceID Plus: CLIP hidden states of the aligned face crops, and of the null image
    clip_uncond: mx.array | None = None


def encode_images(
    encoder: CLIPVisionModel, images: list[Image.Image], hidden_states: bool, fit: str = "crop",
    negative: Image.Image | None = None,
) -> Features:
    """CLIP features as diffusers' IP-Adapter pipeline computes them, null features included.

    The null (unconditional) features are zero embeds for base adapters, and the encoding of an all-zero
    *normalised* image (CLIP-mean grey) for hidden-state adapters, as in the reference implementation.
    """
    c = encoder.config
    dtype = encoder.vision_model.pre_layrnorm.weight.dtype  # a float weight even when quantized
    pixels = mx.array(clip_pixels(images, c.image_size, fit)).astype(dtype)
    run = encoder.penultimate if hidden_states else encoder.image_embeds
    cond = run(pixels)
    if negative is not None:
        uncond = run(mx.array(clip_pixels([negative], c.image_size, fit)).astype(dtype))
    elif hidden_states:
        uncond = run(mx.zeros_like(pixels[:1]))
    else:
        uncond = mx.zeros_like(cond[:1])
    uncond = mx.broadcast_to(uncond, cond.shape)
    mx.eval(cond, uncond)
    return Features(cond, uncond, hidden_states)


def combine(x: mx.array, weights: list[float], mode: str) -> mx.array:
    """Blend the features of several reference images (axis 0) before projection."""
    divisor = weights[1:] if mode == "subtract" else weights
    if mode in ("average", "norm-average", "subtract") and len(divisor) and sum(divisor) == 0:
        raise UserError(f"--combine {mode}: the image weights it averages add up to 0 "
                        f"({', '.join(map(str, divisor))}); nothing to divide by")
    w = mx.array(weights, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    if mode == "concat":  # kept apart: their tokens are joined; a weight scales an image's features
        return x * w
    if mode == "average":
        return (x * w).sum(0, keepdims=True) / w.sum()
    if mode == "norm-average":  # each image counts by direction alone, then the mean length is restored
        norms = mx.linalg.norm(x, axis=-1, keepdims=True)
        mean = ((x / norms) * w).sum(0, keepdims=True) / w.sum()
        return mean * (norms * w).sum(0, keepdims=True) / w.sum()
    if mode == "subtract":  # the first image minus (the weighted mean of) the others
        if x.shape[0] < 2:
            raise UserError("--combine subtract needs at least two images")
        rest = (x[1:] * w[1:]).sum(0, keepdims=True) / w[1:].sum()
        return x[:1] * w[:1] - rest
    if mode in ("add", "max", "min"):  # ComfyUI's IPAdapterCombineEmbeds over the weighted features
        return getattr(mx, {"add": "sum"}.get(mode, mode))(x * w, axis=0, keepdims=True)
    raise UserError(f"unknown combine mode {mode!r} (choose from {', '.join(COMBINE_MODES)})")


@dataclass
class ImagePrompt:
    """What one loaded adapter is given: reference images (or saved features) and how to use them."""

    images: list[Image.Image] = field(default_factory=list)
    features: Features | None = None  # instead of images (saved embeddings: no vision tower needed)
    weights: list[float] | None = None  # one per image (default 1)
    negative: Image.Image | None = None  # replaces the null image in the unconditional branch
    combine: str = "concat"
    # None: the adapter's own scale (load_ip_adapter / set_ip_adapter_scale); a number, or diffusers' per-block
    # dict ({"up": {"block_0": [0.0, 1.0, 0.0]}}: the style block of SDXL)
    scale: float | dict | None = None
    # "crop" (CLIPImageProcessor's centre crop), "pad" (keep the whole image), or "tiles" (ComfyUI's IPAdapter
    # Tiled: each image cut into up to 4 square tiles, each acting on its part of the picture: images.tile_reference)
    fit: str = "crop"
    # steering (steering.py): ComfyUI_IPAdapter_plus' weight types and layer weights, and when it acts
    weight_type: str = "linear"
    layer_weights: str | dict | None = None  # "3:1.0,6:0.5": transformer index -> weight factor
    composition_weight: float = 1.0  # the style-and-composition types' weight on the composition layers
    start_at: float = 0.0  # fractions of the steps (timing "step") or ComfyUI's percentages (timing "sigma")
    end_at: float = 1.0
    timing: str = "step"
    masks: list[Image.Image] | None = None  # one per image: each acts only where its mask is white
    embeds_scaling: str = "V"  # how the scale enters the attention (EMBEDS_SCALINGS, ComfyUI's names)
    boost: float | None = None  # precise types: ComfyUI's style_boost / composition_boost (None: the weight)
    # style-and-composition types: a separate layout reference, its tokens on the composition layers (ComfyUI's
    # image_composition)
    composition_images: list[Image.Image] | None = None
    # InstantStyle's content subtraction: image embeds -= scale * the pooled (projected) text embedding of this
    # prompt; for adapters whose image embeds are as wide as the text projection (SDXL ip-adapter_sdxl, ViT-bigG)
    negative_content: str | None = None
    negative_content_scale: float = 1.0
    # FaceID (faceid.py): identity embeddings, (n, 512) one per face (or read from --face-image with insightface);
    # for the Plus adapters `images` are the aligned face crops their CLIP branch reads
    face_embeds: object | None = None  # numpy or MLX array
    # Plus v2: the scale of the perceiver output added to the identity tokens (None: 1 for a v2 file, no shortcut
    # for v1; a number turns the shortcut on, for a v2 file under another name)
    faceid_v2_weight: float | None = None


def image_tokens(adapter: IPAdapter, features: Features, prompt: ImagePrompt, batch: int, guided: bool) -> mx.array:
    """(batch or 2*batch, n_tokens, C) tokens, [uncond, cond] when guided, like the text embeddings."""
    n = features.cond.shape[0]
    weights = prompt.weights or [1.0] * n
    if len(weights) != n:
        raise UserError(f"{len(weights)} image weights for {n} images")
    if prompt.combine not in COMBINE_MODES:
        raise UserError(f"unknown combine mode {prompt.combine!r} (choose from {', '.join(COMBINE_MODES)})")
    cond = combine(features.cond, weights, prompt.combine)
    # the null image stays the null image whatever the blend; with concat it is repeated once per image
    uncond = features.uncond[: cond.shape[0]]
    clip = None if features.clip is None else combine(features.clip, weights, prompt.combine)
    clip_uncond = None if clip is None else features.clip_uncond[: clip.shape[0]]

    def project(f: mx.array, clip: mx.array | None) -> mx.array:
        f = f.astype(adapter.dtype)
        if clip is not None:  # FaceID Plus: identity + CLIP hidden states of the face crop
            tokens = adapter.image_proj(f, clip.astype(adapter.dtype), prompt.faceid_v2_weight)
        else:  # portrait-unnorm's Resampler reads each face as a one-token sequence
            tokens = adapter.image_proj(f[:, None] if features.face and f.ndim == 2 and
                                        adapter.config.image_proj.kind == "resampler" else f)
        return tokens.reshape(1, -1, tokens.shape[-1])  # several images: their tokens joined in order

    cond_t = project(cond, clip)
    cond_t = mx.broadcast_to(cond_t, (batch, *cond_t.shape[1:]))
    if not guided:
        return cond_t
    uncond_t = mx.broadcast_to(project(uncond, clip_uncond), cond_t.shape)
    return mx.concatenate([uncond_t, cond_t])


# ---------------------------------------------------------------------------------------------------
# Saved embeddings: encode once, generate many times without the vision tower

EMBEDS_FORMAT = "ipadapter-mlx-embeds"


def save_features(path: str, features: Features, info: dict | None = None) -> None:
    """A safetensors file with `cond` and `uncond` features; written to a temp file, then renamed."""
    import json

    from .files import atomic_file

    meta = {"format": EMBEDS_FORMAT, "hidden_states": json.dumps(features.hidden_states),
            "info": json.dumps(info or {})}
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), {"cond": features.cond, "uncond": features.uncond}, metadata=meta)


def load_features(path: str) -> Features:
    """Features saved by `save_features`, checked: both arrays, same shape, one float dtype, the right rank."""
    import json

    from .loading import read_safetensors

    arrays, meta = read_safetensors(path, what="embeddings file")
    if meta.get("format") != EMBEDS_FORMAT or "cond" not in arrays or "uncond" not in arrays:
        raise UserError(f"{path}: not an embeddings file written by `python -m ipadapter_mlx embed`")
    try:
        hidden = json.loads(meta.get("hidden_states", ""))
    except ValueError:
        hidden = None
    if type(hidden) is not bool:
        raise UserError(f"{path}: embeddings file without a true/false hidden_states entry")
    cond, uncond = arrays["cond"], arrays["uncond"]
    rank = 3 if hidden else 2  # (images, tokens, width) penultimate states, or (images, width) image embeds
    if (cond.ndim != rank or cond.shape != uncond.shape or cond.shape[0] == 0 or cond.dtype != uncond.dtype
            or not mx.issubdtype(cond.dtype, mx.floating)):
        raise UserError(f"{path}: malformed embeddings: cond {tuple(cond.shape)} {cond.dtype}, uncond "
                        f"{tuple(uncond.shape)} {uncond.dtype}; expected two equal float arrays of rank {rank}")
    return Features(cond, uncond, hidden)


def join_features(parts: list[Features]) -> Features:
    """Several embeddings files for one adapter: their images in order."""
    if len({p.hidden_states for p in parts}) > 1 or len({p.cond.shape[1:] for p in parts}) > 1:
        raise UserError("the embeddings files given to one adapter were made for different encoders")
    return Features(mx.concatenate([p.cond for p in parts]), mx.concatenate([p.uncond for p in parts]),
                    parts[0].hidden_states)
