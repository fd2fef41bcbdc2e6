"""ControlNets with image prompts: finding and converting them, the control images, and the step hook.

Semantics are diffusers' StableDiffusion(XL)ControlNetPipeline's:
- per net a control image (resized to the output size, RGB in [0, 1]), a scale, and a window: net i is off at
  step k of N when k/N < start or (k+1)/N > end;
- several nets (MultiControlNet): their residuals are summed;
- guess mode: the net sees the conditional half of the CFG batch only, residual j is scaled by
  logspace(-1, 0, n+1)[j] as well, and the unconditional half gets zeros;
- the net reads the text embeddings (and SDXL's pooled text and size ids) only, never the image prompt's
  tokens: it gets a StepConditioning without image attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .config import ControlNetConfig, UNetConfig
from .denoiser import batch_rows
from .errors import UserError
from .loaded import LoadOrder
from .models.unet import Residuals

PRESETS = {
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
    "openpose": "lllyasviel/control_v11p_sd15_openpose",
    "lineart": "lllyasviel/control_v11p_sd15_lineart",
    "softedge": "lllyasviel/control_v11p_sd15_softedge",
    "scribble": "lllyasviel/control_v11p_sd15_scribble",
    "tile": "lllyasviel/control_v11f1e_sd15_tile",
    "inpaint": "lllyasviel/control_v11p_sd15_inpaint",
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",
    "sdxl-depth": "diffusers/controlnet-depth-sdxl-1.0",
}
PREPROCESSORS = ("none", "canny", "tile", "inpaint")
# What the CLI says when asked for a control image it cannot make itself.
ELSEWHERE = ("depth and pose maps come from other models: e.g. controlnet_aux (pip install controlnet-aux: "
             "MidasDetector, OpenposeDetector, LineartDetector, HEDdetector) or the preprocessors of ComfyUI / "
             "A1111; give their output as --control-image")


# -- finding and converting --------------------------------------------------------------------------------


def is_controlnet_file(path: Path) -> bool:
    """An original ControlNet file, told by its tensor names (read from the header or the pickle's name table)."""
    from .loading import holds_tensors

    return holds_tensors(path, "control_model.", "input_hint_block.")


def is_controlnet_folder(path: Path) -> bool:
    """A diffusers ControlNet folder (config.json naming ControlNetModel) or a converted one."""
    from .loading import MARKER, read_json

    if (path / MARKER).is_file():
        return (path / "controlnet" / "config.json").is_file()
    config = path / "config.json"
    return config.is_file() and isinstance(read_json(config), dict) and \
        read_json(config).get("_class_name") == "ControlNetModel"


def is_controlnet(ref: str) -> bool:
    """Whether `python -m convert` should treat SOURCE as a ControlNet: a preset, a ControlNet folder or file,
    REPO:PATH to such a file, or a Hub repo (or REPO:FOLDER) whose config.json names ControlNetModel (one small
    download)."""
    from .hub import names_a

    return names_a(ref, PRESETS, is_controlnet_folder, is_controlnet_file)


def controlnet_config(ref: str) -> dict:
    """`--config` for an original single file: the config.json of a diffusers ControlNet folder or Hub repo."""
    from .hub import is_repo_id, snapshot
    from .loading import read_json

    path = Path(ref).expanduser()
    if path.is_file() and path.name == "config.json":
        return read_json(path)
    if path.is_dir():
        return read_json(path / "config.json")
    if is_repo_id(ref):
        return read_json(snapshot(ref, ["config.json"]) / "config.json")
    raise UserError(f"--config {ref}: not a ControlNet folder, config.json or Hub repo")


def convert_controlnet(ref: str, dst: Path, dtype: mx.Dtype | None = None, quantize: tuple[int, int] | None = None,
                       config: dict | None = None) -> Path:
    """`python -m convert` for a ControlNet: any reference resolve_controlnet takes, written to `dst`."""
    from .checkpoints.controlnet_files import convert_controlnet_file, convert_controlnet_folder

    kind, src = _source(ref)
    if kind == "folder":
        return convert_controlnet_folder(src, dst, dtype, quantize)
    return convert_controlnet_file(src, dst, dtype, quantize, config)


def _source(ref: str) -> tuple[str, Path]:
    """("folder" | "file" | "mlx", local path) of a preset, folder, file, REPO:PATH, REPO:FOLDER or Hub repo."""
    from .hub import hub_file, is_repo_id, is_weights_file, model_files, split_hub_path
    from .loading import is_mlx_folder

    ref = PRESETS.get(ref, ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if is_mlx_folder(path):
            if not (path / "controlnet" / "config.json").is_file():
                raise UserError(f"{path} is a converted folder but not a ControlNet (no controlnet/ inside)")
            return "mlx", path
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a ControlNet folder (no config.json)")
        return "folder", path
    if path.is_file():
        return "file", path
    hub = split_hub_path(ref) or ((ref, "") if is_repo_id(ref) else None)
    if hub and is_weights_file(hub[1]):  # REPO:PATH to an original file
        return "file", hub_file(*hub)
    if hub:  # a diffusers ControlNet repo, or REPO:FOLDER within one
        return "folder", model_files(*hub, "ControlNet")[1]
    raise UserError(f"ControlNet not found: {ref} is not a folder, a file, REPO:PATH, REPO:FOLDER, a Hub repo or a "
                    f"preset ({', '.join(PRESETS)})")


def resolve_controlnet(ref: str, dtype: mx.Dtype | None = None, config: dict | None = None) -> Path:
    """A ControlNet reference -> its converted MLX folder, converted once into the cache and reused after."""
    from .cache import _dtype_name, _local_fingerprint, cache_root
    from .folders import convert_once

    kind, src = _source(ref)
    if kind == "mlx":
        return src
    identity = _local_fingerprint(src, f"config={config}")  # a Hub snapshot's path names its commit
    dst = cache_root() / "converted" / f"controlnet-{src.stem if kind == 'file' else src.name}-{identity}-" \
                                       f"{_dtype_name(dtype)}"
    return convert_once(dst, lambda: convert_controlnet(str(src), dst, dtype, None, config))


def family(c: UNetConfig) -> str:
    return f"{'SDXL' if c.addition_embed_type == 'text_time' else 'SD 1.x/2.x'} " \
           f"(cross-attention {c.cross_attention_dim[0]})"


def check_fits(net: ControlNetConfig, unet: UNetConfig, ref: str) -> None:
    """A ControlNet must come from the UNet's family and give a residual for each of its skip connections."""
    if (net.addition_embed_type, net.cross_attention_dim[0]) != (unet.addition_embed_type, unet.cross_attention_dim[0]):
        raise UserError(f"ControlNet {ref} is for {family(net)}, this model is {family(unet)}")
    widths = lambda c: (c.block_out_channels, c.layers_per_block, c.in_channels)  # noqa: E731
    # an inpainting UNet (2 x latent + 1 channels: latents, mask, masked image) runs nets made for its base
    # model, e.g. control_v11p_sd15_inpaint: they read the latent channels only
    latent = (unet.in_channels - 1) // 2 if unet.in_channels % 2 and unet.in_channels > 1 else unet.in_channels
    if widths(net)[:2] != widths(unet)[:2] or net.in_channels not in (unet.in_channels, latent):
        raise UserError(f"ControlNet {ref} does not fit this UNet: its down path is {widths(net)[:2]} with "
                        f"{net.in_channels} input channels, the UNet's {widths(unet)[:2]} with {unet.in_channels}")


# -- control images -------------------------------------------------------------------------------------------


def canny(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """OpenCV's cv2.Canny(image, low, high) (aperture 3, L1 gradient) on (H, W) or (H, W, C) uint8 -> (H, W)
    uint8 0/255, transcribed from its canny.cpp: int16 Sobel with replicated borders, per pixel the channel of
    largest |dx| + |dy|, non-maximum suppression along four directions chosen with tan 22.5 in 15-bit fixed
    point, thresholds floored, then every candidate 8-connected to a strong pixel is an edge."""
    if low > high:
        low, high = high, low
    low, high = int(np.floor(low)), int(np.floor(high))
    a = np.asarray(image).astype(np.int64)
    a = a[..., None] if a.ndim == 2 else a
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    k = mag.argmax(axis=-1)[..., None]  # the first channel of the largest magnitude, as OpenCV picks it
    dx, dy, mag = (np.take_along_axis(v, k, -1)[..., 0] for v in (dx, dy, mag))
    m = np.pad(mag, 1)  # magnitudes outside the picture are 0
    H, W = mag.shape
    at = lambda di, dj: m[1 + di: 1 + di + H, 1 + dj: 1 + dj + W]  # noqa: E731  the neighbour at (di, dj)
    shift, tg22 = 15, int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
    x, y = np.abs(dx), np.abs(dy) << shift
    tg22x = x * tg22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << (shift + 1)))
    s = np.where((dx ^ dy) < 0, -1, 1)
    up_s = np.where(s < 0, at(-1, 1), at(-1, -1))  # the pixel above, one step against s
    down_s = np.where(s < 0, at(1, -1), at(1, 1))
    peak = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), (mag > up_s) & (mag > down_s)))
    candidate = (mag > low) & peak
    edges = candidate & (mag > high)
    # hysteresis: grow the strong pixels through 8-connected candidates, a ring at a time in numpy while the
    # rings are wide; the last thin stretches of long edges pixel by pixel
    frontier = edges.copy()
    for _ in range(256):
        if not frontier.any():
            break
        f = np.pad(frontier, 1)
        ring = np.zeros_like(frontier)
        for di in (0, 1, 2):
            for dj in (0, 1, 2):
                ring |= f[di:di + H, dj:dj + W]
        frontier = ring & candidate & ~edges
        edges |= frontier
    stack = list(zip(*np.nonzero(frontier)))
    while stack:
        i, j = stack.pop()
        for a_ in range(max(i - 1, 0), min(i + 2, H)):
            for b_ in range(max(j - 1, 0), min(j + 2, W)):
                if candidate[a_, b_] and not edges[a_, b_]:
                    edges[a_, b_] = True
                    stack.append((a_, b_))
    return edges.astype(np.uint8) * 255


