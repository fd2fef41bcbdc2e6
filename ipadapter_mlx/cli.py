"""`python -m ipadapter_mlx generate ...`: argument parsing, progress, PNG output, clean errors."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .argparsing import Parser, show_log
from .errors import UserError

if TYPE_CHECKING:
    from .batch import Ranks

DTYPES = ("float32", "float16", "bfloat16")


def finite_float(text: str) -> float:
    """A float flag: nan and inf would silently give a black picture."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def guidance(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (<= 1 turns guidance off), got {text}")
    return value


def seed_number(text: str) -> int:
    """MLX's random keys take a 64-bit unsigned seed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in 0..2**64-1, got {text}")
    return value


def scale_value(text: str) -> float | dict:
    """--scale: a number, or a JSON object in diffusers' set_ip_adapter_scale form."""
    import json

    if not text.lstrip().startswith("{"):
        return finite_float(text)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a number or a JSON object, got {text!r:.80}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


IP_OPTIONS = ("image", "image_weight", "scale", "negative_image", "image_embeds", "combine", "image_encoder",
              "image_fit", "weight_type", "layer_weights", "composition_weight", "start_at", "end_at", "timing",
              "mask", "embeds_scaling", "boost", "composition_image", "negative_content_prompt",
              "negative_content_scale", "face_image", "face_embeds", "faceid_v2_weight", "faceid_lora_scale")
STEERING = {"weight_type": "linear", "layer_weights": None, "composition_weight": 1.0, "start_at": 0.0,
            "end_at": 1.0, "timing": "step", "boost": None}  # ImagePrompt's fields and defaults
LISTS = ("image", "image_weight", "image_embeds", "mask", "composition_image", "face_image", "face_embeds")


class _IPOption(argparse.Action):
    """Keeps IP-Adapter options in command-line order, so each belongs to the --ip-adapter before it."""

    store = "ip_args"  # the namespace list the options go to, in order (one per option group)

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.store, (getattr(namespace, self.store, None) or []) + [(self.dest, value)])


def ip_groups(pairs: list[tuple[str, str]]) -> list[dict]:
    """[('ip_adapter', A), ('image', x), ('scale', s), ('ip_adapter', B), ...] -> one dict per adapter.
    Options given before the first --ip-adapter belong to the first."""
    return option_groups(pairs, "ip_adapter", LISTS, "IP-Adapter", "an --ip-adapter")


def option_groups(pairs: list[tuple[str, str]], head: str, lists: tuple[str, ...], what: str,
                  needs: str) -> list[dict]:
    """Options in command-line order -> one dict per `head` option, each holding the options after it (those
    before the first head belong to the first); options in `lists` may repeat, the others not."""
    groups: list[dict] = []
    pending: list[tuple[str, str]] = []
    for key, value in pairs:
        if key == head:
            groups.append({head: value, **{k: [] for k in lists}})
            for k, v in pending:
                _put(groups[-1], k, v, head, lists, what)
            pending = []
        elif groups:
            _put(groups[-1], key, value, head, lists, what)
        else:
            pending.append((key, value))
    if pending:
        raise UserError(f"--{pending[0][0].replace('_', '-')} needs {needs}")
    return groups


def _put(group: dict, key: str, value, head: str, lists: tuple[str, ...], what: str) -> None:
    if key in lists:
        group[key].append(value)
    elif key in group:
        raise UserError(f"--{key.replace('_', '-')} given twice for {what} {group[head]}")
    else:
        group[key] = value


