"""CLIP transformer (transformers' CLIPTextModel layout): text now, the vision tower reuses the encoder."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import CLIPTextConfig, CLIPVisionConfig
from ..errors import UserError
from . import attention
from .ops import gelu, quick_gelu


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}  # numpy on every core on the CPU (ops.py)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention.attention(q, k, v, self.heads, mask=mask))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise UserError(f"unsupported CLIP hidden_act {act!r} (supported: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, layers: int, act: str, eps: float):
        super().__init__()
        self.layers = [CLIPEncoderLayer(dim, heads, hidden, act, eps) for _ in range(layers)]

    def __call__(self, x: mx.array, mask: mx.array | None = None, num_layers: int | None = None) -> list[mx.array]:
        """Hidden states, transformers-style: [input, after layer 1, ..., after layer num_layers (default all)]."""
        states = [x]
        for layer in self.layers[:num_layers]:
            x = layer(x, mask)
            states.append(x)
        return states


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(positions, dim)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.token_embedding(ids) + self.position_embedding(mx.arange(ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size)
        self.encoder = CLIPEncoder(
            c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers, c.hidden_act,
            c.layer_norm_eps,
        )
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextOutput:
    def __init__(self, last_hidden_state: mx.array, hidden_states: list[mx.array], pooled: mx.array):
        self.last_hidden_state = last_hidden_state
        self.hidden_states = hidden_states
        self.pooler_output = pooled


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel (and ...WithProjection when the config has a projection)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array) -> CLIPTextOutput:
        L = input_ids.shape[1]
        x = self.text_model.embeddings(input_ids)
        mask = nn.MultiHeadAttention.create_additive_causal_mask(L).astype(x.dtype)
        states = self.text_model.encoder(x, mask)
        last = self.text_model.final_layer_norm(states[-1])
        # pooled = the first EOS position (the highest id in CLIP's vocab, unless the config names the EOS id)
        eos = self.config.eos_token_id
        if eos is None:
            pos = mx.argmax(input_ids, axis=-1)
        else:
            pos = mx.argmax((input_ids == eos).astype(mx.int32), axis=-1)
        pooled = last[mx.arange(last.shape[0]), pos]
        if "text_projection" in self:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(last, states, pooled)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((c.hidden_size,))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels)
        B, _, _, D = patches.shape
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (B, 1, D))
        x = mx.concatenate([cls, patches.reshape(B, -1, D)], axis=1)
        return x + self.position_embedding.weight[None]


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(
            c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers, c.hidden_act,
            c.layer_norm_eps,
        )
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModelWithProjection: pixels (B, H, W, 3), normalised, -> features."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def image_embeds(self, pixels: mx.array) -> mx.array:
        """The projected pooled embedding (B, projection_dim): what base IP-Adapters read."""
        states = self._states(pixels, self.config.num_hidden_layers)
        return self.visual_projection(self.vision_model.post_layernorm(states[-1][:, 0]))

    def penultimate(self, pixels: mx.array) -> mx.array:
        """hidden_states[-2] (B, tokens, hidden), before post-layernorm: what plus/full-face adapters read.

        The last layer is not run at all."""
        return self._states(pixels, self.config.num_hidden_layers - 1)[-1]

    def hidden_states(self, pixels: mx.array) -> list[mx.array]:
        return self._states(pixels, self.config.num_hidden_layers)

    def _states(self, pixels: mx.array, layers: int) -> list[mx.array]:
        vm = self.vision_model
        return vm.encoder(vm.pre_layrnorm(vm.embeddings(pixels)), num_layers=layers)
