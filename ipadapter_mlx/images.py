"""Pixels in and out: reading init images, array <-> PIL, PNGs that carry their generation parameters."""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from .errors import UserError
from .files import atomic_file


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as browsers show them
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how PIL may give a 16-bit greyscale PNG
MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # 67 Mpx (200 MB as RGB): far above any size SD works at, under PIL's bomb limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit greyscale is scaled to 8 bits (value / 257; PIL's own convert
    clips it to white), transparency (alpha, LA, a palette's or a tRNS colour) is composited on BACKGROUND
    (white), CMYK, L and 1 are converted by PIL. (PIL itself reads 16-bit RGB(A) PNGs as 8-bit.)"""
    if image.mode in SIXTEEN_BIT or image.mode == "F":
        arr = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # NaN/Inf: 0
        # 16-bit: value / 257. 32-bit integers and floats carry no range of their own: stretch what is there
        top = 65535 if image.mode != "F" and arr.max(initial=0) <= 65535 else max(arr.max(initial=0), 1e-12)
        if image.mode == "F" and 0 <= arr.min(initial=0) and arr.max(initial=0) <= 1:
            top = 1.0  # floats in 0..1, the usual convention
        grey = Image.fromarray(np.clip(np.round(np.nan_to_num(arr) / top * 255), 0, 255).astype(np.uint8))
        t = image.info.get("transparency")
        image = grey if not isinstance(t, int) else Image.merge(
            "LA", (grey, Image.fromarray(np.where(arr == t, 0, 255).astype(np.uint8))))
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise UserError(f"{what} is {width}x{height} pixels; at most {MAX_PIXELS / 1e6:.0f} Mpx ({MAX_SIDE}x{MAX_SIDE})")


@contextmanager
def open_checked(path: str | Path, what: str = "image"):
    """Image.open, refusing a picture over MAX_PIXELS from its header, before anything is decoded. PIL's own
    bomb check stays on beneath it: its warning is quiet (ours is the lower limit), its error our line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise UserError(f"cannot read {what} {path}: {e} (at most {MAX_PIXELS / 1e6:.0f} Mpx)") from None
        with im:
            check_pixels(*im.size, f"{what} {path}")
            yield im


def open_image(path: str | Path) -> Image.Image:
    """An image file as the RGB picture people see: EXIF orientation applied, then to_rgb. The one reader
    of reference, negative and init images. At most MAX_PIXELS (open_checked)."""
    try:
        with open_checked(path) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except UserError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) for a broken file
        raise UserError(f"cannot read image {path}: {e or type(e).__name__}") from None


def to_pixels(image: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> mx.array:
    """PIL image or HWC uint8/float array -> (1, H, W, 3) float32 in [-1, 1]; resized (lanczos) to size=(w, h)."""
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if not np.isfinite(arr).all():
            raise UserError("the image array holds NaN or Inf values")
        if size is not None and arr.shape[1::-1] != tuple(size):
            image = Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))
    if isinstance(image, Image.Image):
        image = to_rgb(image)
        if size is not None and image.size != tuple(size):
            image = image.resize(size, Image.LANCZOS)
        arr = np.asarray(image, dtype=np.float32) / 255.0
    return mx.array(arr[None] * 2.0 - 1.0)


def mask_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A regional mask -> (h, w) float32 0/1 for a (w, h) picture, as diffusers' IPAdapterMaskProcessor:
    greyscale, then resized (lanczos), white from 0.5 up."""
    image = to_rgb(image).convert("L")
    if image.size != tuple(size):
        image = image.resize(size, Image.LANCZOS)
    grey = np.asarray(image, dtype=np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)


# CLIPImageProcessor's defaults, which every IP-Adapter was trained with
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
FITS = ("crop", "pad", "tiles")
TILE = 256  # ComfyUI's IPAdapter Tiled: tiles of 256 px (CLIP then takes each at 224)
MAX_TILES = 4  # along the long side; a longer reference is centre-cropped to 4 tiles
MAX_EXACT_ASPECT = 64  # up to 1:64 the resized picture is small (under 10 MB at 224): resize it whole


def _centre_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """torchvision's CenterCrop: the offsets rounded half to even, as Python's round."""
    left, top = int(round((image.width - width) / 2)), int(round((image.height - height) / 2))
    return image.crop((left, top, left + width, top + height))


def tile_reference(image: Image.Image, mask: Image.Image | None = None) -> tuple[list[Image.Image], list[Image.Image]]:
    """ComfyUI_IPAdapter_plus' IPAdapter Tiled: a reference cut into square tiles that each act on their part of
    the picture, so a wide or tall reference is seen whole and in detail. A near-square one (aspect within
    0.75..1.33) is centre-cropped square and resized to 512 (2 x 2 tiles); any other has its short side resized to
    256 (lanczos), the long side in proportion, centre-cropped to 4 tiles when longer. Tiles of 256 px overlap
    evenly where the side is not a multiple of 256. Each tile's mask is white on its own box (within `mask`, if
    given: resized with the reference, bicubic) in the reference's frame, which the picture's is mapped onto.
    ComfyUI's optional sharpening is not done. Returns (tiles, masks)."""
    image = to_rgb(image)
    w, h = image.size
    grey = to_rgb(mask).convert("L").resize((w, h), Image.BICUBIC) if mask is not None else Image.new("L", (w, h), 255)
    if 0.75 < h / w < 1.33:
        side = min(w, h)
        image, grey, size = _centre_crop(image, side, side), _centre_crop(grey, side, side), (2 * TILE, 2 * TILE)
    else:
        size = (int(TILE * w / h), TILE) if h < w else (TILE, int(TILE * h / w))
    if h / w > MAX_TILES or h / w < 1 / MAX_TILES:  # cut to the centre 4 tiles
        crop = (MAX_TILES * TILE, TILE) if h < w else (TILE, MAX_TILES * TILE)
        if max(size) <= MAX_EXACT_ASPECT * TILE:  # as ComfyUI: the whole reference resized, then cut
            image, grey = (_centre_crop(a.resize(size, f), *crop) for a, f in ((image, Image.LANCZOS),
                                                                                (grey, Image.BICUBIC)))
        else:  # 256 x 5 million for a 1 x 20000 reference: the same source pixels, resampled for the kept part
            left, top = int(round((size[0] - crop[0]) / 2)), int(round((size[1] - crop[1]) / 2))
            sx, sy = w / size[0], h / size[1]
            box = (left * sx, top * sy, (left + crop[0]) * sx, (top + crop[1]) * sy)
            image, grey = image.resize(crop, Image.LANCZOS, box=box), grey.resize(crop, Image.BICUBIC, box=box)
    else:
        image, grey = image.resize(size, Image.LANCZOS), grey.resize(size, Image.BICUBIC)
    w, h = image.size
    nx, ny = math.ceil(w / TILE), math.ceil(h / TILE)
    ox, oy = max(0, (nx * TILE - w) / max(nx - 1, 1)), max(0, (ny * TILE - h) / max(ny - 1, 1))
    tiles, masks = [], []
    for y in range(ny):
        for x in range(nx):
            box = (int(x * (TILE - ox)), int(y * (TILE - oy)))
            box += (box[0] + TILE, box[1] + TILE)
            tiles.append(image.crop(box))
            tile_mask = Image.new("L", (w, h), 0)
            tile_mask.paste(grey.crop(box), box[:2])
            masks.append(tile_mask)
    return tiles, masks


