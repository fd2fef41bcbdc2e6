"""Inpainting and outpainting, as diffusers' StableDiffusion(XL)InpaintPipeline does them.

Masks are read as diffusers' VaeImageProcessor reads them (white = repaint): optionally cropped around the
mask (padding_mask_crop), resized (lanczos), greyscale, binarised at 0.5; then nearest-neighbour downsampled
to the latents. The masked image is image x (mask < 0.5). The image latents are *sampled* from the VAE's
distribution (mean + std x noise), as diffusers' default `sample_mode="sample"`, drawn in diffusers' order:
image (4-channel UNet or strength < 1), start noise, masked image.

- A 9-channel (inpainting) UNet gets [latents, mask, masked-image latents] as its input (a Denoiser hook).
- A 4-channel UNet gets the known region blended back after every step,
  (1 - m) * (image + sigma_next * noise) + m * x, and the clean image latents after the last one. The blend is
  applied where the UNet reads the latents (a hook) and to every Step the pipeline yields; the sampler's own
  copy of the known region is left stale. That is exact, not an approximation: the mask is binary, and every
  sampler updates each latent pixel from that pixel's own values (elementwise), so the repainted pixels see the
  same numbers as in diffusers and the known ones are overwritten wherever they are read.

After decoding, `overlay` pastes the original back outside the (blurred) mask as diffusers' apply_overlay
(always with padding_mask_crop, which repaints a crop at full resolution; with keep_unmasked otherwise).
`outpaint_canvas` makes the canvas and mask for outpainting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .denoiser import UNetInput
from .errors import UserError
from .images import SIXTEEN_BIT, check_pixels, open_checked, to_pil, to_pixels, to_rgb

if TYPE_CHECKING:
    from .pipeline import StableDiffusion
    from .samplers import NoiseFn

# samplers whose diffusers scheduler keeps its latents in the DDPM space sqrt(a) x0 + sqrt(1-a) eps (samplers.py):
# diffusers' `latents=` at strength < 1 starts there at the first kept step, not at the schedule's first one
DDPM_SPACE = ("ddim", "dpmpp-2m", "dpmpp-2m-karras")
FILLS = ("edge", "noise", "grey")
MAX_BLUR = 1024  # pixels: wider than any picture SD makes


def as_pil(image: Image.Image | np.ndarray, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise UserError(f"the {what} array has shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if arr.size == 0:
        raise UserError(f"the {what} array is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise UserError(f"the {what} array must hold finite numbers")
    if arr.dtype != np.uint8:  # floats in [0, 1], as diffusers takes numpy images
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def open_mask(path: str | Path) -> Image.Image:
    """A mask file in its own mode (EXIF orientation applied): a transparent pixel counts by its colour, as
    diffusers reads masks (open_image would composite it on white, which would repaint everything)."""
    try:
        with open_checked(path, "mask image") as im:
            mask = ImageOps.exif_transpose(im)
            mask.load()
            return mask
    except FileNotFoundError:
        raise UserError(f"mask image not found: {path}") from None
    except UserError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many kinds for a broken file
        raise UserError(f"cannot read mask image {path}: {e or type(e).__name__}") from None


def read_mask(mask: Image.Image | np.ndarray, blur: float = 0.0) -> Image.Image:
    """The mask as diffusers' mask processor is given it: its own PIL mode (16-bit and float greyscale scaled to
    8 bits first, which PIL's convert would clip), blurred by `blur` pixels as diffusers' mask_processor.blur."""
    mask = as_pil(mask, "mask")
    if mask.mode in SIXTEEN_BIT or mask.mode == "F":
        mask = to_rgb(mask)
    if not math.isfinite(blur) or blur < 0:
        raise UserError(f"mask blur must be a finite number of pixels >= 0, got {blur}")
    if blur > MAX_BLUR:  # PIL's kernel grows with the radius: 1e10 is its ValueError, 1e6 minutes of work
        raise UserError(f"mask blur is {blur:g} pixels; at most {MAX_BLUR}")
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' get_crop_region: the box (x1, y1, x2, y2) around the mask's non-black pixels, `pad` pixels
    wider, grown to the output's aspect ratio and kept inside the picture."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if len(cols) == 0:  # an all-black mask: diffusers' loops give an inverted box; refuse instead
        raise UserError("padding_mask_crop: the mask is all black (nothing to repaint)")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        diff = int((x2 - x1) / ratio - (y2 - y1))
        y1, y2 = _grow(y1, y2, diff, h)
    else:
        diff = int((y2 - y1) * ratio - (x2 - x1))
        x1, x2 = _grow(x1, x2, diff, w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, diff: int, limit: int) -> tuple[int, int]:
    """Widen [a, b) by diff, centred, shifted back inside [0, limit) (diffusers' order of corrections)."""
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def fit(image: Image.Image, width: int, height: int, crop: tuple[int, int, int, int] | None) -> Image.Image:
    """VaeImageProcessor.resize for PIL: crop, then lanczos to (width, height); with a crop, diffusers' "fill"
    mode: keep the aspect ratio and fill the sides with the stretched edge rows/columns."""
    if crop is None:
        return image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image
    image = image.crop(crop)
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and (fill := height // 2 - src_h // 2) > 0:
        res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio and (fill := width // 2 - src_w // 2) > 0:
        res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return res


def mask_pixels(mask: Image.Image, width: int, height: int, crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """(height, width) float32 0/1, as diffusers' mask processor: crop/resize in the mask's own mode, then
    greyscale, then binarised at 0.5."""
    grey = np.asarray(fit(mask, width, height, crop).convert("L"), dtype=np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)


def nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's F.interpolate(mode="nearest") of an (H, W) array to size (h, w): source index floor(i * H / h)."""
    (H, W), (h, w) = mask.shape, size
    rows = np.minimum(np.floor(np.arange(h) * np.float32(H / h)).astype(int), H - 1)
    cols = np.minimum(np.floor(np.arange(w) * np.float32(W / w)).astype(int), W - 1)
    return mask[rows][:, cols]


def check_unet(in_channels: int, latent_channels: int, masked: bool) -> None:
    """A 9-channel inpainting UNet needs a mask; anything but 4 or 9 channels cannot run here."""
    inpainting = in_channels == 2 * latent_channels + 1
    if in_channels != latent_channels and not inpainting:
        raise UserError(f"the UNet takes {in_channels} input channels; expected {latent_channels} (an ordinary model) "
                        f"or {2 * latent_channels + 1} (an inpainting model)")
    if inpainting and not masked:
        raise UserError(f"this is an inpainting model (a {in_channels}-channel UNet): give an init image and a mask "
                        "(--init-image and --mask-image)")


@dataclass
class Inpaint:
    """One generation's inpainting inputs, latents NHWC at latent resolution, batch B (not the CFG batch)."""

    mask: mx.array  # (B, h, w, 1): 1 = repaint
    masked: mx.array | None  # (B, h, w, C) masked-image latents, for a 9-channel UNet
    image: mx.array | None  # (B, h, w, C) image latents, for the 4-channel blend
    noise: mx.array  # (B, h, w, C) the start noise, with which the blend re-noises the image latents
    sigmas: list[float]  # this generation's sigmas (after the strength cut)
    mask_image: Image.Image  # the (blurred) mask as given, for the overlay
    original: Image.Image  # the init image as given
    crop: tuple[int, int, int, int] | None  # padding_mask_crop's box in the original

    @classmethod
    def prepare(cls, pipe: "StableDiffusion", init_image, mask_image, shape: tuple[int, int, int, int],
                sigmas: np.ndarray, init_sigma: float, scheduler: str, strength: float,
                start_noise: "NoiseFn | mx.array", noise: "NoiseFn", blur: float = 0.0,
                padding_mask_crop: int | None = None) -> tuple["Inpaint", mx.array]:
        """Encode the image and the masked image, as StableDiffusion(XL)InpaintPipeline does, and return the
        inputs and the starting latents (sigma space). `start_noise`: the given `latents=` (NHWC) or the noise
        source to draw them from, after the image (diffusers' order)."""
        if init_image is None:
            raise UserError("a mask needs an init image: the picture to repaint (--init-image)")
        batch, h, w, _ = shape
        height, width = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
        original = as_pil(init_image, "init image")
        mask_image = read_mask(mask_image, blur)
        crop = None
        if padding_mask_crop is not None:
            if type(padding_mask_crop) is not int or padding_mask_crop < 0:
                raise UserError(f"padding_mask_crop must be a whole number of pixels >= 0, got {padding_mask_crop!r}")
            if mask_image.size != original.size:  # diffusers needs them equal here; resize the mask as elsewhere
                mask_image = mask_image.resize(original.size, Image.LANCZOS)
            crop = crop_region(mask_image, width, height, padding_mask_crop)
        pixels = to_pixels(fit(to_rgb(original), width, height, crop))
        m = mask_pixels(mask_image, width, height, crop)
        nine = pipe.unet_config.in_channels != shape[3]
        given = isinstance(start_noise, mx.array)
        full = strength == 1.0
        # diffusers encodes one picture (one VAE draw) and repeats its latents over the batch
        encode = lambda px: mx.broadcast_to(pipe.encode_image(px, noise).astype(mx.float32), shape)  # noqa: E731
        image = encode(pixels) if not nine or (not given and not full) else None
        eps = start_noise if given else start_noise(shape)
        if given:  # diffusers: latents * init_noise_sigma, in its scheduler's own space at the first kept step
            x = eps * (math.sqrt(float(sigmas[0]) ** 2 + 1) if scheduler in DDPM_SPACE else init_sigma)
        else:
            x = eps * init_sigma if full else image + eps * float(sigmas[0])
        # diffusers encodes the masked image for 4-channel UNets too (and so draws its VAE noise): do the same
        masked_pixels = pixels * mx.array(m < 0.5)[None, :, :, None]
        masked = encode(masked_pixels) if nine else noise((1, h, w, shape[3]))  # for 4 channels: the draw only
        mask = mx.array(nearest(m, (h, w)))[None, :, :, None]
        inpaint = cls(mx.broadcast_to(mask, (batch, h, w, 1)), masked if nine else None, None if nine else image, eps,
                      [float(s) for s in sigmas], mask_image, original, crop)
        mx.eval(inpaint.mask, inpaint.masked, inpaint.image, x)
        return inpaint, x

    def _cfg(self, a: mx.array, n: int) -> mx.array:
        return mx.concatenate([a] * (n // a.shape[0])) if n != a.shape[0] else a

    def hook(self, step: UNetInput, i: int, sigma: float) -> UNetInput:
        """Denoiser hook: the 9-channel input, or the blended latents the 4-channel UNet must see (the rest of
        the input, e.g. residuals other hooks added, passes through)."""
        n, dtype = step.x.shape[0], step.x.dtype
        if self.masked is not None:
            extra = mx.concatenate([self.mask, self.masked], axis=-1).astype(dtype)
            return replace(step, x=mx.concatenate([step.x, self._cfg(extra, n)], axis=-1))
        if i == 0:  # diffusers blends after each step: the first step sees the start latents as they are
            return step
        known = ((self.image + self.noise * sigma) * (1.0 / math.sqrt(sigma**2 + 1))).astype(dtype)  # scaled as x
        return replace(step, x=mx.where(self._cfg(self.mask, n) > 0, step.x, self._cfg(known, n)))

    def blend(self, x: mx.array, i: int, last: bool) -> mx.array:
        """The latents after step i as diffusers has them: the known region re-noised to the next sigma, or the
        clean image latents after the last step (x is then already in diffusers' latents)."""
        if self.image is None:
            return x
        known = self.image if last else self.image + self.noise * self.sigmas[i + 1]
        return (1 - self.mask) * known + self.mask * x

    def overlay(self, images: mx.array, keep_unmasked: bool) -> list[Image.Image]:
        """Decoded (B, H, W, 3) in [0, 1] -> PIL pictures; with a crop or keep_unmasked, pasted over the original
        as diffusers' apply_overlay (at the original's size; the mask resized to it when it differs)."""
        pictures = to_pil(images)
        if self.crop is None and not keep_unmasked:
            return pictures
        return [apply_overlay(self.mask_image, self.original, p, self.crop) for p in pictures]


def apply_overlay(mask: Image.Image, original: Image.Image, image: Image.Image,
                  crop: tuple[int, int, int, int] | None = None) -> Image.Image:
    """diffusers' VaeImageProcessor.apply_overlay: the picture (pasted into the crop box, resized "crop" mode)
    under the original, whose alpha is the inverted mask: black mask pixels keep the original exactly."""
    original = to_rgb(original)
    width, height = original.size
    if mask.size != original.size:
        mask = mask.resize(original.size, Image.LANCZOS)
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    if crop is not None:
        x, y, x2, y2 = crop
        base = Image.new("RGBA", (width, height))
        base.paste(_resize_crop(image, x2 - x, y2 - y), (x, y))
        image = base.convert("RGB")
    elif image.size != original.size:
        image = image.resize(original.size, Image.LANCZOS)
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


def _resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' resize_mode="crop": keep the aspect ratio, centre, cut the excess."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    res = Image.new("RGB", (width, height))
    res.paste(image.resize((src_w, src_h), Image.LANCZOS), box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


# -- outpainting -------------------------------------------------------------------------------------


def outpaint_canvas(image: Image.Image | np.ndarray, border: tuple[int, int, int, int], fill: str = "edge",
                    multiple: int = 8, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) to inpaint: the picture extended by border = (left, top, right, bottom) pixels, each a
    multiple of `multiple`; the mask white on the new border. The border is filled for the VAE with `fill`:
    "edge" (the nearest edge pixel, the default: see the README for the measurement), "noise" (Gaussian
    noise of the picture's mean and spread per channel) or "grey" (mid grey)."""
    if len(border) != 4 or any(type(b) is not int or b < 0 or b % multiple for b in border):
        raise UserError(f"outpaint borders (left top right bottom) must be whole multiples of {multiple} >= 0, "
                        f"got {' '.join(map(str, border))}")
    if not any(border):
        raise UserError("outpaint: all four borders are 0 (nothing to add)")
    if fill not in FILLS:
        raise UserError(f"unknown outpaint fill {fill!r} (choose from {', '.join(FILLS)})")
    image = as_pil(image, "init image")
    l, t, r, b = border
    check_pixels(image.width + l + r, image.height + t + b, "the outpainted canvas")  # before allocating it
    arr = np.asarray(to_rgb(image))
    pad = ((t, b), (l, r), (0, 0))
    if fill == "edge":
        canvas = np.pad(arr, pad, mode="edge")
    else:
        canvas = np.pad(arr, pad).astype(np.float64)
        outside = np.pad(np.zeros(arr.shape[:2], bool), pad[:2], constant_values=True)
        if fill == "noise":
            mean, std = arr.reshape(-1, 3).mean(0), arr.reshape(-1, 3).std(0)
            rng = np.random.default_rng(seed)
            canvas[outside] = mean + std * rng.standard_normal((int(outside.sum()), 3))
        else:
            canvas[outside] = 127.5
        canvas = np.clip(canvas.round(), 0, 255).astype(np.uint8)
    mask = np.pad(np.zeros(arr.shape[:2], np.uint8), pad[:2], constant_values=255)
    return Image.fromarray(canvas), Image.fromarray(mask)