MADE_ELSEWHERE = ("depth", "openpose", "pose", "lineart", "softedge", "hed", "scribble", "normal", "seg", "mlsd")


def check_preprocess(kind: str, mask: object = None, canny_thresholds: bool = False) -> None:
    """The preprocessor exists and has what it needs (checked before any model loads)."""
    if kind in MADE_ELSEWHERE:
        raise UserError(f"--control-preprocess {kind}: not made here; {ELSEWHERE}")
    if kind not in PREPROCESSORS:
        raise UserError(f"unknown --control-preprocess {kind!r} (choose from {', '.join(PREPROCESSORS)})")
    if (mask is not None) != (kind == "inpaint"):
        raise UserError("--control-mask goes with --control-preprocess inpaint (and it needs one)")
    if canny_thresholds and kind != "canny":
        raise UserError("--canny-low/--canny-high go with --control-preprocess canny")


def preprocess(image: Image.Image, kind: str, size: tuple[int, int], low: float = 100, high: float = 200,
               mask: Image.Image | None = None, tile_factor: int = 8) -> Image.Image | np.ndarray:
    """Make a control image from a picture, as diffusers' ControlNet docs do, at the output size (w, h):
    canny: cv2.Canny(RGB, low, high) as three equal channels; tile: the picture downscaled by `tile_factor` and
    back (the blurred reference control_v11f1e_sd15_tile was trained on); inpaint: RGB in [0, 1] with the
    pixels under `mask` (white, from 0.5 up) set to -1, as a float array."""
    from .images import to_rgb

    check_preprocess(kind, mask if kind == "inpaint" else None)
    image = to_rgb(image)
    if image.size != tuple(size):
        image = image.resize(size, Image.LANCZOS)
    if kind == "none":
        return image
    if kind == "canny":
        edges = canny(np.asarray(image), low, high)
        return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))
    if kind == "tile":
        w, h = size
        small = image.resize((max(1, w // tile_factor), max(1, h // tile_factor)), Image.LANCZOS)
        return small.resize((w, h), Image.LANCZOS)
    if kind == "inpaint":
        pixels = np.asarray(image, np.float32) / 255.0
        grey = np.asarray(to_rgb(mask).convert("L").resize(size, Image.LANCZOS), np.float32) / 255.0
        pixels[grey > 0.5] = -1.0
        return pixels
    raise UserError(f"unknown control preprocessor {kind!r} (choose from {', '.join(PREPROCESSORS)})")


def control_pixels(image: Image.Image | np.ndarray, size: tuple[int, int]) -> mx.array:
    """(1, H, W, 3) in [0, 1] at size (w, h), as diffusers' VaeImageProcessor(do_normalize=False) prepares
    control images: RGB, resized (lanczos). A float (H, W, 3) array is taken as it is (the inpaint control
    holds -1 where masked); it must already have the output size."""
    from .images import to_pixels

    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[1::-1] != tuple(size):
            raise UserError(f"a float control image must be (height, width, 3) = ({size[1]}, {size[0]}, 3), "
                            f"got {image.shape}")
        if not np.isfinite(image).all():
            raise UserError("the control image holds NaN or Inf values")
        return mx.array(image.astype(np.float32)[None])
    return (to_pixels(image, size) + 1.0) / 2.0


def default_size(controls: list["Control"], height: int | None, width: int | None,
                 factor: int) -> tuple[int | None, int | None]:
    """A side not given: the first control image's, rounded down to a multiple of the VAE's factor, as diffusers'
    ControlNet pipelines default it (VaeImageProcessor.get_default_height_width)."""
    if not controls or (height and width):
        return height, width
    image = controls[0].image
    h0, w0 = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    if h0 < factor or w0 < factor:
        raise UserError(f"the control image is {w0}x{h0} pixels; it must be at least {factor}x{factor}")
    return height or h0 - h0 % factor, width or w0 - w0 % factor


# -- a generation's controls ---------------------------------------------------------------------------------


@dataclass
class Control:
    """One ControlNet's part of a generation (diffusers' controlnet_conditioning_scale,
    control_guidance_start/end and guess_mode, per net)."""

    image: Image.Image | np.ndarray
    index: int = 0  # which loaded ControlNet (load order)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


@dataclass
class LoadedControlNet:
    ref: str
    folder: Path
    config: ControlNetConfig
    model: object | None = None  # ControlNetModel, loaded on first use in low-memory mode


class ControlNetSet(LoadOrder[LoadedControlNet]):
    """The ControlNets loaded into a pipeline, each converted once into the cache."""

    what = "ControlNet"

    def __init__(self, dtype: mx.Dtype, quantize: tuple[int, int] | None = None, low_memory: bool = False):
        super().__init__()
        self.dtype, self.quantize, self.low_memory = dtype, quantize, low_memory

    def load(self, ref: str, unet: UNetConfig, config: dict | None = None) -> int:
        """Add a ControlNet (preset, folder, file, REPO:PATH or Hub repo); fails at once when it does not fit
        the UNet. `config`: for original single files, a diffusers config.json (dict) instead of inferring."""
        from .loading import read_json

        folder = resolve_controlnet(ref, None, config)
        path = folder / "controlnet" / "config.json"
        c = ControlNetConfig.from_dict(read_json(path), str(path))
        check_fits(c, unet, ref)
        net = LoadedControlNet(ref, folder, c)
        if not self.low_memory:  # low-memory mode loads it after the encoders have been freed
            self.model(net)
        return self.append(net)

    def model(self, net: LoadedControlNet):
        from .loading import load_component

        if net.model is None:
            net.model = self.model_for(net.folder,
                                       lambda: load_component(net.folder, "controlnet", self.dtype, self.quantize))
        return net.model

    def activation_bytes(self, lat_h: int, lat_w: int, batch: int) -> int:
        """What the nets' residuals hold while the UNet runs: one map per skip connection and the mid block
        (the net's own activations come before and are smaller than the UNet's)."""
        total = 0
        for net in self.loaded:
            ch, n = net.config.block_out_channels, len(net.config.block_out_channels)
            maps = [(lat_h * lat_w, ch[0]), (lat_h * lat_w // 4 ** (n - 1), ch[-1])]  # conv_in's, the mid block's
            for i, w in enumerate(ch):  # each layer's at its level, the downsampler's at the next
                maps += [(lat_h * lat_w // 4**i, w)] * net.config.layers_per_block[i]
                maps += [(lat_h * lat_w // 4 ** (i + 1), w)] * (i < n - 1)
            total += sum(px * c for px, c in maps) * batch * self.dtype.size
        return total

    def hook(self, controls: list[Control], size: tuple[int, int], total: int, guided: bool):
        """The Denoiser hook adding every active net's residuals at each step (denoiser.py)."""
        from .conditioning import StepConditioning

        if not controls:
            return None
        check_controls(controls, len(self.loaded))
        images = [control_pixels(c.image, size) for c in controls]
        loaded = [self.loaded[c.index] for c in controls]  # models fetched at the first step: low-memory mode
        # loads them only after the encoders are freed

        def add_residuals(step, i: int, sigma: float):
            total_res = None
            batch = step.x.shape[0]
            lo, hi, _ = (step.keep or slice(None)).indices(batch)  # the rows the UNet runs on (parallel cfg: half)
            for c, net, image in zip(controls, map(self.model, loaded), images):
                if i / total < c.start or (i + 1) / total > c.end:
                    continue  # diffusers runs it with scale 0: the same picture
                guess = c.guess_mode or net.config.global_pool_conditions
                first = max(lo, batch // 2) if guess and guided else lo  # guess mode: the conditional half only
                if first >= hi:  # only unconditional rows kept: their residuals are zeros, i.e. none
                    continue
                # text only; and the latents alone: an inpainting UNet's input carries the mask and the masked
                # image's latents after them, which diffusers concatenates after running the nets
                x, t = step.x[first:hi, ..., :net.config.in_channels], step.t[first:hi]
                cond = StepConditioning(step.cond.text[first:hi], {k: v[first:hi] for k, v in step.cond.added.items()})
                r = net(x, t, cond, mx.broadcast_to(image, (x.shape[0], *image.shape[1:])), c.scale, guess)
                if first > lo:  # zeros for the unconditional rows
                    pad = lambda a: mx.concatenate([mx.zeros((first - lo, *a.shape[1:]), a.dtype), a])  # noqa: E731
                    r = Residuals([pad(d) for d in r.down], pad(r.mid))
                total_res = r if total_res is None else total_res + r
            if total_res is None:
                return step
            if step.residuals is None:
                return replace(step, residuals=total_res)
            # what other hooks added for the whole batch, cut to the kept rows the nets' residuals have
            return replace(step, residuals=step.residuals.map(batch_rows(batch, slice(lo, hi))) + total_res)

        return add_residuals


def check_controls(controls: list[Control], loaded: int) -> None:
    from .errors import finite

    for c in controls:
        if not isinstance(c, Control):
            raise UserError(f"controls takes Control objects, got {type(c).__name__}")
        if not (type(c.index) is int and 0 <= c.index < loaded):
            raise UserError(f"Control index {c.index!r}: {loaded} ControlNet{'s' * (loaded != 1)} loaded")
        finite("control scale", c.scale)
        for name, v in (("start", c.start), ("end", c.end)):
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise UserError(f"control {name} must be a fraction in [0, 1], got {v!r:.40}")
        if c.start >= c.end:  # diffusers refuses it too
            raise UserError(f"control start {c.start} must be before its end {c.end}")
