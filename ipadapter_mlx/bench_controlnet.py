"""`python -m ipadapter_mlx.bench_controlnet`: what a ControlNet costs per sampling step, ours against diffusers',
at SD 1.5 shapes with random weights (`--tiny`: miniature ones, to check the script in seconds). A benchmark, not
a test: the README quotes its figures.

Ours: the real pipeline (generate_latents, CFG) with none, one and two ControlNets; seconds per step, median of
steps 2..N. diffusers: UNet2DConditionModel + ControlNetModel called as StableDiffusionControlNetPipeline calls
them on the same CFG batch, in a separate process that never loads MLX (this file run by path)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def controlnet_config(unet: dict) -> dict:
    """The ControlNet of a UNet config (as ControlNetModel.from_unet makes it), default hint block."""
    keep = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
            "attention_head_dim", "norm_num_groups", "use_linear_projection", "transformer_layers_per_block",
            "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    return {k: v for k, v in unet.items() if k in keep}


def diffusers_side(shapes_key: str, size: int, steps: int) -> dict:
    """Seconds per step of diffusers' UNet alone, with one ControlNet and with two (CFG batch of 2, float32)."""
    import torch
    from bench_shapes import SHAPES  # noqa: plain file, imported by path (no MLX in this process)
    from diffusers import ControlNetModel, UNet2DConditionModel

    shapes = SHAPES[(shapes_key, False)] if shapes_key != "tiny" else SHAPES[("sd15", True)]
    unet = UNet2DConditionModel(**shapes["unet"]).eval()
    nets = [ControlNetModel(**controlnet_config(shapes["unet"])).eval() for _ in range(2)]
    lat = size // 8
    x, t = torch.randn(2, 4, lat, lat), torch.tensor(500.0)
    ctx = torch.randn(2, 77, shapes["unet"]["cross_attention_dim"])
    image = torch.rand(2, 3, size, size)
    out = {}
    for n in (0, 1, 2):
        times = []
        with torch.no_grad():
            for _ in range(steps):
                start = time.perf_counter()
                down, mid = None, None
                for net in nets[:n]:  # MultiControlNetModel: each net, residuals summed
                    d, m = net(x, t, ctx, image, conditioning_scale=1.0, return_dict=False)
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
                times.append(time.perf_counter() - start)
        out[n] = statistics.median(times[1:])
    return out


def ours(shapes_key: str, size: int, steps: int) -> dict:
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from . import StableDiffusion
    from .bench_shapes import SHAPES
    from .controlnet import Control
    from .folders import write_mlx_folder
    from .synthetic import random_pipeline, random_weights

    shapes = SHAPES[(shapes_key, False)] if shapes_key != "tiny" else SHAPES[("sd15", True)]
    out = {}
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-bench-") as tmp:
        pipe = StableDiffusion(random_pipeline(Path(tmp) / "model", shapes), mx.float32)
        config = {**controlnet_config(shapes["unet"]), "_class_name": "ControlNetModel"}
        for i in range(2):
            weights = random_weights("controlnet", config)
            folder = write_mlx_folder(Path(tmp) / f"net{i}", {"controlnet": (config, weights)}, "random weights",
                                      kind="controlnet")
            pipe.load_controlnet(str(folder))
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
        for n in (0, 1, 2):
            times, t = [], time.perf_counter()
            controls = [Control(image, i) for i in range(n)] or None
            for step in pipe.generate_latents("a cat", steps=steps, cfg=6.0, height=size, width=size, seed=0,
                                              scheduler="euler", controls=controls):
                mx.eval(step.latents)
                now = time.perf_counter()
                times.append(now - t)
                t = now
            out[n] = statistics.median(times[1:])
    return out


def main(argv: list[str] | None = None) -> int:
    from .argparsing import Parser

    p = Parser(prog="python -m ipadapter_mlx.bench_controlnet", description=__doc__)
    p.add_argument("--size", type=int, default=256, help="picture size")
    p.add_argument("--steps", type=int, default=6, help="sampling steps per case (the first is not counted)")
    p.add_argument("--tiny", action="store_true", help="miniature shapes: checks the script in seconds")
    p.add_argument("--no-diffusers", action="store_true", help="ours only")
    args = p.parse_args(argv)
    key = "tiny" if args.tiny else "sd15"
    theirs = None
    if not args.no_diffusers:  # first: the two sides never hold their models at the same time
        run = subprocess.run([sys.executable, __file__, "--diffusers-side", key, str(args.size), str(args.steps)],
                             capture_output=True, text=True)
        theirs = {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()} \
            if run.returncode == 0 else None
        if theirs is None:
            print(f"diffusers side failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        else:
            print(f"diffusers: {theirs}", flush=True)
    mine = ours(key, args.size, args.steps)
    print(f"seconds per step, {args.size}x{args.size}, CFG batch 2, float32, median of steps 2..{args.steps}")
    print(f"  {'':24s} {'ours':>8s} {'diffusers':>10s}")
    for n, label in ((0, "no ControlNet"), (1, "1 ControlNet"), (2, "2 ControlNets")):
        extra = "" if n == 0 else f"   (+{mine[n] - mine[0]:.3f}" + \
            ("" if theirs is None else f" / +{theirs[n] - theirs[0]:.3f}") + " per step)"
        print(f"  {label:24s} {mine[n]:8.3f} {'' if theirs is None else f'{theirs[n]:10.3f}'}{extra}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--diffusers-side":  # run by path: no package, no MLX
        sys.path.insert(0, str(Path(__file__).parent))
        print(json.dumps(diffusers_side(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        raise SystemExit(main())