def clip_pixels(images: list[Image.Image], size: int, fit: str = "crop") -> np.ndarray:
    """(n, size, size, 3) normalised pixels, equal to CLIPImageProcessor's defaults for fit="crop":
    shortest side to `size` (bicubic), centre crop, rescale, normalise. fit="pad" first scales a non-square
    image's long side to `size` and pads it to a square with the CLIP mean colour (which normalises to
    zero), so no edge is cut away. Memory stays bounded for any aspect ratio."""
    if fit == "tiles":  # cut into square tiles with masks before this (adapters.tiled)
        raise UserError("fit 'tiles' gives each tile a mask of its part of the picture: use it in an ImagePrompt "
                        "(generate), not to encode features alone")
    if fit not in FITS:
        raise UserError(f"unknown image fit {fit!r} (choose from {', '.join(FITS)})")
    out = []
    for im in images:
        im = to_rgb(im)
        w, h = im.size
        if fit == "pad" and w != h:  # long side to `size`, then pad: a 1x4000 picture costs size x size
            im = ImageOps.pad(im, (size, size), Image.BICUBIC, tuple(int(round(c * 255)) for c in CLIP_MEAN))
            w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
        left, top = (nw - size) // 2, (nh - size) // 2
        if new_long <= MAX_EXACT_ASPECT * size:  # as CLIPImageProcessor: resize the whole picture, then crop
            arr = np.asarray(im.resize((nw, nh), Image.BICUBIC))[top : top + size, left : left + size]
        else:  # 224 x 896000 for a 1x4000 reference: resample only the part the crop keeps (PIL's box=
            # reads the same source pixels; its float coefficients differ in the last bits: within 2 levels)
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            arr = np.asarray(im.resize((size, size), Image.BICUBIC, box=box))
        arr = arr.astype(np.float32) / 255.0
        out.append((arr - CLIP_MEAN) / CLIP_STD)
    return np.stack(out)


def to_pil(images: mx.array) -> list[Image.Image]:
    """(B, H, W, 3) in [0, 1] -> PIL images (rounded like diffusers' numpy_to_pil)."""
    arr = np.array(images.astype(mx.float32))
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


LABELS = {"cfg_scale": "CFG scale", "ip_adapters": "IP-Adapter", "ip_adapter": "IP-Adapter",  # A1111's names
          "t2i_adapters": "T2I-Adapter", "t2i_adapter": "T2I-Adapter"}


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " ").capitalize())


def _fields(key: str, value, label: str | None = None):
    """(label, text) pairs: a list as "a, b", a dict or a list of dicts one pair per field
    ("IP-Adapter 1: sd15, IP-Adapter 1 scale: 0.6"); None is left out, as A1111 does."""
    label = label or _label(key)
    if value is None:
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value, 1):
            yield from _fields(key, v, f"{label} {i}")
    elif isinstance(value, dict):
        for k, v in value.items():  # a field named like its parent ("ip_adapter" in "ip_adapters") is its head
            yield from _fields(k, v, label if _label(k) == _label(key) else f"{label} {k.replace('_', ' ')}")
    elif isinstance(value, (list, tuple)):
        yield label, ", ".join(str(v) for v in value)
    else:
        yield label, str(value)


def _quote(text: str) -> str:
    """A1111's rule: a value holding a comma, colon or newline is written as a JSON string."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(params: dict) -> str:
    """The A1111-style 'parameters' string that image viewers and web UIs read back (the JSON chunk keeps
    the exact values)."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = [f for k, v in params.items() if k not in ("prompt", "negative_prompt") for f in _fields(k, v)]
    lines.append(", ".join(f"{label}: {_quote(text)}" for label, text in fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    """Write atomically (temp file, then rename) with `parameters` and a JSON `ipadapter_mlx` text chunk.
    The file gets the mode the umask gives a new file (mkstemp's would be 0600)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("ipadapter_mlx", json.dumps(params))
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
