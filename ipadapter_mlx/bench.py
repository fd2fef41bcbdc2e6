"""`python -m ipadapter_mlx bench`: seconds per UNet step, encoder and VAE times, whole generation and peak
memory, for MLX and (with --compare diffusers) diffusers on the same shapes, each in its own process.

Random weights at real SD 1.5 (or SDXL, `--model-kind sdxl`) + ViT-H/14 + IP-Adapter-plus shapes: timing and
memory do not depend on the values. Speed targets live here, never in tests. On a GPU both sides run there
(MLX's Metal or CUDA backend, torch's CUDA) and memory is the GPU's; on the CPU, the processes' peak RSS.
generation_s is each side's first generation in a fresh process (one-time kernel compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

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


def blas_in_use() -> str:
    """Which BLAS the process loaded (Linux: from the memory map; macOS: Accelerate)."""
    if sys.platform == "darwin":
        return "Accelerate"
    import re

    try:
        libs = {line.rsplit("/", 1)[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    except OSError:
        return "unknown"
    # numpy's bundled libscipy_openblas has renamed symbols and serves numpy only; MLX needs a plain one
    for pattern, label in ((r"^libopenblas.*\.so", "OpenBLAS"), (r"^libmkl_rt", "MKL"), (r"^libblis", "BLIS")):
        if any(re.match(pattern, lib) for lib in libs):
            return label
    return "reference BLAS (slow: install OpenBLAS, see README)" if any(l.startswith("libblas") for l in libs) else "unknown"


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def _timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _paired(with_ip, without, repeat: int) -> tuple[float, float]:
    """Medians of alternating runs, so that a slow moment of the machine hits both sides alike."""
    with_ip(), without()
    a, b = [], []
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        with_ip()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        without()
        b.append(time.perf_counter() - t)
    return sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]


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


# ---------------------------------------------------------------------------------------------------
# Workers: one framework, one setting, in a fresh process


def mlx_worker(shapes: dict, size: int, steps: int, dtype_name: str, quantize: int | None, repeat: int,
               low_memory: bool = False) -> dict:
    """One whole generation first (its peak memory per phase is reported), then per-component timings.

    low_memory follows the pipeline's low-memory order: each encoder is built, used and freed before the
    UNet is built, so they never share memory with it."""
    import gc

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from PIL import Image

    from convert.ip_adapter import infer_ip_adapter_config

    from .config import CLIPTextConfig, CLIPVisionConfig, UNetConfig, VAEConfig
    from .ip_adapter import ImagePrompt, IPAdapter, cross_attention_slots, encode_images, image_tokens
    from .models import AutoencoderKL, CLIPTextModel, CLIPVisionModel, UNet2DConditionModel
    from .pipeline import LOW_MEMORY_TILE, decode_tiled
    from .quantize import quantize_model

    dtype = getattr(mx, dtype_name)

    def make(cls, config, quantizable=True, model_dtype=dtype):
        m = cls(config)
        m.set_dtype(model_dtype)
        if quantize and quantizable:
            quantize_model(m, bits=quantize)
        mx.eval(m.parameters())
        return m

    lat = size // 8
    x = mx.random.normal((2, lat, lat, 4)).astype(dtype)
    t = mx.array([500.0, 500.0])
    ref = Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    models = {}
    t0 = time.perf_counter()

    text_names = [n for n in ("text_encoder", "text_encoder_2") if n in shapes]

    def encode_text():
        """(context, pooled) for a CFG batch of 2, as the pipeline computes them."""
        states, pooled = [], None
        for n in text_names:
            if n not in models:
                models[n] = make(CLIPTextModel, CLIPTextConfig.from_dict(shapes[n]))
            out = models[n](mx.zeros((2, 77), dtype=mx.int32))
            states.append(out.hidden_states[-2] if len(text_names) == 2 else out.last_hidden_state)
            pooled = out.pooler_output
        return mx.concatenate(states, axis=-1), pooled

    def image_encoder():
        if "enc" not in models:
            models["enc"] = make(CLIPVisionModel, CLIPVisionConfig.from_dict(shapes["image_encoder"]))
        return models["enc"]

    def unet_and_adapter():
        if "unet" not in models:
            unet = make(UNet2DConditionModel, UNetConfig.from_dict(shapes["unet"]))
            slots = cross_attention_slots(unet)
            weights = ip_adapter_weights(shapes, {i: a.to_q.weight.shape[0] for i, a in slots.items()},
                                         np.random.default_rng(0))
            adapter = IPAdapter(infer_ip_adapter_config({k: mx.array(v) for k, v in weights.items()}))
            adapter.load_weights([(k, mx.array(v)) for k, v in weights.items()])
            adapter.set_dtype(dtype)
            for i, layer in adapter.layers().items():
                slots[i].ip.append(layer)
            models["unet"], models["adapter"] = unet, adapter
        return models["unet"], models["adapter"]

    def vae():
        if "vae" not in models:
            # float32 under half precision too, as the pipeline loads it
            models["vae"] = make(AutoencoderKL, VAEConfig.from_dict(shapes["vae"]), False, mx.float32)
        return models["vae"]

    def free(*names):
        for n in names:
            models.pop(n, None)
        gc.collect()
        mx.clear_cache()

    if not low_memory:
        encode_text(), image_encoder(), unet_and_adapter(), vae()
    results = {"build_s": time.perf_counter() - t0}

    # -- the whole generation, in the pipeline's order; the peak of MLX's memory in each phase (what is
    # resident then plus that phase's activations) is what the README's memory table is built from
    peaks = results["phase_peak_gib"] = {}

    def phase(name):
        peaks[name] = mx.get_peak_memory() / 2**30
        mx.reset_peak_memory()

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    ctx, pooled = encode_text()
    added = added_conditioning(shapes, lambda v: mx.array(v, dtype=mx.float32), pooled, size)
    mx.eval(ctx, added)
    phase("text_encoders")
    feats = encode_images(image_encoder(), [ref], hidden_states=True)
    mx.eval(feats.cond)
    phase("image_encoder")
    if low_memory:
        free(*text_names, "enc")
    unet, adapter = unet_and_adapter()
    vae()
    mx.reset_peak_memory()  # building random weights is no part of a generation (a real run reads them)
    tokens = image_tokens(adapter, feats, ImagePrompt(), 1, guided=True).astype(dtype)
    y = x
    for _ in range(steps):
        y = unet(y, t, ctx, [(tokens, 1.0)], **added)
        mx.eval(y)
    phase("unet")

    def decode(z):  # tiled in low-memory mode, as the pipeline decodes
        z = z[:1].astype(mx.float32)
        mx.eval(decode_tiled(vae(), z, LOW_MEMORY_TILE) if low_memory else vae().decode(z))

    decode(y)
    phase("vae_decode")
    results["generation_s"] = time.perf_counter() - t0
    results["peak_mlx_gib"] = max(peaks.values())
    results["peak_rss_gib"] = peak_rss_gib()
    if mx.default_device() == mx.gpu:
        results["peak_gpu_gib"] = results["peak_mlx_gib"]
    encode_text(), image_encoder(), vae()
    sizes = {n: sum(v.nbytes for _, v in tree_flatten(m.parameters())) / 2**30 for n, m in models.items()}
    ip_layers = [layer.parameters() for layer in models["adapter"].layers().values()]
    sizes["unet"] -= sum(v.nbytes for _, v in tree_flatten(ip_layers)) / 2**30  # attached to it: count them once
    results["component_weights_gib"] = sizes
    results["weights_gib"] = sum(sizes.values())  # what a converted folder of this setting holds on disk

    # -- per component
    def step(ip):
        mx.eval(unet(x, t, ctx, ip, **added))

    results["unet_step_s"], results["unet_step_plain_s"] = _paired(lambda: step([(tokens, 1.0)]),
                                                                   lambda: step(None), repeat)
    results["ip_overhead"] = results["unet_step_s"] / results["unet_step_plain_s"] - 1
    results["vae_decode_s"] = _timed(lambda: decode(x), max(1, repeat // 2))
    if low_memory:
        free("unet", "adapter")
    results["image_encoder_s"] = _timed(
        lambda: mx.eval(encode_images(image_encoder(), [ref], hidden_states=True).cond), repeat)
    results["device"] = str(mx.default_device())
    results["blas"] = blas_in_use()
    return results


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
            "unet_step_s": _timed(synced(lambda: step(1.0)), repeat),
            "image_encoder_s": _timed(synced(encode), repeat),
            "vae_decode_s": _timed(synced(lambda: vae.decode(x[:1].float())), max(1, repeat // 2)),
        })
    results["peak_rss_gib"] = peak_rss_gib()
    results["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results["torch_threads"] = torch.get_num_threads()
    return results


# ---------------------------------------------------------------------------------------------------


def _run_worker(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "ipadapter_mlx.bench", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode < 0:  # killed by a signal: on Linux usually the kernel's out-of-memory killer
        return {"error": f"killed by signal {-proc.returncode} (out of memory? try --low-memory / --quantize)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "python": platform.python_version()},
              "shapes": f"{'tiny ' if args.tiny else ''}{args.model_kind}+vit-h+ip-adapter-plus", "steps": args.steps,
              "runs": []}
    for size in args.sizes:
        for dtype in args.dtype:
            for q in args.quantize:
                for low in ([False, True] if args.low_memory == "both" else [args.low_memory == "on"]):
                    spec = {"framework": "mlx", "size": size, "dtype": dtype, "quantize": q, "low_memory": low,
                            "steps": args.steps, "repeat": args.repeat, "tiny": args.tiny,
                            "model_kind": args.model_kind}
                    print(f"mlx {size}px {dtype} q={q or 'none'} low-memory={low} ...", file=sys.stderr, flush=True)
                    report["runs"].append({**spec, **_run_worker(spec, args.timeout)})
        for dtype in args.dtype if "diffusers" in (args.compare or []) else []:
            spec = {"framework": "diffusers", "size": size, "dtype": dtype, "quantize": None,
                    "low_memory": False, "steps": args.steps, "repeat": args.repeat, "tiny": args.tiny,
                    "model_kind": args.model_kind}
            print(f"diffusers {size}px {dtype} ...", file=sys.stderr, flush=True)
            report["runs"].append({**spec, **_run_worker(spec, args.timeout)})
    _ratios(report)
    return report


def _ratios(report: dict) -> None:
    """Each MLX run against the diffusers run of the same size and dtype. Memory: GPU memory where both ran
    on a GPU, else the processes' peak resident memory."""
    ref = {(r["size"], r["dtype"]): r for r in report["runs"] if r["framework"] == "diffusers" and "error" not in r}
    for r in report["runs"]:
        d = ref.get((r["size"], r["dtype"]))
        if r["framework"] == "mlx" and d and "error" not in r:
            r["vs_diffusers"] = {k: r[k] / d[k] for k in ("unet_step_s", "image_encoder_s", "vae_decode_s",
                                                          "generation_s") if d.get(k)}
            mem = "peak_gpu_gib" if "peak_gpu_gib" in r and "peak_gpu_gib" in d else "peak_rss_gib"
            r["vs_diffusers"]["memory"] = r[mem] / d[mem]


