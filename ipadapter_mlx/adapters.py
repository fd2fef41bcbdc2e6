"""The IP-Adapters loaded into a pipeline, as a set: load, unload, scales, their image encoders, and each
generation's image conditions. Adapters stay separate modules: the UNet's own parameters never change."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from . import discovery, steering
from .conditioning import ImageCondition, Site
from .errors import UserError, finite
from .images import mask_array
from .ip_adapter import Features, ImagePrompt, IPAdapter, encode_images, image_tokens
from .loaded import LoadOrder
from .loading import load_component
from .models.attention import EMBEDS_SCALINGS, IPAttention

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    ref: str
    adapter: IPAdapter
    layers: dict[Site, IPAttention]  # the cross-attention each of its layers serves
    file: Path
    hub_ref: tuple[str, str] | None
    encoder_ref: str | None  # the user's --image-encoder, if any
    scale: float | dict  # a number, or diffusers' per-block dict
    encoder_folder: Path | None = None
    lora: object | None = None  # FaceID: the LoRA it fused into the UNet (faceid.py), removed with it


class AdapterSet(LoadOrder[LoadedAdapter]):
    """Loaded adapters in load order (index them like a list) and the vision towers they share."""

    what = "IP-Adapter"

    def __init__(self, dtype: mx.Dtype, quantize: tuple[int, int] | None = None):
        super().__init__()
        self.dtype, self.quantize = dtype, quantize
        self.encoders: dict[Path, object] = {}  # converted folder -> CLIPVisionModel, shared between adapters

    def load(self, ref: str, unet, image_encoder: str | None = None, scale: float | dict = 1.0) -> int:
        """Add an adapter (preset, `REPO:PATH`, file or converted folder), checked against `unet` (its structure
        is enough: a lazily built UNet costs no memory); returns its index."""
        from .checkpoints.adapter_files import read_ip_adapter

        if not isinstance(scale, dict):
            finite("IP-Adapter scale", scale)
        file, hub_ref = discovery.resolve_ip_adapter(ref)
        adapter = read_ip_adapter(file, self.dtype)
        layers = adapter.check_unet(unet)
        steering.block_scales(scale, layers)  # a per-block dict is checked against this UNet now
        self.loaded.append(LoadedAdapter(ref, adapter, layers, file, hub_ref, image_encoder, scale))
        return len(self.loaded) - 1

    def set_scales(self, *scales: float | dict) -> None:
        """One scale per adapter: a number or diffusers' per-block dict (checked against the adapter's layers)."""
        if len(scales) != len(self.loaded):
            raise UserError(f"{len(scales)} scales for {len(self.loaded)} loaded adapters")
        for loaded, scale in zip(self.loaded, scales):
            if not isinstance(scale, dict):
                finite(f"IP-Adapter scale for {loaded.ref}", scale)
            steering.block_scales(scale, loaded.layers)
        for loaded, scale in zip(self.loaded, scales):
            loaded.scale = scale

    # -- image encoders -------------------------------------------------------------------------------

    def encoder_folder(self, index: int = 0) -> Path:
        """The converted folder of the vision tower adapter `index` reads (found and converted on first use,
        not loaded)."""
        la = self.loaded[index]
        if la.encoder_folder is None:
            la.encoder_folder, source = discovery.resolve_image_encoder(la.adapter, la.file, la.hub_ref,
                                                                        la.encoder_ref)
            log.info("image encoder for %s: %s", la.ref, source)
        return la.encoder_folder

    def encoder(self, index: int = 0):
        folder = self.encoder_folder(index)
        if folder not in self.encoders:
            self.encoders[folder] = load_component(folder, "image_encoder", self.dtype, self.quantize)
        return self.encoders[folder]

    def encode(self, images: list[Image.Image], index: int = 0, fit: str = "crop",
               negative: Image.Image | None = None) -> Features:
        """CLIP features of reference images, as adapter `index` reads them (embeds or hidden states)."""
        if not images:
            raise UserError("no reference image given")
        hidden = self.loaded[index].adapter.config.image_proj.reads_hidden_states
        return encode_images(self.encoder(index), images, hidden, fit, negative)

    # -- one generation -------------------------------------------------------------------------------

    def conditions(self, prompts: list[ImagePrompt | None], batch: int, guided: bool,
                   timeline: steering.Timeline | None = None, size: tuple[int, int] | None = None,
                   pooled_text: Callable[[str], mx.array | None] | None = None) -> list[ImageCondition]:
        """One ImageCondition per adapter given an ImagePrompt (None leaves an adapter out of this call); its
        scale rule from the prompt's steering options (`timeline`: the run's steps, for start/end); `size`:
        the picture's (height, width), which masks are resized to; `pooled_text`: a prompt -> its pooled,
        projected text embedding (None without a projection), for a negative content prompt."""
        if len(prompts) != len(self.loaded):
            raise UserError(f"{len(prompts)} image prompts for {len(self.loaded)} loaded IP-Adapters")
        out = []
        for i, (la, p) in enumerate(zip(self.loaded, prompts)):
            if p is None:
                continue
            if p.fit == "tiles":
                p = tiled(la.ref, p)
            scale = la.scale if p.scale is None else p.scale
            if not isinstance(scale, dict):
                finite(f"image prompt scale for {la.ref}", scale)
            rule = steering.scale_rule(la.layers, scale, p.weight_type, p.layer_weights, p.composition_weight,
                                       p.start_at, p.end_at, p.timing, timeline, p.boost)
            for w in p.weights or []:
                finite(f"image weight for {la.ref}", w)
            feats = self._checked(la, p.features or self._features(i, p))
            if p.negative_content is not None:
                feats = self._without_content(la, p, feats, pooled_text)
            if p.embeds_scaling not in EMBEDS_SCALINGS:
                raise UserError(f"unknown embeds scaling {p.embeds_scaling!r} (choose from {', '.join(EMBEDS_SCALINGS)})")
            masks = self._masks(la.ref, p, feats.cond.shape[0], size)
            tokens = image_tokens(la.adapter, feats, p, batch, guided).astype(self.dtype)
            for part, part_tokens in self._token_parts(i, la, p, tokens, batch, guided, masks).items():
                layers = {s: layer for s, layer in la.layers.items() if s.index in part}
                if layers and part_tokens is not None:
                    out.append(ImageCondition(layers, part_tokens, rule, masks, p.embeds_scaling))
        return out

    def _features(self, i: int, p: ImagePrompt) -> Features:
        """What adapter `i` reads from this prompt: CLIP features of its images, or (FaceID) its faces."""
        from . import faceid

        if faceid.check_prompt(self.loaded[i], p):
            return faceid.face_features(self, i, p)
        return self.encode(p.images, i, p.fit, p.negative)

    @staticmethod
    def _checked(la: LoadedAdapter, feats: Features) -> Features:
        want = la.adapter.config.image_proj
        if feats.face or want.face:
            from .faceid import check_features

            return check_features(la, feats)
        if feats.hidden_states != want.reads_hidden_states or feats.cond.shape[-1] != want.input_dim:
            kind = lambda h: "hidden states" if h else "image embeds"  # noqa: E731
            raise UserError(f"adapter {la.ref} reads {want.input_dim}-d {kind(want.reads_hidden_states)}, "
                            f"the embeddings given are {feats.cond.shape[-1]}-d {kind(feats.hidden_states)}")
        return feats

    @staticmethod
    def _without_content(la: LoadedAdapter, p: ImagePrompt, feats: Features, pooled_text) -> Features:
        """InstantStyle: each image's embeds minus scale x the pooled text embedding of the content to leave
        out; the null image's stay (its tokens are those of zero embeds there too)."""
        finite(f"negative content scale for {la.ref}", p.negative_content_scale)
        if feats.hidden_states:
            raise UserError(f"a negative content prompt needs an adapter reading image embeds (InstantStyle's "
                            f"subtraction); {la.ref} reads hidden states")
        pooled = pooled_text(p.negative_content) if pooled_text else None
        if pooled is None:
            raise UserError("a negative content prompt needs a text encoder with a projection (SDXL's second); "
                            "this model has none")
        if pooled.shape[-1] != feats.cond.shape[-1]:
            raise UserError(f"negative content: the text projection is {pooled.shape[-1]}-d, adapter {la.ref}'s "
                            f"image embeds are {feats.cond.shape[-1]}-d; they must match (SDXL with ip-adapter_sdxl "
                            "and its ViT-bigG encoder: 1280 and 1280)")
        content = p.negative_content_scale * pooled.astype(mx.float32)
        return replace(feats, cond=(feats.cond.astype(mx.float32) - content).astype(feats.cond.dtype))

    def _token_parts(self, i: int, la: LoadedAdapter, p: ImagePrompt, tokens: mx.array, batch: int, guided: bool,
                     masks) -> dict[frozenset[int], mx.array | None]:
        """Transformer indices -> the tokens they attend to ([uncond, cond] halves when guided; None: nothing).
        ComfyUI's precise types swap the halves on some layers (`uncond = cond; cond = cond * 0`: zero tokens
        give zero keys and values, so no image attention in the cond half; unguided, nothing at all there); a
        composition image replaces the cond half on the composition layers (its `cond_alt`)."""
        every = frozenset(s.index for s in la.layers)
        swapped = frozenset(steering.swapped_indices(p.weight_type, la.layers))
        cond = tokens[batch:] if guided else tokens
        parts = {every - swapped: tokens, swapped: mx.concatenate([cond, mx.zeros_like(cond)]) if guided else None}
        if not p.composition_images:
            return parts
        steering.check_options(p.weight_type, composition_image=True)
        feats = self._checked(la, self.encode(p.composition_images, i, p.fit, p.negative))
        if masks is not None and feats.cond.shape[0] != masks.shape[0]:
            raise UserError(f"IP-Adapter {la.ref}: with masks, give as many composition images as images "
                            f"({feats.cond.shape[0]} for {masks.shape[0]})")
        comp = image_tokens(la.adapter, feats, replace(p, weights=None), batch, guided).astype(self.dtype)
        if guided:
            uncond = tokens[:batch]
            if uncond.shape[1] != comp.shape[1]:  # concat of a different count: the null image once per image
                uncond = comp[:batch]
            comp = mx.concatenate([uncond, comp[batch:]])
        at = frozenset(steering.composition_indices(la.layers))
        return {every - swapped - at: tokens, swapped: parts[swapped], at: comp}

    @staticmethod
    def _masks(ref: str, p: ImagePrompt, n: int, size: tuple[int, int] | None) -> np.ndarray | None:
        """(n, height, width) 0/1 masks, one per image; their images are attended one by one (diffusers)."""
        if p.masks is None:
            return None
        if len(p.masks) != n:
            raise UserError(f"IP-Adapter {ref}: {len(p.masks)} masks for {n} images (give one per image)")
        if n > 1 and p.combine != "concat":
            raise UserError(f"IP-Adapter {ref}: masks need --combine concat (each masked image is attended on its "
                            f"own), got {p.combine}")
        if size is None:
            raise UserError("masks need the picture's size")
        return np.stack([mask_array(m, size[::-1]) for m in p.masks])