def _add_ip_options(p: argparse.ArgumentParser, embed: bool = False) -> None:
    from .discovery import PRESETS
    from .images import FITS
    from .ip_adapter import COMBINE_MODES
    from .steering import TIMINGS, WEIGHT_TYPES
    from .models.attention import EMBEDS_SCALINGS

    g = p.add_argument_group("IP-Adapter (exactly one: its shapes say which features to compute)" if embed else
                             "IP-Adapter (repeat --ip-adapter for several; options apply to the one before them)")
    g.add_argument("--ip-adapter", action=_IPOption, dest="ip_adapter",
                   help=f"preset ({', '.join(PRESETS)}), REPO:PATH on the Hub, a local .bin/.safetensors, "
                        "or a folder from `python -m convert`")
    g.add_argument("--image", action=_IPOption, dest="image", help="a reference image (repeatable)")
    g.add_argument("--image-encoder", action=_IPOption, dest="image_encoder",
                   help="override the CLIP vision tower: folder, REPO:PATH, or repo id")
    g.add_argument("--image-fit", action=_IPOption, dest="image_fit", choices=FITS,
                   help="crop: CLIP's centre crop (default); pad: keep a non-square image whole; tiles: ComfyUI's "
                        "IPAdapter Tiled, square tiles of the image each acting on its part of the picture")
    g.add_argument("--negative-image", action=_IPOption, dest="negative_image",
                   help="replaces the null image in the unconditional branch")
    _add_faceid_options(g, embed)
    if not embed:
        g.add_argument("--image-weight", action=_IPOption, dest="image_weight", type=finite_float,
                       help="weight of each --image, in order (repeatable; default 1)")
        g.add_argument("--scale", action=_IPOption, dest="scale", type=scale_value,
                       help="adapter strength (default 1.0), or per block as diffusers' set_ip_adapter_scale takes "
                            """it: '{"up": {"block_0": [0.0, 1.0, 0.0]}}' (blocks not named get 0)""")
        g.add_argument("--image-embeds", action=_IPOption, dest="image_embeds",
                       help="embeddings from `embed`, instead of --image (no vision tower is loaded)")
        g.add_argument("--combine", action=_IPOption, dest="combine", choices=COMBINE_MODES,
                       help="several images: concat tokens (default, as diffusers), average, norm-average, subtract; "
                            "add, max, min (ComfyUI)")
        g.add_argument("--weight-type", action=_IPOption, dest="weight_type", choices=WEIGHT_TYPES,
                       metavar="TYPE", help="how the scale spreads over the layers, as ComfyUI_IPAdapter_plus "
                                            f"names them: {', '.join(WEIGHT_TYPES)} (default linear)")
        g.add_argument("--layer-weights", action=_IPOption, dest="layer_weights", metavar="INDEX:W,...",
                       help="weight per transformer index (input, middle, output), e.g. 3:1.0,6:0.5; others get 0")
        g.add_argument("--composition-weight", action=_IPOption, dest="composition_weight", type=finite_float,
                       help="style-and-composition types: the weight on the composition layers (default 1.0)")
        g.add_argument("--boost", action=_IPOption, dest="boost", type=finite_float,
                       help="precise types: ComfyUI's style_boost (style-transfer-precise: the composition layers' "
                            "weight) or composition_boost (composition-precise: the style layers'); default --scale")
        g.add_argument("--composition-image", action=_IPOption, dest="composition_image",
                       help="style-and-composition types: a layout reference for the composition layers, the "
                            "--image giving the style (repeatable)")
        g.add_argument("--negative-content-prompt", action=_IPOption, dest="negative_content_prompt", metavar="TEXT",
                       help="InstantStyle: subtract this text's pooled embedding from the image embeds (what the "
                            "reference shows that should not be copied); SDXL adapters reading 1280-d embeds")
        g.add_argument("--negative-content-scale", action=_IPOption, dest="negative_content_scale",
                       type=finite_float, help="how much of it to subtract (default 1.0)")
        g.add_argument("--start-at", action=_IPOption, dest="start_at", type=fraction,
                       help="fraction of the steps before the image prompt acts (default 0)")
        g.add_argument("--end-at", action=_IPOption, dest="end_at", type=fraction,
                       help="fraction of the steps after which it stops (default 1)")
        g.add_argument("--timing", action=_IPOption, dest="timing", choices=TIMINGS,
                       help="step: off at step i of N when i/N < start or (i+1)/N > end (diffusers, default); "
                            "sigma: ComfyUI's, on while the noise level is within the two mapped to sigmas")
        g.add_argument("--mask", action=_IPOption, dest="mask",
                       help="after each --image: that image acts only where this picture is white (one per image)")
        g.add_argument("--embeds-scaling", action=_IPOption, dest="embeds_scaling", choices=EMBEDS_SCALINGS,
                       help="how --scale enters the attention (ComfyUI): V (default, as diffusers), K+V, "
                            "K+V-C-penalty, K+mean-V")


def lora_arg(text: str) -> tuple[str, float]:
    """--lora FILE|REPO:PATH[:SCALE]: the last `:` part is the scale unless it is part of the path (it holds a
    '/' or ends like a weights file)."""
    from .hub import SINGLE_FILE_SUFFIXES

    ref, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or tail.lower().endswith(SINGLE_FILE_SUFFIXES) or not ref:
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the scale {tail!r} of {text!r} is not a number") from None
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"the scale of {text!r} must be a finite number")
    return ref, scale


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE|REPO:PATH[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT, .safetensors or .bin/.pt), fused into the UNet and "
                        "text encoder(s) at SCALE (default 1.0); repeat for several")


def _add_t2i_options(p: argparse.ArgumentParser) -> None:
    from .t2i_adapter import PRESETS

    g = p.add_argument_group("T2I-Adapter (structural control: edges, depth, pose, sketch; repeat for several)")
    g.add_argument("--t2i-adapter", action="append", metavar="REF",
                   help=f"preset ({', '.join(PRESETS)}), Hub repo id, REPO:FOLDER, a diffusers folder, "
                        "a single file (TencentARC's t2iadapter_*.pth, or diffusers' weights as one file) or "
                        "REPO:PATH to one, or a folder from `python -m convert`")
    g.add_argument("--t2i-image", action="append", metavar="PATH",
                   help="the control image of each --t2i-adapter, in order (one each); the picture's size "
                        "defaults to the first one's")
    g.add_argument("--adapter-conditioning-scale", action="append", type=finite_float, metavar="S",
                   help="its features are multiplied by S (default 1.0); once for all, or once per adapter")
    g.add_argument("--adapter-conditioning-factor", action="append", type=fraction, metavar="F",
                   help="the fraction of the first steps it acts in (default 1.0); once for all, or once per adapter")