def format_table(report: dict) -> str:
    cols = ["framework", "size", "dtype", "quantize", "low_memory", "unet_step_s", "unet_step_plain_s", "ip_overhead",
            "image_encoder_s", "vae_decode_s", "generation_s", "peak_rss_gib", "peak_gpu_gib", "weights_gib"]
    lines = [" | ".join(cols + ["step vs diffusers", "memory vs diffusers"])]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"{r['framework']} | {r['size']} | {r['dtype']} | error: {r['error']}")
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)))
        vs = r.get("vs_diffusers", {})
        cells += [f"{vs['unet_step_s']:.2f}x" if "unet_step_s" in vs else "-",
                  f"{vs['memory']:.2f}x" if "memory" in vs else "-"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """A bar chart of seconds per step, MLX settings against diffusers, drawn with PIL alone."""
    from PIL import Image, ImageDraw

    runs = [r for r in report["runs"] if "unet_step_s" in r]
    w, bar, gap = 900, 26, 10
    img = Image.new("RGB", (w, 60 + len(runs) * (bar + gap)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "seconds per UNet step (CFG batch 2, with IP-Adapter) - shorter is faster", fill="black")
    top = max(r["unet_step_s"] for r in runs)
    for i, r in enumerate(runs):
        y = 40 + i * (bar + gap)
        label = f"{r['framework']} {r['size']}px {r['dtype']} q{r['quantize'] or '-'}{' low' if r.get('low_memory') else ''}"
        d.text((10, y + 7), label, fill="black")
        length = int((w - 330) * r["unet_step_s"] / top)
        d.rectangle([260, y, 260 + length, y + bar], fill="#d9534f" if r["framework"] == "diffusers" else "#337ab7")
        d.text((265 + length, y + 7), f"{r['unet_step_s']:.2f}s", fill="black")
    img.save(path)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory at real SD 1.5 + ViT-H + IP-Adapter shapes")
    p.add_argument("--model-kind", choices=["sd15", "sdxl"], default="sd15",
                   help="sd15: SD 1.5 + IP-Adapter-plus; sdxl: SDXL base + IP-Adapter-plus-sdxl-vit-h")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", type=lambda v: None if v == "none" else int(v), nargs="+", default=[None],
                   help="none, 8 and/or 4")
    p.add_argument("--low-memory", choices=["off", "on", "both"], default="both",
                   help="measure the low-memory order (encoders freed before the UNet) too")
    p.add_argument("--steps", type=int, default=2, help="steps in the whole-generation timing")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--compare", nargs="*", choices=["diffusers"], help="also run diffusers (needs torch)")
    p.add_argument("--tiny", action="store_true", help="miniature shapes: checks the benchmark itself, quickly")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measured setting")
    p.add_argument("--output", default="bench.json", help="JSON report")
    p.add_argument("--plot", default=None, help="also draw the comparison as a PNG")


def main_bench(args: argparse.Namespace) -> int:
    report = run(args)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"device: {next((r.get('device') for r in report['runs'] if r.get('device')), '?')}, "
          f"BLAS: {next((r.get('blas') for r in report['runs'] if r.get('blas')), '?')}")
    print(format_table(report))
    if args.plot:
        plot(report, args.plot)
    print(args.output)
    return 0


if __name__ == "__main__":
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    shapes = SHAPES[(spec.get("model_kind", "sd15"), spec["tiny"])]
    if spec["framework"] == "mlx":
        out = mlx_worker(shapes, spec["size"], spec["steps"], spec["dtype"], spec["quantize"], spec["repeat"],
                         spec["low_memory"])
    else:
        out = diffusers_worker(shapes, spec["size"], spec["steps"], spec["dtype"], spec["repeat"])
    print(json.dumps(out))
