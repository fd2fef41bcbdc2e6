"""`python -m ipadapter_mlx generate ...`: argument parsing, progress, PNG output, clean errors."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import UserError

DTYPES = ("float32", "float16", "bfloat16")


IP_OPTIONS = ("image", "image_weight", "scale", "negative_image", "image_embeds", "combine", "image_encoder",
              "image_fit")


class _IPOption(argparse.Action):
    """Keeps IP-Adapter options in command-line order, so each belongs to the --ip-adapter before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.ip_args = (getattr(namespace, "ip_args", None) or []) + [(self.dest, value)]


def ip_groups(pairs: list[tuple[str, str]]) -> list[dict]:
    """[('ip_adapter', A), ('image', x), ('scale', s), ('ip_adapter', B), ...] -> one dict per adapter.
    Options given before the first --ip-adapter belong to the first."""
    groups: list[dict] = []
    pending: list[tuple[str, str]] = []
    for key, value in pairs:
        if key == "ip_adapter":
            groups.append({"ip_adapter": value, "image": [], "image_weight": [], "image_embeds": []})
            for k, v in pending:
                _put(groups[-1], k, v)
            pending = []
        elif groups:
            _put(groups[-1], key, value)
        else:
            pending.append((key, value))
    if pending:
        raise UserError(f"--{pending[0][0].replace('_', '-')} needs an --ip-adapter")
    return groups


def _put(group: dict, key: str, value) -> None:
    if key in ("image", "image_weight", "image_embeds"):
        group[key].append(value)
    elif key in group:
        raise UserError(f"--{key.replace('_', '-')} given twice for IP-Adapter {group['ip_adapter']}")
    else:
        group[key] = value


def _add_ip_options(p: argparse.ArgumentParser, embed: bool = False) -> None:
    from .hub import PRESETS
    from .images import FITS
    from .ip_adapter import COMBINE_MODES

    g = p.add_argument_group("IP-Adapter (repeat --ip-adapter for several; options apply to the one before them)")
    g.add_argument("--ip-adapter", action=_IPOption, dest="ip_adapter",
                   help=f"preset ({', '.join(PRESETS)}), REPO:PATH on the Hub, or a local .bin/.safetensors")
    g.add_argument("--image", action=_IPOption, dest="image", help="a reference image (repeatable)")
    g.add_argument("--image-encoder", action=_IPOption, dest="image_encoder",
                   help="override the CLIP vision tower: folder, REPO:PATH, or repo id")
    g.add_argument("--image-fit", action=_IPOption, dest="image_fit", choices=FITS,
                   help="crop: CLIP's centre crop (default); pad: keep a non-square image whole")
    g.add_argument("--negative-image", action=_IPOption, dest="negative_image",
                   help="replaces the null image in the unconditional branch")
    if not embed:
        g.add_argument("--image-weight", action=_IPOption, dest="image_weight", type=float,
                       help="weight of each --image, in order (repeatable; default 1)")
        g.add_argument("--scale", action=_IPOption, dest="scale", type=float, help="adapter strength (default 1.0)")
        g.add_argument("--image-embeds", action=_IPOption, dest="image_embeds",
                       help="embeddings from `embed`, instead of --image (no vision tower is loaded)")
        g.add_argument("--combine", action=_IPOption, dest="combine", choices=COMBINE_MODES,
                       help="several images: concat tokens (default, as diffusers), average, norm-average, subtract")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write reference images' CLIP features to a file, for generate --image-embeds")
    _add_ip_options(p, embed=True)
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--output", required=True, help=".safetensors path")