def _add_faceid_options(g, embed: bool) -> None:
    """FaceID adapters (faceid.py): a face instead of a reference picture."""
    g.add_argument("--face-image", action=_IPOption, dest="face_image", metavar="FILE",
                   help="FaceID: a photo of the face (repeatable: portrait's several faces); needs insightface "
                        """(pip install ".[faceid]"; its models are for non-commercial research)""")
    if embed:
        return
    g.add_argument("--face-embeds", action=_IPOption, dest="face_embeds", metavar="FILE",
                   help="FaceID: identity embeddings, (faces, 512) .npy or .safetensors (from `embed --face-image`), "
                        "instead of --face-image; Plus adapters also need the aligned face crop as --image")
    g.add_argument("--faceid-v2-weight", action=_IPOption, dest="faceid_v2_weight", type=finite_float, metavar="W",
                   help="FaceID Plus v2: scale of the CLIP branch added to the identity tokens (default 1.0; given to a "
                        "Plus file not named plusv2, it turns v2's shortcut on)")
    g.add_argument("--faceid-lora-scale", action=_IPOption, dest="faceid_lora_scale", type=finite_float, metavar="S",
                   help="FaceID: strength of the LoRA its file carries (default 1.0, the authors'; ComfyUI uses 0.6)")


class _ControlOption(_IPOption):
    """ControlNet options, each belonging to the --controlnet before it."""

    store = "control_args"


def _add_controlnet_options(p: argparse.ArgumentParser) -> None:
    from .controlnet import PRESETS, PREPROCESSORS

    g = p.add_argument_group("ControlNet (repeat --controlnet for several: residuals summed; options apply to the "
                             "one before them)")
    g.add_argument("--controlnet", action=_ControlOption, dest="controlnet", metavar="REF",
                   help=f"preset ({', '.join(PRESETS)}), a Hub repo, REPO:FOLDER or diffusers folder, an original "
                        ".pth/.safetensors file or REPO:PATH, or a folder from `python -m convert`")
    g.add_argument("--control-image", action=_ControlOption, dest="control_image", metavar="FILE",
                   help="its control image (edges, depth, pose map ...), resized to the output size")
    g.add_argument("--control-scale", action=_ControlOption, dest="control_scale", metavar="S", type=finite_float,
                   help="strength of its residuals (default 1.0)")
    g.add_argument("--control-start", action=_ControlOption, dest="control_start", metavar="F", type=fraction,
                   help="fraction of the steps before it acts (default 0): off at step i of N when i/N < start")
    g.add_argument("--control-end", action=_ControlOption, dest="control_end", metavar="F", type=fraction,
                   help="fraction of the steps after which it stops (default 1): off when (i+1)/N > end")
    g.add_argument("--guess-mode", action=_ControlOption, dest="guess_mode", nargs=0,
                   help="the net sees the conditional half only, its residuals scaled 0.1 .. 1 (diffusers' "
                        "guess_mode; try --cfg 3 to 5)")
    g.add_argument("--control-preprocess", action=_ControlOption, dest="control_preprocess", metavar="KIND",
                   help=f"make the control image from a picture: {', '.join(PREPROCESSORS)} (default none: "
                        "used as it is); depth and pose maps come from other tools, see the README")
    g.add_argument("--canny-low", action=_ControlOption, dest="canny_low", metavar="T", type=finite_float,
                   help="canny: the lower hysteresis threshold (default 100, as diffusers' examples)")
    g.add_argument("--canny-high", action=_ControlOption, dest="canny_high", metavar="T", type=finite_float,
                   help="canny: the upper threshold (default 200)")
    g.add_argument("--control-mask", action=_ControlOption, dest="control_mask", metavar="FILE",
                   help="inpaint: white where the picture is to be repainted (those pixels become -1)")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write reference images' CLIP features to a file, for generate --image-embeds",
                       description="Encode reference images once with the CLIP vision tower one IP-Adapter reads; "
                                   "`generate --image-embeds FILE` then skips the encoder.")
    _add_ip_options(p, embed=True)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on the CPU, float16 on a GPU")
    p.add_argument("--output", required=True, help=".safetensors path")


def controlnet_groups(pairs: list[tuple[str, str]]) -> list[dict]:
    """--controlnet options, one dict per net, checked (files readable, window, preprocessor) before any loading."""
    from .controlnet import check_preprocess
    from .images import open_image

    groups = option_groups(pairs, "controlnet", ("control_image",), "ControlNet", "a --controlnet")
    for g in groups:
        if len(g["control_image"]) != 1:
            raise UserError(f"ControlNet {g['controlnet']}: {len(g['control_image'])} --control-image given; "
                            "each --controlnet takes one (give --controlnet again for another image)")
        g["control_image"] = g["control_image"][0]
        g["guess_mode"] = "guess_mode" in g or None
        if g.get("control_start", 0.0) >= g.get("control_end", 1.0):
            raise UserError(f"ControlNet {g['controlnet']}: --control-start {g.get('control_start', 0.0)} must be "
                            f"before --control-end {g.get('control_end', 1.0)}")
        check_preprocess(g.get("control_preprocess", "none"), g.get("control_mask"),
                         ("canny_low" in g or "canny_high" in g))
        for path in [g["control_image"]] + ([g["control_mask"]] if g.get("control_mask") else []):
            open_image(path)
    return groups


def control_from_group(g: dict, index: int, size: tuple[int, int]):
    from .controlnet import Control, preprocess
    from .images import open_image

    mask = open_image(g["control_mask"]) if g.get("control_mask") else None
    image = preprocess(open_image(g["control_image"]), g.get("control_preprocess", "none"), size,
                       g.get("canny_low", 100), g.get("canny_high", 200), mask)
    return Control(image, index, g.get("control_scale", 1.0), g.get("control_start", 0.0),
                   g.get("control_end", 1.0), bool(g["guess_mode"]))


