"""What the UNet is conditioned on: one object, built once per generation, resolved once per step, passed down
the UNet unchanged.

`Conditioning` holds the text context of the CFG batch, SDXL's added inputs, and one `ImageCondition` per adapter
in use: its `to_k_ip`/`to_v_ip` layers by the cross-attention they serve, its image tokens, and the rule that
gives each layer its scale at each step. `at(step, sigma)` resolves every rule for one step (per-layer and
per-step decisions are made there and nowhere else); each cross-attention layer then asks the result for its
image attention by its own name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import mlx.core as mx
import mlx.nn as nn


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


@dataclass
class ImageCondition:
    """One adapter's part of a generation."""

    layers: dict[Site, nn.Module]  # the cross-attention it serves -> that layer's IPAttention (to_k_ip, to_v_ip)
    tokens: mx.array  # (CFG batch, n_tokens, dim) image tokens, ordered like the text context
    scale: Union[float, ScaleRule] = 1.0

    def scale_at(self, site: Site, step: int, sigma: float) -> float:
        return self.scale(site, step, sigma) if callable(self.scale) else self.scale


@dataclass
class StepConditioning:
    """The conditioning of one step, every rule resolved: what each cross-attention layer attends to."""

    text: mx.array
    added: dict[str, mx.array] = field(default_factory=dict)  # SDXL: text_embeds, time_ids
    image: dict[str, list[tuple[nn.Module, mx.array, float]]] = field(default_factory=dict)

    def image_attention(self, name: str) -> list[tuple[nn.Module, mx.array, float]]:
        """(IPAttention, tokens, scale) for each adapter acting on the layer `name` at this step."""
        return self.image.get(name, [])


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
                    image.setdefault(site.name, []).append((layer, condition.tokens, scale))
        return StepConditioning(self.text, self.added, image)