def _embed(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from convert.ip_adapter import read_ip_adapter

    from . import hub
    from .images import open_image
    from .ip_adapter import encode_images, save_features
    from .loading import load_component
    from .pipeline import default_dtype

    groups = ip_groups(getattr(args, "ip_args", None) or [])
    if len(groups) != 1:
        raise UserError("embed takes exactly one --ip-adapter (its shapes say which features to compute)")
    g = groups[0]
    if not g["image"]:
        raise UserError("give at least one --image")
    if not args.output.endswith(".safetensors"):
        raise UserError(f"--output must be a .safetensors path, got {args.output}")
    images = [open_image(p) for p in g["image"]]
    negative = open_image(g["negative_image"]) if g.get("negative_image") else None
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()
    file, hub_ref = hub.resolve_ip_adapter(g["ip_adapter"])
    adapter = read_ip_adapter(file, dtype)
    folder, source = hub.resolve_image_encoder(adapter, file, hub_ref, g.get("image_encoder"))
    encoder = load_component(folder, "image_encoder", dtype)
    hidden = adapter.config.image_proj.reads_hidden_states
    features = encode_images(encoder, images, hidden, g.get("image_fit", "crop"), negative)
    save_features(args.output, features, {"ip_adapter": g["ip_adapter"], "images": g["image"],
                                          "image_encoder": source})
    print(args.output)
    return 0


def _image_prompts(pipe, groups: list[dict]) -> list:
    from .images import open_image
    from .ip_adapter import ImagePrompt, join_features, load_features

    prompts = []
    for g in groups:
        if bool(g["image"]) == bool(g["image_embeds"]):
            raise UserError(f"IP-Adapter {g['ip_adapter']}: give --image or --image-embeds (one of them)")
        images = [open_image(p) for p in g["image"]]
        features = join_features([load_features(p) for p in g["image_embeds"]]) if g["image_embeds"] else None
        n = len(images) if images else features.cond.shape[0]
        if g["image_weight"] and len(g["image_weight"]) != n:
            raise UserError(f"IP-Adapter {g['ip_adapter']}: {len(g['image_weight'])} --image-weight for {n} images")
        pipe.load_ip_adapter(g["ip_adapter"], image_encoder=g.get("image_encoder"), scale=g.get("scale", 1.0))
        prompts.append(ImagePrompt(
            images=images, features=features, weights=g["image_weight"] or None,
            negative=open_image(g["negative_image"]) if g.get("negative_image") else None,
            combine=g.get("combine", "concat"), fit=g.get("image_fit", "crop"),
        ))
    return prompts


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> tuple[int, str]:
    """What one run may use before it swaps or is stopped: on Apple silicon the GPU's recommended working set
    (about two thirds of memory on 8-16 GB Macs), on a CUDA GPU its own memory, else most of the RAM."""
    import mlx.core as mx

    info = mx.device_info() if mx.default_device() == mx.gpu else {}
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"]), "the GPU may use"
    gpu_memory = info.get("memory_size") or info.get("total_memory")
    if gpu_memory and sys.platform != "darwin":
        return int(0.9 * gpu_memory), "the GPU has"
    return int(0.85 * physical_memory()), "the machine has"


def _warn_if_too_big(pipe, args: argparse.Namespace) -> None:
    """Say so before a run that will not fit this machine's memory (it would swap, or be killed)."""
    size = pipe.default_size
    need = pipe.estimate_memory(args.height or size, args.width or size, args.num_images)
    have, what = memory_budget()
    if need > have:
        tips = [t for t, on in (("--low-memory", not args.low_memory), ("--quantize 8 (or 4)", not args.quantize),
                                ("a smaller --height/--width", True)) if on]
        print(f"warning: this run needs about {need / 2**30:.1f} GB and {what} {have / 2**30:.1f} GB; "
              f"it may swap or be stopped. Try {', '.join(tips)}.", file=sys.stderr)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from .pipeline import DEFAULT_MODEL, DEFAULT_SCHEDULER
    from .samplers import SAMPLERS

    p = sub.add_parser("generate", help="text-to-image / image-to-image")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hub repo id, diffusers folder, single .safetensors/.ckpt file, or converted MLX folder")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative-prompt", default=None,
                   help="default: none (SD 1.x: the empty prompt; SDXL: zero embeddings, as diffusers)")
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
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-conditioning (default: the output size)")
    p.add_argument("--crop-coords", type=int, nargs=2, metavar=("TOP", "LEFT"), default=(0, 0),
                   help="SDXL micro-conditioning (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-conditioning (default: the output size)")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                   help="quantize the Linear layers of the text encoder, UNet and image encoder on load")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--low-memory", action="store_true",
                   help="free the text and image encoders after encoding; decode the VAE in tiles")
    p.add_argument("--verbose", action="store_true", help="print timings and peak memory")
    _add_ip_options(p)


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
    groups = ip_groups(getattr(args, "ip_args", None) or [])
    for g in groups:  # check the files before loading anything big
        for path in g["image"] + ([g["negative_image"]] if g.get("negative_image") else []):
            open_image(path)
    seed = args.seed if args.seed is not None else int(np.random.randint(0, 2**31 - 1))
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()

    t0 = time.perf_counter()
    quantize = (args.quantize, args.group_size) if args.quantize else None
    pipe = StableDiffusion.from_pretrained(args.model, dtype=dtype, quantize=quantize, low_memory=args.low_memory,
                                           tokenizer=args.tokenizer, config=args.config)
    prompts = _image_prompts(pipe, groups) if groups else None
    for i, p in enumerate(prompts or []):
        if p.images:  # the encoder will run: find it now, so the memory estimate counts it
            pipe.image_encoder_folder(i)
    t_load = time.perf_counter() - t0
    _warn_if_too_big(pipe, args)
    steps = pipe.generate_latents(
        args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg, seed=seed,
        height=args.height, width=args.width, scheduler=args.scheduler, num_images=args.num_images,
        init_image=init, strength=args.strength, latents=latents, image_prompts=prompts,
        original_size=tuple(args.original_size) if args.original_size else None, crop_coords=tuple(args.crop_coords),
        target_size=tuple(args.target_size) if args.target_size else None,
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
        "prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "steps": args.steps,
        "sampler": args.scheduler, "cfg_scale": args.cfg, "seed": seed, "size": f"{w}x{h}",
        "model": args.model, "dtype": str(dtype).rpartition(".")[2],
    }
    if quantize:
        params["quantize"] = f"{args.quantize}-bit, group {args.group_size}"
    if pipe.is_sdxl:
        params.update(original_size=args.original_size or [h, w], crop_coords=list(args.crop_coords),
                      target_size=args.target_size or [h, w])
    if init is not None:
        params.update(init_image=str(args.init_image), strength=args.strength)
    if latents is not None:
        params["latents"] = str(args.latents)
    if groups:
        params["ip_adapters"] = [
            {k: v for k, v in g.items() if v not in ([], None)} | {"scale": pipe.adapters[i].scale}
            for i, g in enumerate(groups)
        ]
    out = Path(args.output)
    for i, image in enumerate(to_pil(images)):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        save_png(image, path, {**params, "image_index": i} if len(images) > 1 else params)
        print(path)
    if args.verbose:
        from .bench import blas_in_use

        print(f"load {t_load:.2f} s, sampling {t_sample:.2f} s ({t_sample / max(step.total, 1):.3f} s/step), "
              f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB, {mx.default_device()}, BLAS: {blas_in_use()}",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_mlx", description="Stable Diffusion + IP-Adapter in MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_embed(sub)
    from .bench import add_parser

    add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ._blas import slow_blas_warning

    if args.command in ("generate", "bench") and (note := slow_blas_warning()):
        print(note, file=sys.stderr)
    try:
        from .bench import main_bench

        return {"generate": _generate, "embed": _embed, "bench": main_bench}[args.command](args)
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
