"""Tiny IP-Adapter checkpoints in the tencent format, laid out like the h94/IP-Adapter Hub repo."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from conftest import perturb

# Two CLIP vision towers standing in for ViT-H/14 (models/) and ViT-bigG/14 (sdxl_models/): real 224 px,
# patch 14 geometry (257 tokens), tiny widths, exact GELU as the real ones.
ENCODERS = {
    "models": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   projection_dim=24, image_size=224, patch_size=14, hidden_act="gelu"),
    "sdxl_models": dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                        projection_dim=20, image_size=224, patch_size=14, hidden_act="gelu"),
}
# variant -> (file, folder of the encoder it needs, projection kind)
VARIANTS = {
    "base-bin": ("ip-adapter_sd15.bin", "models", "linear"),
    "base": ("ip-adapter_sd15.safetensors", "models", "linear"),
    "light": ("ip-adapter_sd15_light.bin", "models", "linear"),
    "plus": ("ip-adapter-plus_sd15.bin", "models", "resampler"),
    "plus-face": ("ip-adapter-plus-face_sd15.safetensors", "models", "resampler"),
    "full-face": ("ip-adapter-full-face_sd15.bin", "models", "mlp"),
    "vit-g": ("ip-adapter_sd15_vit-G.safetensors", "sdxl_models", "linear"),
}


def rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def perceiver_layers(g, dim: int, inner: int, depth: int = 4) -> dict:
    """The Resampler's attention + feed-forward layers (ff x4), in the released files' names."""
    w = {}
    for i in range(depth):
        p = f"layers.{i}."
        w.update({p + "0.norm1.weight": 1 + rand(g, dim), p + "0.norm1.bias": rand(g, dim),
                  p + "0.norm2.weight": 1 + rand(g, dim), p + "0.norm2.bias": rand(g, dim),
                  p + "0.to_q.weight": rand(g, inner, dim), p + "0.to_kv.weight": rand(g, 2 * inner, dim),
                  p + "0.to_out.weight": rand(g, dim, inner), p + "1.0.weight": 1 + rand(g, dim),
                  p + "1.0.bias": rand(g, dim), p + "1.1.weight": rand(g, 4 * dim, dim),
                  p + "1.3.weight": rand(g, dim, 4 * dim)})
    return w


def image_proj(kind: str, enc: dict, cross: int, g) -> dict:
    if kind == "linear":
        return {"proj.weight": rand(g, 4 * cross, enc["projection_dim"]), "proj.bias": rand(g, 4 * cross),
                "norm.weight": 1 + rand(g, cross), "norm.bias": rand(g, cross)}
    hidden = enc["hidden_size"]
    if kind == "mlp":
        return {"proj.0.weight": rand(g, hidden, hidden), "proj.0.bias": rand(g, hidden),
                "proj.2.weight": rand(g, cross, hidden), "proj.2.bias": rand(g, cross),
                "proj.3.weight": 1 + rand(g, cross), "proj.3.bias": rand(g, cross)}
    dim, inner, queries = 32, 64, 6  # one 64-wide head, depth 4 and ff x4 as released (diffusers assumes them)
    w = {"latents": rand(g, 1, queries, dim, scale=1.0), "proj_in.weight": rand(g, dim, hidden),
         "proj_in.bias": rand(g, dim), "proj_out.weight": rand(g, cross, dim), "proj_out.bias": rand(g, cross),
         "norm_out.weight": 1 + rand(g, cross), "norm_out.bias": rand(g, cross)}
    w.update(perceiver_layers(g, dim, inner))
    return w


def ip_layers(unet, g) -> dict:
    """to_k_ip/to_v_ip numbered by diffusers' own attn_processors order (the reference for the index rule)."""
    modules = dict(unet.named_modules())
    w = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = modules[name[: -len(".processor")]]
            inner, ctx = attn.to_k.weight.shape
            w[f"{i}.to_k_ip.weight"] = rand(g, inner, ctx)
            w[f"{i}.to_v_ip.weight"] = rand(g, inner, ctx)
    return w


# The SDXL adapters sit in sdxl_models/; the vit-h ones need the encoder in models/ (as on the Hub).
SDXL_VARIANTS = {
    "sdxl": ("ip-adapter_sdxl.safetensors", "sdxl_models", "linear"),
    "sdxl-vit-h": ("ip-adapter_sdxl_vit-h.safetensors", "models", "linear"),
    "plus-sdxl-vit-h": ("ip-adapter-plus_sdxl_vit-h.safetensors", "models", "resampler"),
    "plus-face-sdxl-vit-h": ("ip-adapter-plus-face_sdxl_vit-h.bin", "models", "resampler"),
}


def make_adapter_repo(root: Path, unet, seed: int = 0, variants: dict = VARIANTS, folder: str = "models") -> Path:
    """root/<folder>/*.bin|safetensors, root/models/image_encoder, root/sdxl_models/image_encoder."""
    for encoder_folder, cfg in ENCODERS.items():
        torch.manual_seed(seed)
        enc = perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg)), seed)
        enc.save_pretrained(root / encoder_folder / "image_encoder")
    cross = unet.config.cross_attention_dim
    for i, (variant, (file, encoder, kind)) in enumerate(variants.items()):
        g = torch.Generator().manual_seed(seed + 100 + i)
        proj, layers = image_proj(kind, ENCODERS[encoder], cross, g), ip_layers(unet, g)
        path = root / folder / file
        if path.suffix == ".bin":
            torch.save({"image_proj": proj, "ip_adapter": layers}, path)
        else:
            flat = {f"image_proj.{k}": v for k, v in proj.items()} | {f"ip_adapter.{k}": v for k, v in layers.items()}
            save_file({k: v.contiguous() for k, v in flat.items()}, path)
    return root