def tiled(ref: str, p: ImagePrompt) -> ImagePrompt:
    """fit="tiles" (ComfyUI's IPAdapter Tiled): each reference image becomes its tiles, each tile an image of its
    own with its weight and a mask of its box (within the image's mask, if given), attended one by one."""
    from .images import tile_reference

    if p.features is not None or p.face_embeds is not None:
        raise UserError(f"IP-Adapter {ref}: tiles cut reference pictures; saved embeddings and face embeddings are "
                        "already encoded")
    if len(p.images) != 1:  # ComfyUI tiles a batch position by position into one attention each: not this path
        raise UserError(f"IP-Adapter {ref}: tiles take one reference image, got {len(p.images)} (give each image "
                        "its own --ip-adapter entry)")
    if p.composition_images:
        raise UserError(f"IP-Adapter {ref}: tiles take no composition image (ComfyUI's tiled node neither)")
    for what, given in (("image weights", p.weights), ("masks", p.masks)):
        if given is not None and len(given) != 1:
            raise UserError(f"IP-Adapter {ref}: {len(given)} {what} for the one tiled image")
    tiles, masks = tile_reference(p.images[0], p.masks[0] if p.masks else None)
    # the tiles are attended one by one, as masked images are (one image: no blend to make)
    return replace(p, images=tiles, masks=masks, weights=p.weights and p.weights * len(tiles), fit="crop",
                   combine="concat")
