"""Pixels in and out: reading init images, array <-> PIL, PNGs that carry their generation parameters."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import UserError


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def to_pixels(image: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> mx.array:
    """PIL image or HWC uint8/float array -> (1, H, W, 3) float32 in [-1, 1]; resized (lanczos) to size=(w, h)."""
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if size is not None and arr.shape[1::-1] != tuple(size):
            image = Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if size is not None and image.size != tuple(size):
            image = image.resize(size, Image.LANCZOS)
        arr = np.asarray(image, dtype=np.float32) / 255.0
    return mx.array(arr[None] * 2.0 - 1.0)


# CLIPImageProcessor's defaults, which every IP-Adapter was trained with
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
FITS = ("crop", "pad")


def clip_pixels(images: list[Image.Image], size: int, fit: str = "crop") -> np.ndarray:
    """(n, size, size, 3) normalised pixels, equal to CLIPImageProcessor's defaults for fit="crop":
    shortest side to `size` (bicubic), centre crop, rescale, normalise. fit="pad" first pads a non-square
    image to a square with the CLIP mean colour (which normalises to zero), so no edge is cut away."""
    if fit not in FITS:
        raise UserError(f"unknown image fit {fit!r} (choose from {', '.join(FITS)})")
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if fit == "pad" and w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(int(round(c * 255)) for c in CLIP_MEAN))
            canvas.paste(im, ((side - w) // 2, (side - h) // 2))
            im, (w, h) = canvas, (side, side)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
        top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
        arr = arr[top : top + size, left : left + size] / 255.0
        out.append((arr - CLIP_MEAN) / CLIP_STD)
    return np.stack(out)


def to_pil(images: mx.array) -> list[Image.Image]:
    """(B, H, W, 3) in [0, 1] -> PIL images (rounded like diffusers' numpy_to_pil)."""
    arr = np.array(images.astype(mx.float32))
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def parameters_text(params: dict) -> str:
    """The A1111-style 'parameters' string that image viewers and web UIs read back."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    skip = {"prompt", "negative_prompt"}
    lines.append(", ".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in params.items() if k not in skip))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    """Write atomically (temp file, then rename) with `parameters` and a JSON `ipadapter_mlx` text chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("ipadapter_mlx", json.dumps(params))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
