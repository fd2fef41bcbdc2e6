"""The diffusers side of `bench`, run as a script by path (`python .../bench_diffusers.py SPEC`), never as a
module of the package: its process must not import ipadapter_mlx or MLX, so that torch runs exactly as in a
plain diffusers script (no library of ours loaded, nothing rebound). bench.py starts it and reads its JSON."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # for bench_shapes, imported as a plain file
from bench_shapes import SHAPES, added_conditioning, ip_adapter_weights, peak_rss_gib, timed  # noqa: E402


def loaded_libraries(pattern: str = r"^(libopenblas|libmkl_rt|libblis|libmlx|libblas)") -> list[str]:
    """Shared libraries of this process whose names match `pattern` (Linux): BLAS libraries that export the
    standard names (numpy's own libscipy_openblas prefixes its symbols and serves numpy alone), and MLX."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({l.rsplit("/", 1)[-1] for l in maps if "/" in l and re.search(pattern, l.rsplit("/", 1)[-1])})


def diffusers_worker(shapes: dict, size: int, steps: int, dtype_name: str, repeat: int) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection,
    )

    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_build = time.perf_counter()
    torch.set_default_device(device)  # builds the random weights where they run (fast on a GPU)
    unet = UNet2DConditionModel(**shapes["unet"]).eval()
    texts = [CLIPTextModel(CLIPTextConfig(**shapes["text_encoder"])).eval()]
    if "text_encoder_2" in shapes:
        cfg2 = {k: v for k, v in shapes["text_encoder_2"].items() if k != "architectures"}
        texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg2)).eval())

    def synced(fn):
        """CUDA runs asynchronously: a timing ends when the GPU is done."""
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    def encode_text():
        states, pooled = [], None
        for m in texts:
            out = m(torch.zeros(2, 77, dtype=torch.long), output_hidden_states=True)
            states.append(out.hidden_states[-2] if len(texts) == 2 else out[0])
            pooled = out[0] if len(texts) == 2 else None
        return torch.cat(states, -1), pooled

    vae = AutoencoderKL(**{k: v for k, v in shapes["vae"].items() if k != "scaling_factor"}).eval()
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**shapes["image_encoder"])).eval()
    cross = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            cross[str(i)] = dict(unet.named_modules())[name[: -len(".processor")]].to_q.weight.shape[0]
    flat = ip_adapter_weights(shapes, cross, np.random.default_rng(0))
    sd = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        top, _, rest = k.partition(".")
        sd[top][rest] = torch.from_numpy(v).to(device)
    unet._load_ip_adapter_weights([sd])
    for m in (unet, *texts, enc):
        m.to(dtype)
    vae.to(torch.float32)  # float32 under half precision, as the SDXL pipeline upcasts it (and as ours runs)
    t_build = time.perf_counter() - t_build
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, dtype=dtype)
    t = torch.tensor([500.0, 500.0])
    pixels = torch.randn(1, 3, 224, 224, dtype=dtype)
    with torch.no_grad():
        ctx, pooled = encode_text()
        cond = {"image_embeds": None, **added_conditioning(shapes, lambda v: torch.tensor(v, dtype=torch.float32), pooled, size)}
        hidden = torch.cat([enc(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2],
                            enc(pixels, output_hidden_states=True).hidden_states[-2]])

        def step(scale):
            for p in unet.attn_processors.values():
                if hasattr(p, "scale"):
                    p.scale = [scale]
            unet(x, t, ctx, added_cond_kwargs={**cond, "image_embeds": [hidden[:, None]]})

        def encode():
            enc(torch.zeros_like(pixels), output_hidden_states=True)
            enc(pixels, output_hidden_states=True)

        # the first whole generation, as for MLX (one-time kernel selection included on both sides)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ctx, pooled = encode_text()
        encode()
        y = x
        for _ in range(steps):
            y = unet(y, t, ctx, added_cond_kwargs={**cond, "image_embeds": [hidden[:, None]]}).sample
        synced(lambda: vae.decode(y[:1].float()))()
        results = {"build_s": t_build, "generation_s": time.perf_counter() - t0}
        if device.type == "cuda":
            results["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results.update({
            "unet_step_s": timed(synced(lambda: step(1.0)), repeat),
            "image_encoder_s": timed(synced(encode), repeat),
            "vae_decode_s": timed(synced(lambda: vae.decode(x[:1].float())), max(1, repeat // 2)),
        })
    results["peak_rss_gib"] = peak_rss_gib()
    results["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results["torch_threads"] = torch.get_num_threads()
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    results["torch_blas"] = blas.group(1) if blas else "unknown"
    return results


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    out = diffusers_worker(SHAPES[(spec.get("model_kind", "sd15"), spec["tiny"])], spec["size"], spec["steps"],
                           spec["dtype"], spec["repeat"])
    out["libraries"] = loaded_libraries()
    out["ipadapter_mlx_imported"] = any(m.startswith("ipadapter_mlx") or m.startswith("mlx") for m in sys.modules)
    print(json.dumps(out))