def _embed(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter

    from . import discovery
    from .images import open_image
    from .ip_adapter import encode_images, save_features
    from .loading import load_component
    from .pipeline import default_dtype

    groups = ip_groups(getattr(args, "ip_args", None) or [])
    if len(groups) != 1:
        raise UserError("embed takes exactly one --ip-adapter (its shapes say which features to compute)")
    g = groups[0]
    if not g["image"] and not g["face_image"]:
        raise UserError("give at least one --image (or --face-image for a FaceID adapter)")
    if not args.output.endswith(".safetensors"):
        raise UserError(f"--output must be a .safetensors path, got {args.output}")
    if g.get("image_fit") == "tiles":
        raise UserError("--image-fit tiles gives each tile a mask of its part of the picture, which saved "
                        "embeddings do not keep: use it with generate")
    check_writable(args.output)
    if g["face_image"]:
        from .faceid import embed_faces

        file, _ = discovery.resolve_ip_adapter(g["ip_adapter"])
        embed_faces(read_ip_adapter(file), g["face_image"], args.output,
                    {"ip_adapter": g["ip_adapter"], "face_images": g["face_image"]})
        print(args.output)
        return 0
    images = [open_image(p) for p in g["image"]]
    negative = open_image(g["negative_image"]) if g.get("negative_image") else None
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()
    file, hub_ref = discovery.resolve_ip_adapter(g["ip_adapter"])
    adapter = read_ip_adapter(file, dtype)
    folder, source = discovery.resolve_image_encoder(adapter, file, hub_ref, g.get("image_encoder"))
    encoder = load_component(folder, "image_encoder", dtype)
    hidden = adapter.config.image_proj.reads_hidden_states
    features = encode_images(encoder, images, hidden, g.get("image_fit", "crop"), negative)
    save_features(args.output, features, {"ip_adapter": g["ip_adapter"], "images": g["image"],
                                          "image_encoder": source})
    print(args.output)
    return 0


def _image_prompts(pipe, groups: list[dict]) -> list:
    from . import faceid
    from .images import open_image
    from .ip_adapter import ImagePrompt, join_features, load_features

    prompts = []
    for g in groups:
        face = bool(g["face_image"] or g["face_embeds"])
        if (bool(g["image"]) == bool(g["image_embeds"]) and not face) or (face and g["image_embeds"]):
            raise UserError(f"IP-Adapter {g['ip_adapter']}: give --image or --image-embeds (one of them; FaceID: "
                            "--face-image or --face-embeds)")
        images = [open_image(p) for p in g["image"]]
        features = join_features([load_features(p) for p in g["image_embeds"]]) if g["image_embeds"] else None
        n = len(images) if images else features.cond.shape[0] if features else len(g["face_image"]) or None
        if n and g["image_weight"] and len(g["image_weight"]) != n:
            raise UserError(f"IP-Adapter {g['ip_adapter']}: {len(g['image_weight'])} --image-weight for {n} images")
        if n and g["mask"] and len(g["mask"]) != n:
            raise UserError(f"IP-Adapter {g['ip_adapter']}: {len(g['mask'])} --mask for {n} images (one per image)")
        index = pipe.load_ip_adapter(g["ip_adapter"], image_encoder=g.get("image_encoder"), scale=g.get("scale", 1.0),
                                     lora_scale=g.get("faceid_lora_scale"))
        face_embeds = None
        if face or g.get("faceid_v2_weight") is not None:
            face_embeds, images = faceid.cli_faces(pipe.adapters[index], g, images)
        prompts.append(ImagePrompt(
            images=images, features=features, weights=g["image_weight"] or None,
            negative=open_image(g["negative_image"]) if g.get("negative_image") else None,
            combine=g.get("combine", "concat"), fit=g.get("image_fit", "crop"),
            **{k: g.get(k, default) for k, default in STEERING.items()},
            masks=[open_image(p) for p in g["mask"]] or None, embeds_scaling=g.get("embeds_scaling", "V"),
            composition_images=[open_image(p) for p in g["composition_image"]] or None,
            negative_content=g.get("negative_content_prompt"),
            negative_content_scale=g.get("negative_content_scale", 1.0),
            face_embeds=face_embeds, faceid_v2_weight=g.get("faceid_v2_weight"),
        ))
        faceid.check_prompt(pipe.adapters[index], prompts[-1])  # a face for FaceID, a picture for the others
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


def check_memory(pipe, args: argparse.Namespace, height: int, width: int) -> None:
    """Refuse, before sampling allocates anything, a run whose estimate exceeds what this machine can give:
    it would swap, be killed, or crash inside MLX. --no-memory-check turns the refusal into a warning."""
    need = pipe.estimate_memory(height, width, args.num_images)
    have, what = memory_budget()
    if need <= have:
        return
    tips = [t for t, on in (("--low-memory", not args.low_memory), ("--quantize 8 (or 4)", not args.quantize),
                            ("a smaller --height/--width", True)) if on]
    message = (f"this run needs about {need / 2**30:.1f} GiB at {width}x{height}, more than the "
               f"{have / 2**30:.1f} GiB {what}; try {', '.join(tips)}")
    if not args.no_memory_check:
        raise UserError(message + " (or --no-memory-check to run anyway)")
    print(f"warning: {message}; running anyway (--no-memory-check): it may swap or be stopped", file=sys.stderr)


def output_paths(output: str, count: int) -> list[Path]:
    """The PNGs a run writes: --output itself, or with several images NAME_1.png, NAME_2.png, ..."""
    out = Path(output)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(count)]


