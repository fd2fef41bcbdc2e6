"""`python -m ipadapter_mlx generate ...`: argument parsing, progress, PNG output, clean errors."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import UserError

DTYPES = ("float32", "float16", "bfloat16")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from .pipeline import DEFAULT_MODEL, DEFAULT_SCHEDULER
    from .samplers import SAMPLERS

    p = sub.add_parser("generate", help="text-to-image / image-to-image")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hub repo id, diffusers folder, single .safetensors/.ckpt file, or converted MLX folder")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (<= 1 turns it off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size (or the init image's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", choices=list(SAMPLERS), default=DEFAULT_SCHEDULER)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--init-image", default=None, help="image-to-image: the starting picture")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much to change it (0-1]")
    p.add_argument("--latents", default=None,
                   help="starting noise as a .npy, NCHW float32 exactly as diffusers' latents= takes it")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on the CPU, float16 on a GPU")
    p.add_argument("--tokenizer", default=None, help="single-file models: tokenizer folder or Hub repo")
    p.add_argument("--config", default=None,
                   help="single-file models: diffusers folder or Hub repo whose configs to use instead of inferring")
    p.add_argument("--output", default="out.png",
                   help="PNG path; with several images, _1, _2, ... are added before the extension")
    p.add_argument("--verbose", action="store_true", help="print timings and peak memory")


def _generate(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np
    from tqdm import tqdm

    from .images import open_image, save_png, to_pil
    from .pipeline import StableDiffusion, default_dtype

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {v}")
    if not args.output.lower().endswith(".png"):
        raise UserError(f"--output must be a .png path, got {args.output}")
    init = open_image(args.init_image) if args.init_image else None
    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --latents {args.latents}: {e}") from None
        if init is not None:
            raise UserError("--latents is the text-to-image starting noise; it does not combine with --init-image")
    seed = args.seed if args.seed is not None else int(np.random.randint(0, 2**31 - 1))
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()

    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(args.model, dtype=dtype, tokenizer=args.tokenizer, config=args.config)
    t_load = time.perf_counter() - t0
    steps = pipe.generate_latents(
        args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg, seed=seed,
        height=args.height, width=args.width, scheduler=args.scheduler, num_images=args.num_images,
        init_image=init, strength=args.strength, latents=latents,
    )
    t1 = time.perf_counter()
    step = None
    for step in tqdm(steps, desc="sampling", unit="step", file=sys.stderr):
        pass
    t_sample = time.perf_counter() - t1
    images = pipe.decode(step.latents)
    mx.eval(images)
    h, w = images.shape[1:3]
    params = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "sampler": args.scheduler, "cfg_scale": args.cfg, "seed": seed, "size": f"{w}x{h}",
        "model": args.model, "dtype": str(dtype).rpartition(".")[2],
    }
    if init is not None:
        params.update(init_image=str(args.init_image), strength=args.strength)
    if latents is not None:
        params["latents"] = str(args.latents)
    out = Path(args.output)
    for i, image in enumerate(to_pil(images)):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        save_png(image, path, {**params, "image_index": i} if len(images) > 1 else params)
        print(path)
    if args.verbose:
        print(f"load {t_load:.2f} s, sampling {t_sample:.2f} s ({t_sample / max(step.total, 1):.3f} s/step), "
              f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_mlx", description="Stable Diffusion + IP-Adapter in MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": _generate}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line; IPADAPTER_MLX_DEBUG=1 shows the trace
        if os.environ.get("IPADAPTER_MLX_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set IPADAPTER_MLX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
