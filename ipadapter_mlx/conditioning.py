"""What the UNet is conditioned on: one object, built once per generation, resolved once per step, passed down
the UNet unchanged.

`Conditioning` holds the text context of the CFG batch, SDXL's added inputs, and one `ImageCondition` per adapter
in use: its `to_k_ip`/`to_v_ip` layers by the cross-attention they serve, its image tokens, and the rule that
gives each layer its scale at each step. `at(step, sigma)` resolves every rule for one step (per-layer and
per-step decisions are made there and nowhere else); each cross-attention layer then asks the result for its
image attention by its own name.

Regional masks (diffusers' `ip_adapter_masks`): a masked adapter's images are attended one by one, each output
multiplied by its mask, downsampled to the layer's query count as `IPAdapterMaskProcessor.downsample` does. The
downsampling is done once per query count (attention level) and kept for the whole generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import math
from typing import Callable, NamedTuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass(frozen=True)
class Site:
    """Where a cross-attention layer sits: its diffusers module name
    (`down_blocks.2.attentions.1.transformer_blocks.0.attn2`) and ComfyUI's transformer index (one per
    Transformer2DModel, counted over the input, middle and output blocks: 16 on SD 1.5, 11 on SDXL)."""

    name: str
    index: int

    @property
    def block(self) -> str:
        """The Transformer2DModel the layer belongs to, e.g. `up_blocks.0.attentions.1`."""
        return self.name.split(".transformer_blocks.")[0]


# (site, step index, sigma) -> the scale of that layer at that step
ScaleRule = Callable[[Site, int, float], float]


def bicubic_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) -> size, as torch's F.interpolate(mode="bicubic", align_corners=False): Keys' cubic, a = -0.75,
    source x = (dst + 0.5) * in / out - 0.5, taps clamped at the border. Separable, so one axis at a time."""

    def weights(n_in: int, n_out: int) -> np.ndarray:  # (n_out, n_in)
        def cubic(t):  # Keys' kernel at distance t
            t, a = np.abs(t), -0.75
            return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                            np.where(t < 2, ((t - 5) * t + 8) * t * a - 4 * a, 0.0))

        src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5)
        base = np.floor(src)
        m = np.zeros((n_out, n_in), np.float64)
        for j in range(-1, 3):
            idx = np.clip(base + j, 0, n_in - 1).astype(int)
            np.add.at(m, (np.arange(n_out), idx), cubic(src - (base + j)))
        return m

    return weights(x.shape[0], size[0]) @ x.astype(np.float64) @ weights(x.shape[1], size[1]).T


def downsample_mask(mask: np.ndarray, queries: int) -> np.ndarray:
    """A (H, W) 0/1 mask -> (queries,) weights of one attention level, as diffusers'
    `IPAdapterMaskProcessor.downsample`: the level's grid guessed from the mask's aspect ratio, bicubic (not
    binarised again), then cut or zero-padded to `queries` (only when the mask and the picture differ in shape)."""
    h, w = mask.shape
    mask_h = max(1, int(math.sqrt(queries / (w / h))))  # at least one row, however wide the picture
    mask_h = mask_h + int(queries % mask_h != 0)
    mask_w = queries // mask_h
    flat = bicubic_resize(mask, (mask_h, mask_w)).reshape(-1)[:queries]
    return np.pad(flat, (0, queries - flat.size))


class ImageAttention(NamedTuple):
    """One softmax over one set of image tokens in one layer at one step."""

    layer: nn.Module  # the adapter's IPAttention (to_k_ip, to_v_ip) for this layer
    tokens: mx.array  # (CFG batch, n_tokens, dim)
    scale: float
    mask: mx.array | None = None  # (queries, 1): where the output acts (None: everywhere)
    scaling: str = "V"  # how the scale enters: EMBEDS_SCALINGS in models/attention.py


@dataclass
class ImageCondition:
    """One adapter's part of a generation."""

    layers: dict[Site, nn.Module]  # the cross-attention it serves -> that layer's IPAttention (to_k_ip, to_v_ip)
    tokens: mx.array  # (CFG batch, n_tokens, dim) image tokens, ordered like the text context
    scale: Union[float, ScaleRule] = 1.0
    # (n images, height, width) 0/1 at the picture's size: image i acts where masks[i] is 1; its tokens are the
    # i-th of n equal parts of `tokens`, attended on their own
    masks: np.ndarray | None = None
    scaling: str = "V"
    _levels: dict[int, list[mx.array]] = field(default_factory=dict, repr=False)  # queries -> downsampled masks

    def scale_at(self, site: Site, step: int, sigma: float) -> float:
        return self.scale(site, step, sigma) if callable(self.scale) else self.scale

    def attention(self, layer: nn.Module, scale: float, queries: int) -> list[ImageAttention]:
        """What this adapter adds to a layer of `queries` positions: one attention, or one per masked image."""
        if self.masks is None:
            return [ImageAttention(layer, self.tokens, scale, None, self.scaling)]
        if queries not in self._levels:
            self._levels[queries] = [mx.array(downsample_mask(m, queries)[:, None], dtype=self.tokens.dtype)
                                     for m in self.masks]
        groups = mx.split(self.tokens, len(self.masks), axis=1)
        return [ImageAttention(layer, t, scale, m, self.scaling) for t, m in zip(groups, self._levels[queries])]


@dataclass
class StepConditioning:
    """The conditioning of one step, every rule resolved: what each cross-attention layer attends to."""

    text: mx.array
    added: dict[str, mx.array] = field(default_factory=dict)  # SDXL: text_embeds, time_ids
    image: dict[str, list[tuple[ImageCondition, nn.Module, float]]] = field(default_factory=dict)

    def rows(self, take: Callable[[mx.array], mx.array]) -> "StepConditioning":
        """The conditioning of some rows of the batch: `take` cuts a batch-first tensor (parallel cfg)."""
        cut: dict[int, ImageCondition] = {}  # each adapter once, however many layers it serves
        for entries in self.image.values():
            for condition, _, _ in entries:
                if id(condition) not in cut:  # the masks' downsampled levels are shared, not redone
                    cut[id(condition)] = replace(condition, tokens=take(condition.tokens), _levels=condition._levels)
        image = {name: [(cut[id(c)], layer, scale) for c, layer, scale in entries]
                 for name, entries in self.image.items()}
        return StepConditioning(take(self.text), {k: take(v) for k, v in self.added.items()}, image)

    def image_attention(self, name: str, queries: int) -> list[ImageAttention]:
        """The image attentions acting on the layer `name` (of `queries` positions) at this step."""
        return [a for condition, layer, scale in self.image.get(name, [])
                for a in condition.attention(layer, scale, queries)]


@dataclass
class Conditioning:
    text: mx.array  # (CFG batch, 77, dim): [uncond, cond] when guided
    added: dict[str, mx.array] = field(default_factory=dict)
    images: list[ImageCondition] = field(default_factory=list)

    def at(self, step: int, sigma: float) -> StepConditioning:
        """Resolve every adapter's rule for this step. A layer whose scale is 0 is left out: it costs nothing."""
        image: dict[str, list] = {}
        for condition in self.images:
            for site, layer in condition.layers.items():
                scale = condition.scale_at(site, step, sigma)
                if scale != 0:
                    image.setdefault(site.name, []).append((condition, layer, scale))
        return StepConditioning(self.text, self.added, image)
