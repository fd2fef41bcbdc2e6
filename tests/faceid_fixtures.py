"""Tiny IP-Adapter-FaceID checkpoints in the real layout: tencent's {"image_proj": ..., "ip_adapter": ...} .bin
written with torch.save, with the LoRA keys the released FaceID / Plus / SDXL files carry (rank 128 there, 4 here,
on q/k/v/out of every attention processor, attn1 and attn2), laid out like h94/IP-Adapter-FaceID."""

from __future__ import annotations

from pathlib import Path

import torch

from ip_fixtures import ENCODERS, perceiver_layers, rand

ID_DIM = 16  # stands for ArcFace's 512; the identity MLP is 2x wide as released (diffusers' Plus assumes it)
RANK = 4
# variant -> (file, projection kind, tokens per face, LoRA in the file)
FACEID_VARIANTS = {
    "faceid": ("ip-adapter-faceid_sd15.bin", "faceid", 4, True),
    "plus": ("ip-adapter-faceid-plus_sd15.bin", "plus", 4, True),
    "plusv2": ("ip-adapter-faceid-plusv2_sd15.bin", "plus", 4, True),
    "portrait": ("ip-adapter-faceid-portrait_sd15.bin", "faceid", 16, False),
    "portrait-unnorm": ("ip-adapter-faceid-portrait_sdxl_unnorm.bin", "resampler", 16, False),
}


def faceid_proj(kind: str, cross: int, tokens: int, g, clip_hidden: int = ENCODERS["models"]["hidden_size"]) -> dict:
    mlp = {"proj.0.weight": rand(g, 2 * ID_DIM, ID_DIM), "proj.0.bias": rand(g, 2 * ID_DIM),
           "proj.2.weight": rand(g, tokens * cross, 2 * ID_DIM), "proj.2.bias": rand(g, tokens * cross),
           "norm.weight": 1 + rand(g, cross), "norm.bias": rand(g, cross)}
    if kind == "faceid":
        return mlp
    dim, inner = cross, 64  # the perceiver works at the UNet's width, 64-wide heads (diffusers assumes both)
    w = {"proj_in.weight": rand(g, dim, clip_hidden if kind == "plus" else ID_DIM),
         "proj_in.bias": rand(g, dim), "proj_out.weight": rand(g, cross, dim), "proj_out.bias": rand(g, cross),
         "norm_out.weight": 1 + rand(g, cross), "norm_out.bias": rand(g, cross)}
    w.update(perceiver_layers(g, dim, inner))
    if kind == "resampler":  # portrait-unnorm: a plus Resampler (learned queries) over the raw face embedding
        return w | {"latents": rand(g, 1, tokens, dim, scale=1.0)}
    return mlp | {f"perceiver_resampler.{k}": v for k, v in w.items()}


def faceid_layers(unet, g, lora: bool) -> dict:
    """to_k_ip/to_v_ip on the cross-attention processors and, with `lora`, to_{q,k,v,out}_lora.{down,up} on every
    processor, numbered by diffusers' own attn_processors order (the authors' ModuleList of processors)."""
    modules = dict(unet.named_modules())
    w = {}
    for i, name in enumerate(unet.attn_processors):
        attn = modules[name[: -len(".processor")]]
        inner, ctx = attn.to_k.weight.shape
        if name.endswith("attn2.processor"):
            w[f"{i}.to_k_ip.weight"] = rand(g, inner, ctx)
            w[f"{i}.to_v_ip.weight"] = rand(g, inner, ctx)
        if lora:
            for proj, width in (("to_q", inner), ("to_k", ctx), ("to_v", ctx), ("to_out", inner)):
                w[f"{i}.{proj}_lora.down.weight"] = rand(g, RANK, width, scale=0.3)
                w[f"{i}.{proj}_lora.up.weight"] = rand(g, inner, RANK, scale=0.3)
    return w


def make_faceid_repo(root: Path, unet, seed: int = 0, variants: dict = FACEID_VARIANTS) -> Path:
    """root/<file> for each variant (the SD 1.5 names; the UNet decides the family)."""
    root.mkdir(parents=True, exist_ok=True)
    cross = unet.config.cross_attention_dim
    for i, (variant, (file, kind, tokens, lora)) in enumerate(variants.items()):
        g = torch.Generator().manual_seed(seed + 200 + i)
        torch.save({"image_proj": faceid_proj(kind, cross, tokens, g), "ip_adapter": faceid_layers(unet, g, lora)},
                   root / file)
    return root
