"""The shapes `bench` measures and the helpers both of its sides share. Plain Python and numpy: the diffusers
side (bench_diffusers.py) imports this file without importing the package, so that its process never loads MLX
or the package's BLAS routing and torch runs exactly as in a plain diffusers script."""

from __future__ import annotations

import resource
import sys
import time

# The shapes measured: SD 1.5's published configs, the ViT-H/14 image encoder, IP-Adapter plus.
SD15 = {
    "unet": dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=64),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, scaling_factor=0.18215),
    "image_encoder": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                          image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "resampler": dict(dim=768, depth=4, heads=12, queries=16),
}
# SDXL base + ViT-H/14 + IP-Adapter-plus-sdxl-vit-h.
SDXL = {
    "unet": dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128),
    "text_encoder": SD15["text_encoder"],
    "text_encoder_2": dict(SD15["text_encoder"], hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                           architectures=["CLIPTextModelWithProjection"]),
    "vae": dict(SD15["vae"], scaling_factor=0.13025),
    "image_encoder": SD15["image_encoder"],
    "resampler": dict(dim=1280, depth=4, heads=20, queries=16),
}
# A miniature of the same layout, for the smoke test and quick checks of the benchmark itself.
TINY = {
    "unet": dict(SD15["unet"], block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8),
    "text_encoder": dict(SD15["text_encoder"], vocab_size=1000, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4),
    "vae": dict(SD15["vae"], block_out_channels=[16, 32, 32, 32], norm_num_groups=8),
    "image_encoder": dict(SD15["image_encoder"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32),
    "resampler": dict(dim=32, depth=4, heads=1, queries=16),
}
TINY_SDXL = {
    **TINY,
    "unet": dict(SDXL["unet"], block_out_channels=[32, 64, 64], cross_attention_dim=64, attention_head_dim=[1, 2, 2],
                 transformer_layers_per_block=[1, 2, 2], norm_num_groups=8, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80),
    "text_encoder_2": dict(TINY["text_encoder"], projection_dim=32, architectures=["CLIPTextModelWithProjection"]),
}
SHAPES = {("sd15", False): SD15, ("sd15", True): TINY, ("sdxl", False): SDXL, ("sdxl", True): TINY_SDXL}


def added_conditioning(shapes: dict, to_array, pooled, size: int) -> dict:
    """SDXL's extra UNet inputs for a CFG batch of 2 (pooled text and size/crop ids), or nothing."""
    if "text_encoder_2" not in shapes:
        return {}
    ids = [[size, size, 0, 0, size, size]] * 2
    return {"text_embeds": pooled, "time_ids": to_array(ids)}


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def ip_adapter_weights(shapes: dict, unet_cross_dims: dict[str, int], rng) -> dict:
    """Random tencent-format IP-Adapter-plus weights for these shapes (numpy, flat keys)."""
    import numpy as np

    r, enc = shapes["resampler"], shapes["image_encoder"]
    ctx = shapes["unet"]["cross_attention_dim"]
    dim, inner = r["dim"], r["heads"] * 64

    def w(*s):
        return (rng.standard_normal(s) * 0.02).astype(np.float32)

    out = {"image_proj.latents": w(1, r["queries"], dim), "image_proj.proj_in.weight": w(dim, enc["hidden_size"]),
           "image_proj.proj_in.bias": w(dim), "image_proj.proj_out.weight": w(ctx, dim),
           "image_proj.proj_out.bias": w(ctx), "image_proj.norm_out.weight": 1 + w(ctx),
           "image_proj.norm_out.bias": w(ctx)}
    for i in range(r["depth"]):
        p = f"image_proj.layers.{i}."
        out.update({p + "0.norm1.weight": 1 + w(dim), p + "0.norm1.bias": w(dim), p + "0.norm2.weight": 1 + w(dim),
                    p + "0.norm2.bias": w(dim), p + "0.to_q.weight": w(inner, dim),
                    p + "0.to_kv.weight": w(2 * inner, dim), p + "0.to_out.weight": w(dim, inner),
                    p + "1.0.weight": 1 + w(dim), p + "1.0.bias": w(dim), p + "1.1.weight": w(4 * dim, dim),
                    p + "1.3.weight": w(dim, 4 * dim)})
    for i, width in unet_cross_dims.items():
        out[f"ip_adapter.{i}.to_k_ip.weight"] = w(width, ctx)
        out[f"ip_adapter.{i}.to_v_ip.weight"] = w(width, ctx)
    return out