def check_writable(output: str) -> None:
    """Fail before any work when the output cannot be written (a folder, a file where a folder should be,
    a read-only place)."""
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {output} is a folder; give a file path")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"cannot write --output {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --output {output}: {parent} is not writable")


FAST_FLAGS = ("steps", "cfg", "scheduler")  # what a --fast preset sets unless given


def _add_fast_options(p: argparse.ArgumentParser) -> None:
    from .fast import PRESETS
    from .samplers import SPACINGS

    g = p.add_argument_group("Few-step sampling (LCM, TCD, SDXL-Lightning, Hyper-SD)")
    g.add_argument("--fast", choices=list(PRESETS), metavar="PRESET", default=None,
                   help="load an accelerator LoRA and use its authors' sampler, steps and guidance; flags given "
                        "win. lcm, tcd, hyper-N pick the model's family; lcm-sd15, lightning-N (SDXL), "
                        f"hyper-sdxl-N, ... name it. One of: {', '.join(PRESETS)}")
    g.add_argument("--timestep-spacing", choices=SPACINGS, default=None,
                   help="override the scheduler config's (SDXL-Lightning and Hyper-SD want trailing)")
    g.add_argument("--eta", type=finite_float, default=None,
                   help="TCD's gamma in [0, 1]: 0 deterministic, more adds fresh noise each step (default 0.3)")
    defaults = {}
    for action in p._actions:  # a preset fills what the user left out: "not given" must differ from the default
        if action.dest in FAST_FLAGS:
            defaults[action.dest] = action.default
            action.help = f"{action.help} (default: {action.default}, or the --fast preset's)"
            action.default = None
    p.set_defaults(fast_defaults=defaults)


def fill_fast_flags(args: argparse.Namespace) -> None:
    """--steps/--cfg/--scheduler/--timestep-spacing/--eta as given, else the --fast preset's, else the defaults."""
    from .fast import settings

    given = {k: getattr(args, k) for k in (*FAST_FLAGS, "timestep_spacing", "eta")}
    chosen = settings(args.fast, **given) if args.fast else given
    for k, v in chosen.items():
        setattr(args, k, args.fast_defaults.get(k) if v is None else v)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from .pipeline import DEFAULT_MODEL, DEFAULT_SCHEDULER, DEFAULT_STEPS, DEFAULT_STRENGTH
    from .samplers import SAMPLERS

    p = sub.add_parser("generate", help="text-to-image / image-to-image, with image prompts",
                       description="Text-to-image or image-to-image with Stable Diffusion 1.x/2.x or SDXL, "
                                   "optionally steered by reference images through IP-Adapters.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hub repo id, diffusers folder, single .safetensors/.ckpt file, or converted MLX folder")
    p.add_argument("--prompt", default="", help="text prompt (default: none)")
    p.add_argument("--negative-prompt", default=None,
                   help="default: none (SD 1.x: the empty prompt; SDXL: zero embeddings, as diffusers)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
    p.add_argument("--cfg", type=guidance, default=7.5, help="classifier-free guidance scale (<= 1 turns it off)")
    p.add_argument("--seed", type=seed_number, default=None, help="0..2**64-1 (default: random, recorded in the PNG)")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size (or the init image's)")
    p.add_argument("--width", type=int, default=None, help="default: as --height")
    p.add_argument("--scheduler", choices=list(SAMPLERS), default=DEFAULT_SCHEDULER, help="the sampler")
    p.add_argument("--num-images", type=int, default=1, help="pictures from one prompt (one batch)")
    p.add_argument("--init-image", default=None, help="image-to-image: the starting picture")
    p.add_argument("--strength", type=finite_float, default=None,
                   help=f"image-to-image: how much to change it, (0, 1] (default: {DEFAULT_STRENGTH})")
    p.add_argument("--latents", default=None,
                   help="starting noise as a .npy file of floats, NCHW, exactly as diffusers' latents= takes it")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on the CPU, float16 on a GPU")
    p.add_argument("--tokenizer", default=None, help="single-file models: tokenizer folder or Hub repo")
    p.add_argument("--config", default=None,
                   help="single-file models: diffusers folder or Hub repo whose configs to use instead of inferring")
    p.add_argument("--output", default="out.png",
                   help="PNG path; with several images, _1, _2, ... are added before the extension")
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-conditioning (default: the output size)")
    p.add_argument("--crop-coords", type=int, nargs=2, metavar=("TOP", "LEFT"), default=[0, 0],
                   help="SDXL micro-conditioning (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-conditioning (default: the output size)")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                   help="quantize the Linear layers of the text encoder, UNet and image encoder on load")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="with --quantize")
    p.add_argument("--low-memory", action="store_true",
                   help="free the text and image encoders after encoding; decode the VAE in tiles")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the memory estimate exceeds this machine (it may swap or be stopped)")
    p.add_argument("--verbose", action="store_true", help="print timings, peak memory, device and BLAS")
    p.add_argument("--parallel", choices=("cfg",), default=None,
                   help="cfg: under `mlx.launch -n 2`, the two halves of classifier-free guidance on two ranks "
                        "(machines), exchanged every step; rank 0 writes the picture")
    _add_ip_options(p)
    _add_controlnet_options(p)
    _add_t2i_options(p)
    _add_inpaint_options(p)
    _add_lora_options(p)
    _add_fast_options(p)


def _add_inpaint_options(p: argparse.ArgumentParser) -> None:
    from .inpainting import FILLS

    g = p.add_argument_group("inpainting and outpainting (README: Inpainting and outpainting)")
    g.add_argument("--mask-image", default=None,
                   help="with --init-image: repaint where the mask is white, keep where black (diffusers' rule; "
                        "binarised at 50%%, resized to the picture as diffusers does when the sizes differ). "
                        "Inpainting models (9-channel UNet) need it; ordinary models blend the kept part back")
    g.add_argument("--mask-blur", type=finite_float, default=0.0, metavar="PX",
                   help="Gaussian blur of the mask, in pixels (diffusers' mask_processor.blur): rounds its "
                        "corners and softens the paste-back edge")
    g.add_argument("--padding-mask-crop", type=int, default=None, metavar="PX",
                   help="repaint only a crop around the mask, PX pixels wider, at the full output size, and paste "
                        "it back into the picture (diffusers' padding_mask_crop: small edits in large photos)")
    g.add_argument("--keep-unmasked", action="store_true",
                   help="paste the original pixels back outside the mask (exactly; diffusers' apply_overlay); "
                        "the result then has the init image's size")
    g.add_argument("--outpaint", type=int, nargs=4, default=None, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                   help="extend the init image by these many pixels (multiples of 8) and paint the new border")
    g.add_argument("--outpaint-fill", choices=FILLS, default="edge",
                   help="what the new border holds before it is painted (default edge: the nearest edge pixel)")


def _inpaint_inputs(args: argparse.Namespace, init):
    """(init image, mask or None) for the inpainting options, checked before anything big is loaded."""
    from .inpainting import open_mask, outpaint_canvas, read_mask

    mask = open_mask(args.mask_image) if args.mask_image else None
    if mask is not None and init is None:
        raise UserError("--mask-image needs an --init-image (the picture to repaint)")
    if args.outpaint:
        if init is None:
            raise UserError("--outpaint needs an --init-image (the picture to extend)")
        if mask is not None:
            raise UserError("--outpaint makes its own mask (the new border); it does not combine with --mask-image")
        init, mask = outpaint_canvas(init, tuple(args.outpaint), args.outpaint_fill, seed=args.seed or 0)
    if mask is None:
        for flag, given in (("--mask-blur", args.mask_blur), ("--padding-mask-crop", args.padding_mask_crop is not None),
                            ("--keep-unmasked", args.keep_unmasked)):
            if given:
                raise UserError(f"{flag} is for inpainting: give a --mask-image (or --outpaint) too")
    else:
        read_mask(mask, args.mask_blur)  # checks the blur
        if args.padding_mask_crop is not None and args.padding_mask_crop < 0:
            raise UserError(f"--padding-mask-crop must be >= 0 pixels, got {args.padding_mask_crop}")
    return init, mask


@dataclass
class Checked:
    """What `check_generate` found before anything big is loaded."""

    init: object  # PIL image or None
    latents: object  # numpy array or None
    groups: list[dict]  # one dict per --ip-adapter (ip_groups)
    seed: int
    dtype: object  # mx.Dtype
    t2i: list[tuple]  # t2i_adapter.cli_requests
    mask: object = None  # PIL image or None: inpainting (or outpainting's border)
    control_groups: list[dict] = field(default_factory=list)  # one dict per --controlnet (controlnet_groups)
    ranks: "Ranks | None" = None  # with --parallel cfg: the two ranks that share the guidance batch


def check_generate(args: argparse.Namespace) -> Checked:
    """Every check that needs no model: sizes, the output path, the input files, the adapter options."""
    import mlx.core as mx
    import numpy as np

    from . import t2i_adapter
    from .images import open_image
    from .pipeline import default_dtype
    from .samplers import check_options as check_sampler
    from .steering import check_options, check_window

    fill_fast_flags(args)
    check_sampler(args.scheduler, args.timestep_spacing, args.eta)
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
    for path in output_paths(args.output, min(args.num_images, 10_000)):
        check_writable(str(path))
    if args.strength is not None and not args.init_image:
        raise UserError("--strength is for image-to-image: give an --init-image too")
    init = open_image(args.init_image) if args.init_image else None
    init, mask = _inpaint_inputs(args, init)
    latents = None
    if args.latents:
        if init is not None and mask is None:
            raise UserError("--latents is the text-to-image starting noise; it does not combine with --init-image")
        latents = read_latents(args.latents)
    groups = ip_groups(getattr(args, "ip_args", None) or [])
    for g in groups:  # check the files and the window before loading anything big
        check_window(g.get("start_at", 0.0), g.get("end_at", 1.0))
        check_options(g.get("weight_type", "linear"), g.get("boost"), bool(g["composition_image"]))
        if "negative_content_scale" in g and g.get("negative_content_prompt") is None:
            raise UserError("--negative-content-scale needs a --negative-content-prompt")
        negative = [g["negative_image"]] if g.get("negative_image") else []
        for path in g["image"] + g["composition_image"] + g["face_image"] + negative:
            open_image(path)
    control_groups = controlnet_groups(getattr(args, "control_args", None) or [])
    t2i = t2i_adapter.cli_requests(args)  # checks counts and opens the control images before loading anything
    seed = args.seed if args.seed is not None else int(np.random.randint(0, 2**31 - 1))
    ranks = parallel_ranks(args) if getattr(args, "parallel", None) else None
    if ranks is not None and args.seed is None:  # one random seed for both ranks (rank 0's), for the PNG too
        from .denoiser import CFGSplit

        seed = CFGSplit(ranks.group).seed()
    if ranks is not None and ranks.rank != 0:  # rank 0 tells what happens; the other says only what goes wrong
        logging.getLogger("ipadapter_mlx").setLevel(logging.WARNING)
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()
    return Checked(init, latents, groups, seed, dtype, t2i, mask, control_groups, ranks)


def parallel_ranks(args: argparse.Namespace) -> "Ranks":
    """--parallel cfg: this process's place among exactly two ranks of `mlx.launch`, with guidance to split."""
    from .batch import Ranks

    if args.cfg <= 1:
        given = f"--fast {args.fast}'s --cfg {args.cfg}" if getattr(args, "fast", None) else f"--cfg {args.cfg}"
        raise UserError(f"--parallel cfg splits the two halves of classifier-free guidance, and with {given} (<= 1) "
                        "there is only one: give --cfg above 1, or leave --parallel cfg out")
    ranks = Ranks()
    if ranks.size != 2:
        raise UserError(f"--parallel cfg needs exactly 2 ranks: run it under `mlx.launch -n 2` (or --hostfile with "
                        f"two hosts); this run has {ranks.size}")
    return ranks


def load_pipeline(args: argparse.Namespace, dtype):
    """The pipeline the options name (`batch` keeps it between jobs whose pipeline_key is the same)."""
    from .pipeline import StableDiffusion

    quantize = (args.quantize, args.group_size) if args.quantize else None
    pipe = StableDiffusion.from_pretrained(args.model, dtype=dtype, quantize=quantize, low_memory=args.low_memory,
                                           tokenizer=args.tokenizer, config=args.config)
    load_loras(pipe, args)
    return pipe


def load_loras(pipe, args: argparse.Namespace) -> None:
    """--lora and the --fast preset's LoRA: fused into the UNet and text encoder(s)."""
    for ref, scale in args.lora:
        pipe.load_lora(ref, scale)
    if args.fast:
        from .fast import apply_preset

        apply_preset(pipe, args.fast)


def pipeline_key(args: argparse.Namespace) -> tuple:
    """The options load_pipeline reads, but the LoRAs (`batch` changes those in place)."""
    return (args.model, args.dtype, args.quantize, args.quantize and args.group_size, args.low_memory,
            args.tokenizer, args.config)


def prepare_prompts(pipe, checked: Checked) -> tuple[list | None, list]:
    """Load the IP-Adapters, ControlNets and T2I-Adapters into `pipe`: (image prompts, T2I controls); find each
    image encoder that will run."""
    from . import t2i_adapter

    groups = checked.groups
    prompts = _image_prompts(pipe, groups) if groups else None
    for g in checked.control_groups:
        pipe.load_controlnet(g["controlnet"])
    for i, p in enumerate(prompts or []):
        if p.images or p.composition_images:  # the encoder will run: find it now, so the estimate counts it
            pipe.image_encoder_folder(i)
    return prompts, t2i_adapter.cli_controls(pipe, checked.t2i)


def render(pipe, args: argparse.Namespace, checked: Checked, prompts: list | None, controls: list,
           progress: bool = True, decode: bool = True):
    """Sample and decode: (PIL pictures, the PNG parameters, sampling seconds, the last Step); without `decode`
    (the other rank of --parallel cfg) no pictures and no parameters."""
    import mlx.core as mx
    from tqdm import tqdm

    from .controlnet import Control
    from .images import open_image, to_pil
    from .loading import read_json
    from .pipeline import DEFAULT_STRENGTH

    init, latents, groups, seed, dtype = checked.init, checked.latents, checked.groups, checked.seed, checked.dtype
    mask = checked.mask
    # without a size, text-to-image takes the first control image's (its size before any preprocessing)
    first = [Control(open_image(g["control_image"])) for g in checked.control_groups[:1]]
    height, width = pipe.output_size(*pipe.control_size(args.height, args.width, first, controls)
                                     if init is None else (args.height, args.width), init)
    check_memory(pipe, args, height, width)
    nets = [control_from_group(g, i, (width, height)) for i, g in enumerate(checked.control_groups)]
    strength = (DEFAULT_STRENGTH if mask is None else 1.0) if args.strength is None else args.strength
    steps = pipe.generate_latents(
        args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg, seed=seed,
        height=height, width=width, scheduler=args.scheduler, num_images=args.num_images,
        init_image=init, strength=strength, latents=latents, image_prompts=prompts,
        original_size=tuple(args.original_size) if args.original_size else None, crop_coords=tuple(args.crop_coords),
        target_size=tuple(args.target_size) if args.target_size else None, t2i_adapters=controls,
        timestep_spacing=args.timestep_spacing, eta=args.eta,
        mask_image=mask, mask_blur=args.mask_blur, padding_mask_crop=args.padding_mask_crop, controls=nets or None,
        parallel_cfg=checked.ranks.group if checked.ranks is not None else None,
    )
    t1 = time.perf_counter()
    step = None
    for step in tqdm(steps, desc="sampling", unit="step", file=sys.stderr, disable=not progress):
        pass
    t_sample = time.perf_counter() - t1
    if not decode:
        return [], {}, t_sample, step
    images = pipe.decode(step.latents)
    mx.eval(images)
    pictures = steps.inpaint.overlay(images, args.keep_unmasked) if steps.inpaint else to_pil(images)
    w, h = pictures[0].size
    params = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "steps": args.steps,
        "sampler": args.scheduler, "cfg_scale": args.cfg, "seed": seed, "size": f"{w}x{h}",
        "model": args.model, "dtype": str(dtype).rpartition(".")[2],
    }
    stored = read_json(pipe.folder / "unet" / "config.json").get("quantization")
    if stored:  # a folder converted with --quantize: that is what ran, whatever the flags say
        params["quantize"] = f"{stored['bits']}-bit, group {stored['group_size']} (stored)"
    elif args.quantize:
        params["quantize"] = f"{args.quantize}-bit, group {args.group_size}"
    if pipe.is_sdxl:
        params.update(original_size=args.original_size or [h, w], crop_coords=list(args.crop_coords),
                      target_size=args.target_size or [h, w])
    if init is not None:
        params.update(init_image=str(args.init_image), strength=strength)
    if latents is not None:
        params["latents"] = str(args.latents)
    if args.lora:
        params["loras"] = [{"lora": ref, "scale": scale} for ref, scale in args.lora]
    params.update({k: getattr(args, k) for k in ("fast", "timestep_spacing", "eta") if getattr(args, k) is not None})
    if mask is not None:
        params.update(mask_image=args.mask_image, outpaint=args.outpaint, mask_blur=args.mask_blur or None,
                      padding_mask_crop=args.padding_mask_crop, keep_unmasked=args.keep_unmasked or None)
    if groups:
        params["ip_adapters"] = [
            {k: v for k, v in g.items() if v not in ([], None)} | {"scale": pipe.adapters[i].scale}
            for i, g in enumerate(groups)
        ]
    if checked.control_groups:
        params["controlnets"] = [{k: v for k, v in g.items() if v not in ([], None)} for g in checked.control_groups]
    if checked.t2i:
        params["t2i_adapters"] = [{"t2i_adapter": r[0], "image": r[1], "scale": r[3], "factor": r[4]}
                                  for r in checked.t2i]
    return pictures, params, t_sample, step


