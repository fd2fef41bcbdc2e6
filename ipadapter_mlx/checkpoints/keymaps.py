"""Key-name tables: original single-file (LDM / A1111) names -> diffusers names. Data, not string edits.

Our MLX modules use diffusers' names, so a diffusers checkpoint needs no table at all. An original
checkpoint's block indices follow from the UNet/VAE config, so those prefix tables are generated from
it; the names inside each block are fixed tables below.
"""

from __future__ import annotations

from typing import Callable

from ..config import UNetConfig, VAEConfig

# Where each model lives inside an original single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# SDXL single files keep their two text encoders here (the second in OpenCLIP's own layout).
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP text transformer -> transformers' CLIPTextModelWithProjection. Its fused attention input
# projection (in_proj) is split into q/k/v and text_projection is transposed, in stable_diffusion.py.
OPENCLIP_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}
OPENCLIP_IGNORED = ("logit_scale",)

# Entries of an original checkpoint that are not weights of any module (training buffers, EMA copies).
ORIGINAL_IGNORED_PREFIXES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "model_ema.", "logvar", "lvlb_weights",
)
# Buffers some transformers/diffusers checkpoints carry that hold no learned weight.
IGNORED_SUFFIXES = (".position_ids",)

UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Old diffusers folders (before 0.14) still name the VAE attention like this.
DIFFUSERS_DEPRECATED_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _expand(pairs: list[tuple[str, str]], table: dict[str, str], src: str, dst: str) -> None:
    pairs.extend((f"{src}.{a}", f"{dst}.{b}") for a, b in table.items())


def unet_original_to_diffusers(c: UNetConfig) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) pairs for an LDM UNet, from the block layout in its config."""
    pairs = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("label_emb.0.0", "add_embedding.linear_1"),  # SDXL
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    n = len(c.block_out_channels)
    k = 1
    for i in range(n):  # input_blocks: each resnet (+ its attention), then the downsampler
        for j in range(c.layers_per_block[i]):
            _expand(pairs, UNET_RESNET, f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}"))
            k += 1
        if i < n - 1:
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
            k += 1
    _expand(pairs, UNET_RESNET, "middle_block.0", "mid_block.resnets.0")
    pairs.append(("middle_block.1", "mid_block.attentions.0"))
    _expand(pairs, UNET_RESNET, "middle_block.2", "mid_block.resnets.1")
    k = 0
    for i, kind in enumerate(c.up_block_types):  # output_blocks: resnet, attention?, upsampler on the last
        layers = c.layers_per_block[n - 1 - i] + 1
        for j in range(layers):
            _expand(pairs, UNET_RESNET, f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}")
            if kind.startswith("CrossAttn"):
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}"))
            if j == layers - 1 and i < n - 1:
                up = 2 if kind.startswith("CrossAttn") else 1
                pairs.append((f"output_blocks.{k}.{up}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
            k += 1
    return pairs


def vae_original_to_diffusers(c: VAEConfig) -> list[tuple[str, str]]:
    n = len(c.block_out_channels)
    pairs = [(f"{p}.norm_out", f"{p}.conv_norm_out") for p in ("encoder", "decoder")]
    for p in ("encoder", "decoder"):
        _expand(pairs, VAE_RESNET, f"{p}.mid.block_1", f"{p}.mid_block.resnets.0")
        _expand(pairs, VAE_RESNET, f"{p}.mid.block_2", f"{p}.mid_block.resnets.1")
        _expand(pairs, VAE_ATTENTION, f"{p}.mid.attn_1", f"{p}.mid_block.attentions.0")
    for i in range(n):
        for j in range(c.layers_per_block):
            _expand(pairs, VAE_RESNET, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        # the original decoder counts its levels from the bottom, diffusers from the top
        for j in range(c.layers_per_block + 1):
            _expand(pairs, VAE_RESNET, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}")
        pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv"))
    return pairs


def clip_text_key(key: str) -> str:
    """transformers < 5 saved CLIP text weights under `text_model.`; transformers 5 (and some files) without."""
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return "text_model." + key


def clip_vision_key(key: str) -> str:
    """The same for CLIPVisionModelWithProjection (`vision_model.*`, `visual_projection.*`)."""
    if key.startswith(("vision_model.", "visual_projection.")):
        return key
    return "vision_model." + key


def renamer(pairs: list[tuple[str, str]]) -> Callable[[str], str]:
    """key -> key with its longest matching prefix (whole dotted components only) replaced; unmatched keys stay as
    they are. The pairs go into a dict and each key's dotted prefixes are looked up longest first, so renaming a
    file's keys costs the keys, not keys x pairs (a crafted file's keys can make a table as long as itself)."""
    table = dict(pairs)
    if len(table) != len(pairs):  # a table is data written here: two entries for one prefix is a bug in it
        raise ValueError("a key table names one source prefix twice")

    def apply(key: str) -> str:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if (dst := table.get(".".join(parts[:n]))) is not None:
                return ".".join([dst, *parts[n:]])
        return key
    return apply
