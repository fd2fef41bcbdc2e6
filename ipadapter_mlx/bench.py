"""`python -m ipadapter_mlx bench`: seconds per sampling step, encoder and VAE times, whole generation and peak
memory, for MLX and (with --compare diffusers) diffusers on the same shapes, each in its own process.

The MLX side is the real pipeline (StableDiffusion, load_ip_adapter, generate) on random weights at real SD 1.5
(or SDXL, `--model-kind sdxl`) + ViT-H/14 + IP-Adapter-plus shapes, written as a converted folder (synthetic.py):
timing and memory do not depend on the values. The diffusers side (bench_diffusers.py) builds the same shapes
in diffusers. Speed targets live here, never in tests. On a GPU both sides run there (MLX's Metal or CUDA
backend, torch's CUDA) and memory is the GPU's; on the CPU, the processes' peak RSS. generation_s is each side's
first generation in a fresh process (one-time kernel compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import _blas, _malloc
from .errors import UserError
from .bench_shapes import SHAPES, peak_rss_gib, timed


# ---------------------------------------------------------------------------------------------------
# Workers: one framework, one setting, in a fresh process


def mlx_worker(shapes: dict, size: int, steps: int, dtype_name: str, quantize: int | None, repeat: int,
               low_memory: bool = False) -> dict:
    """The real pipeline on random weights written as a converted folder (synthetic.py): one whole generation
    first (its peak memory per phase is reported), then per-component timings through the pipeline's own
    methods. Low-memory mode is the pipeline's: encoders freed before the UNet loads, the VAE decoded in tiles."""
    import tempfile

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from PIL import Image

    from .ip_adapter import ImagePrompt
    from .pipeline import StableDiffusion
    from .synthetic import random_image_encoder, random_ip_adapter, random_pipeline

    dtype = getattr(mx, dtype_name)
    ref = Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    prompt = [ImagePrompt(images=[ref])]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-bench-") as tmp:
        t0 = time.perf_counter()
        folder = random_pipeline(Path(tmp) / "model", shapes, dtype)
        encoder = random_image_encoder(Path(tmp) / "image-encoder", shapes["image_encoder"], dtype)
        adapter = random_ip_adapter(Path(tmp) / "ip-adapter.safetensors", shapes)
        results["build_s"] = time.perf_counter() - t0
        mx.clear_cache()

        # -- the whole generation, as `generate` runs it; the peak of MLX's memory in each phase (what is
        # resident then plus that phase's activations) is what the README's memory table is built from
        peaks = results["phase_peak_gib"] = {}

        def phase(name):
            peaks[name] = mx.get_peak_memory() / 2**30
            mx.reset_peak_memory()

        mx.reset_peak_memory()
        t0 = time.perf_counter()
        pipe = StableDiffusion(folder, dtype, (quantize, 64) if quantize else None, low_memory)
        pipe.load_ip_adapter(str(adapter), image_encoder=str(encoder))
        results["load_s"] = time.perf_counter() - t0
        phase("load")
        t0 = time.perf_counter()
        kw = dict(steps=steps, height=size, width=size, seed=0, scheduler="euler")
        sampling = pipe.generate_latents("a photo", image_prompts=prompt, **kw)  # encodes prompt and image
        phase("encoders")
        for step in sampling:
            pass
        phase("unet")
        mx.eval(pipe.decode(step.latents))
        phase("vae_decode")
        results["generation_s"] = time.perf_counter() - t0
        results["peak_mlx_gib"] = max(peaks.values())
        results["peak_rss_gib"] = peak_rss_gib()
        if mx.default_device() == mx.gpu:
            results["peak_gpu_gib"] = results["peak_mlx_gib"]

        # -- per component, each through the pipeline: one sampling step (the sampler's own work included)
        def one_step(prompts):
            sampling = pipe.generate_latents("a photo", image_prompts=prompts, **{**kw, "steps": 1})

            def run():
                for _ in sampling:
                    pass
            return run

        def paired_steps():
            with_ip, without = [], []
            for _ in range(max(repeat, 1) + 1):  # the first pair warms up
                for runs, prompts in ((with_ip, prompt), (without, None)):
                    run = one_step(prompts)  # encoding is outside the timing
                    t = time.perf_counter()
                    run()
                    runs.append(time.perf_counter() - t)
            return statistics.median(with_ip[1:]), statistics.median(without[1:])

        results["unet_step_s"], results["unet_step_plain_s"] = paired_steps()
        results["ip_overhead"] = results["unet_step_s"] / results["unet_step_plain_s"] - 1
        latents = step.latents
        results["vae_decode_s"] = timed(lambda: mx.eval(pipe.decode(latents)), max(1, repeat // 2))
        results["image_encoder_s"] = timed(lambda: mx.eval(pipe.encode_reference([ref], 0).cond), repeat)
        modules = {"unet": pipe.unet, "vae": pipe.vae, "adapter": pipe.adapters[0].adapter,
                   **{n: pipe.text_model(n) for n in pipe.text_encoder_names}, "image_encoder": pipe.image_encoder(0)}
        sizes = {n: sum(v.nbytes for _, v in tree_flatten(m.parameters())) / 2**30 for n, m in modules.items()}
        results["component_weights_gib"] = sizes
        results["weights_gib"] = sum(sizes.values())  # what a converted folder of this setting holds on disk
    results["device"] = str(mx.default_device())
    results["blas"] = _blas.state.describe()
    return results


def profile_worker(shapes: dict, size: int, dtype_name: str, repeat: int) -> dict:
    """Where one UNet step (with IP-Adapter, CFG batch 2), one VAE decode and the image encoder (reference + null
    image, as generate runs it) spend their time, by kind of op.

    Each timed op (convolution, linear, GroupNorm, LayerNorm, the attention core, SiLU, GELU) is evaluated on its
    own, its inputs first: "other" is what is left of the profiled total (residual adds, concatenations,
    upsampling, reshapes and copies). Evaluating op by op removes what little overlap the CPU backend has, so
    the plain (unprofiled) time is reported beside the profiled total."""
    import mlx.core as mx
    import mlx.nn as nn

    import tempfile

    from .bench_shapes import added_conditioning
    from .checkpoints.adapter_files import read_ip_adapter
    from .conditioning import Conditioning, ImageCondition
    from .config import CLIPVisionConfig, UNetConfig, VAEConfig
    from .models import AutoencoderKL, UNet2DConditionModel
    from .models.clip import CLIPVisionModel
    from .models import attention as attention_module
    from .models import cpu
    from .models.ops import Conv2d, EagerConv2d, GroupNorm
    from .synthetic import random_ip_adapter

    dtype = getattr(mx, dtype_name)
    unet = UNet2DConditionModel(UNetConfig.from_dict(shapes["unet"]))
    unet.set_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-bench-") as tmp:
        adapter = read_ip_adapter(random_ip_adapter(Path(tmp) / "ip-adapter.safetensors", shapes), dtype)
    vae = AutoencoderKL(VAEConfig.from_dict(shapes["vae"]))
    mx.eval(unet.parameters(), vae.parameters())

    lat = size // 8
    x = mx.random.normal((2, lat, lat, 4)).astype(dtype)
    t = mx.array([500.0, 500.0])
    width = shapes["unet"]["cross_attention_dim"]
    ctx = mx.random.normal((2, 77, width)).astype(dtype)
    pooled = mx.zeros((2, shapes.get("text_encoder_2", {}).get("projection_dim", 0)), dtype=dtype)
    added = added_conditioning(shapes, lambda v: mx.array(v, dtype=mx.float32), pooled, size)
    tokens = mx.random.normal((2, shapes["resampler"]["queries"], width)).astype(dtype)
    cond = Conditioning(ctx, added, [ImageCondition(adapter.check_unet(unet), tokens, 1.0)]).at(0, 1.0)
    z = mx.random.normal((1, lat, lat, 4))
    encoder = CLIPVisionModel(CLIPVisionConfig.from_dict(shapes["image_encoder"]))
    encoder.set_dtype(dtype)
    mx.eval(encoder.parameters())
    side = shapes["image_encoder"]["image_size"]
    pixels = mx.random.normal((2, side, side, 3)).astype(dtype)
    phases = {"unet_step": lambda: mx.eval(unet(x, t, cond)),
              "vae_decode": lambda: mx.eval(vae.decode(z)),
              "image_encoder": lambda: mx.eval(encoder.penultimate(pixels))}

    kinds: dict[str, list[float]] = {}
    depth = [0]

    def timed_op(kind, fn):
        def wrapper(*args, **kwargs):
            if depth[0]:  # inside another timed op: counted there
                return fn(*args, **kwargs)
            mx.eval([a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)])
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                mx.eval(out)
            finally:
                depth[0] -= 1
            entry = kinds.setdefault(kind, [0.0, 0])
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
            return out
        return wrapper

    def conv_kind(conv):
        return f"conv {conv.weight.shape[1]}x{conv.weight.shape[2]}"

    # (owner, attribute, kind); kind None: convolutions, one kind per kernel size (3x3 ones unfold their input)
    patches = [(nn.Conv2d, "__call__", None), (Conv2d, "__call__", None), (EagerConv2d, "__call__", None),
               (nn.Linear, "__call__", "linear"),
               (nn.QuantizedLinear, "__call__", "linear"), (GroupNorm, "__call__", "group_norm"),
               (nn.LayerNorm, "__call__", "layer_norm"),
               (attention_module, "attention", "attention (q k^T, softmax, p v)"),
               (nn, "silu", "silu"), (nn, "gelu", "gelu"), (cpu, "silu", "silu"), (cpu, "gelu", "gelu"),
               (cpu, "geglu", "gelu"),
               (cpu, "quick_gelu", "gelu")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    results = {"size": size, "dtype": dtype_name}
    for name, run_phase in phases.items():
        plain = timed(run_phase, repeat)
        for owner, attr, kind in patches:
            fn = getattr(owner, attr)
            if kind is None:
                def per_shape(self, *args, _fn=fn, **kw):
                    return timed_op(conv_kind(self), lambda *a: _fn(self, *a, **kw))(*args)
                setattr(owner, attr, per_shape)
            else:
                setattr(owner, attr, timed_op(kind, fn))
        try:
            run_phase()  # warm-up under the profiler too
            kinds.clear()
            t0 = time.perf_counter()
            run_phase()
            total = time.perf_counter() - t0
        finally:
            for owner, attr, fn in saved:
                setattr(owner, attr, fn)
        ops = {k: {"s": v[0], "calls": v[1]} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])}
        ops["other (element-wise, copies)"] = {"s": total - sum(v[0] for v in kinds.values()), "calls": None}
        results[name] = {"plain_s": plain, "profiled_s": total, "ops": ops}
    results["blas"] = _blas.state.describe()
    return results