def save_images(pictures: list, params: dict, output: str) -> list[Path]:
    """Write the PNGs (atomically), each with its parameters; returns their paths."""
    from .images import save_png

    paths = output_paths(output, len(pictures))
    for i, (image, path) in enumerate(zip(pictures, paths)):
        save_png(image, path, {**params, "image_index": i} if len(pictures) > 1 else params)
    return paths


def _generate(args: argparse.Namespace) -> int:
    import mlx.core as mx

    checked = check_generate(args)
    t0 = time.perf_counter()
    pipe = load_pipeline(args, checked.dtype)
    prompts, controls = prepare_prompts(pipe, checked)
    t_load = time.perf_counter() - t0
    rank = checked.ranks.rank if checked.ranks is not None else 0
    pictures, params, t_sample, step = render(pipe, args, checked, prompts, controls, progress=rank == 0,
                                              decode=rank == 0)
    if rank != 0:  # --parallel cfg: the other rank holds the same latents; rank 0 decodes and writes them
        return 0
    for path in save_images(pictures, params, args.output):
        print(path)
    if args.verbose:
        from . import _malloc
        from ._blas import state

        print(f"load {t_load:.2f} s, sampling {t_sample:.2f} s ({t_sample / max(step.total, 1):.3f} s/step), "
              f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB, {mx.default_device()}, BLAS: {state.describe()}, "
              f"{_malloc.state}", file=sys.stderr)
    return 0