def format_profile(profile: dict) -> str:
    lines = [f"profile at {profile['size']}px {profile['dtype']}, MLX's BLAS: {profile['blas']}"]
    for phase in ("unet_step", "vae_decode", "image_encoder"):
        if phase not in profile:  # a report written before the encoder was profiled
            continue
        p = profile[phase]
        lines.append(f"{phase}: {p['plain_s']:.3f} s plain, {p['profiled_s']:.3f} s evaluated op by op")
        for kind, o in p["ops"].items():
            calls = f"{o['calls']:>4} calls" if o["calls"] else " " * 10
            lines.append(f"  {kind:<34} {o['s']:8.3f} s {100 * o['s'] / p['profiled_s']:5.1f}%  {calls}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def _run_worker(spec: dict, timeout: int) -> dict:
    """One setting in a fresh process. The diffusers side runs its file by path, so that its process never
    imports this package (nor MLX): torch there is the plain torch a diffusers user runs."""
    if spec["framework"] == "mlx":
        cmd = [sys.executable, "-m", "ipadapter_mlx.bench", "--worker", json.dumps(spec)]
    else:
        cmd = [sys.executable, str(Path(__file__).with_name("bench_diffusers.py")), json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode < 0:  # killed by a signal: on Linux usually the kernel's out-of-memory killer
        return {"error": f"killed by signal {-proc.returncode} (out of memory? try --low-memory / --quantize)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), for saying where figures were measured."""
    try:
        info = dict(l.split(":", 1) for l in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines() if ":" in l)
    except OSError:
        info = {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    if "model name" not in info:
        return platform.processor() or platform.machine()
    return f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def run(args: argparse.Namespace) -> dict:
    report = {"machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "mlx_blas": _blas.state.describe(),
                          "mlx_malloc": _malloc.state},
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
    for size in args.sizes if getattr(args, "profile", False) else []:
        for dtype in args.dtype:
            spec = {"framework": "mlx", "profile": True, "size": size, "dtype": dtype, "repeat": args.repeat,
                    "tiny": args.tiny, "model_kind": args.model_kind}
            print(f"profile mlx {size}px {dtype} ...", file=sys.stderr, flush=True)
            report.setdefault("profiles", []).append({**spec, **_run_worker(spec, args.timeout)})
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


def positive(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def multiple_of_8(text: str) -> int:
    value = positive(text)
    if value % 8 or value > 8192:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 up to 8192, got {text}")
    return value


def quantize_choice(text: str) -> int | None:
    if text not in ("none", "8", "4"):
        raise argparse.ArgumentTypeError(f"expected none, 8 or 4, got {text!r}")
    return None if text == "none" else int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and peak memory against diffusers, at real SD 1.5 or SDXL + "
                                     "IP-Adapter-plus shapes (random weights)", description=__doc__)
    p.add_argument("--model-kind", choices=["sd15", "sdxl"], default="sd15",
                   help="sd15: SD 1.5 + IP-Adapter-plus; sdxl: SDXL base + IP-Adapter-plus-sdxl-vit-h")
    p.add_argument("--sizes", type=multiple_of_8, nargs="+", default=None,
                   help="picture sizes, multiples of 8 (default: 256 512; --tiny: 64)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"],
                   help="(default: float32)")
    p.add_argument("--quantize", type=quantize_choice, nargs="+", default=[None],
                   help="none, 8 and/or 4")
    p.add_argument("--low-memory", choices=["off", "on", "both"], default="both",
                   help="measure the low-memory order (encoders freed before the UNet) too")
    p.add_argument("--steps", type=positive, default=2, help="steps in the whole-generation timing")
    p.add_argument("--repeat", type=positive, default=3, help="timed runs per measurement (median)")
    p.add_argument("--compare", nargs="*", choices=["diffusers"], help="also run diffusers (needs torch)")
    p.add_argument("--tiny", action="store_true",
                   help="miniature shapes at 64x64: checks the benchmark itself in seconds; its times mean nothing")
    p.add_argument("--timeout", type=positive, default=3600, help="seconds per measured setting")
    p.add_argument("--output", default="bench.json", help="JSON report")
    p.add_argument("--plot", default=None, help="also draw the comparison as a PNG")
    p.add_argument("--profile", action="store_true",
                   help="also profile one MLX UNet step, one VAE decode and the image encoder per size and dtype, "
                        "by kind of op")


def main_bench(args: argparse.Namespace) -> int:
    from .cli import check_writable
    from .files import atomic_file

    args.sizes = args.sizes or ([64] if args.tiny else [256, 512])
    for path in filter(None, (args.output, args.plot)):  # before the run, not after it
        check_writable(path)
    report = run(args)
    with atomic_file(args.output) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    torch_blas = next((r["torch_blas"] for r in report["runs"] if r.get("torch_blas")), None)
    print(f"device: {next((r.get('device') for r in report['runs'] if r.get('device')), '?')}, "
          f"CPU: {report['machine']['processor']}, MLX's BLAS: {_blas.state.describe()}, {_malloc.state}"
          + (f", torch's BLAS: {torch_blas}" if torch_blas else ""))
    print(format_table(report))
    for profile in report.get("profiles", []):
        print(f"profile error: {profile['error']}" if "error" in profile else format_profile(profile))
    if args.plot:
        plot(report, args.plot)
    print(args.output)
    if all("error" in r for r in report["runs"]):
        raise UserError("every measured setting failed (see the table)")
    return 0


if __name__ == "__main__":
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    shapes = SHAPES[(spec.get("model_kind", "sd15"), spec["tiny"])]
    if spec.get("profile"):
        out = profile_worker(shapes, spec["size"], spec["dtype"], spec["repeat"])
    else:
        out = mlx_worker(shapes, spec["size"], spec["steps"], spec["dtype"], spec["quantize"], spec["repeat"],
                         spec["low_memory"])
    print(json.dumps(out))