def read_latents(path: str):
    """--latents: a .npy array of floats. Mapped first, so a header that declares more than the file holds is
    refused before anything is allocated; pickled objects are refused; .npz archives are not arrays."""
    import numpy as np

    if not path.endswith(".npy"):
        raise UserError(f"--latents must be a .npy file (np.save of one array), got {path}")
    try:
        latents = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(latents, np.ndarray) and latents.size > 2**28:
            raise ValueError(f"{latents.shape} is far more than any picture's starting noise")
        latents = np.array(latents) if isinstance(latents, np.ndarray) else latents
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read --latents {path}: {e}") from None
    if not isinstance(latents, np.ndarray) or not np.issubdtype(latents.dtype, np.floating):
        raise UserError(f"--latents {path} holds {getattr(latents, 'dtype', type(latents).__name__)} values; "
                        "expected floats")
    return latents


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m ipadapter_mlx",
                    description="Stable Diffusion + IP-Adapter image prompts in MLX. "
                                "Run `python -m ipadapter_mlx COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_embed(sub)
    from .bench import add_parser

    add_parser(sub)
    from .batch import add_parser as add_batch

    add_batch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_log()
    from ._blas import slow_blas_warning

    if args.command in ("generate", "bench", "batch") and (note := slow_blas_warning()):
        print(note, file=sys.stderr)
    try:
        from .batch import main_batch
        from .bench import main_bench

        return {"generate": _generate, "embed": _embed, "bench": main_bench, "batch": main_batch}[args.command](args)
    except UserError as e:
        print(f"error: {_rank()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line; IPADAPTER_MLX_DEBUG=1 shows the trace
        if os.environ.get("IPADAPTER_MLX_DEBUG"):
            raise
        print(f"error: {_rank()}{type(e).__name__}: {e} (set IPADAPTER_MLX_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def _rank() -> str:
    """Under mlx.launch every rank says what went wrong for it: the other ranks' lines name them."""
    rank = os.environ.get("MLX_RANK")
    return f"rank {rank}: " if rank not in (None, "0") else ""
