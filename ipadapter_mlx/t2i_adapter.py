"""T2I-Adapters: the light structural control (~80 MB) beside IP-Adapter image prompts.

Finding one (preset, Hub repo, `REPO:FOLDER`, diffusers folder, single file or `REPO:PATH` to one, converted
folder) and converting it once into the cache; checking that its features fit the UNet (an SD 1.5 adapter on
SDXL is refused, naming both); and, per generation, a denoiser hook that adds its features inside the UNet's down
blocks exactly as diffusers' StableDiffusion(XL)AdapterPipeline does: computed once from the control image, times
`adapter_conditioning_scale`, the same for every image of the CFG batch, at step i while i < int(N * factor).
Several adapters add their features (diffusers' MultiAdapter with adapter_weights = the scales), and combine with
ControlNets the same way (Residuals.__add__).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from .cache import _dtype_name, _key, _local_fingerprint, cache_root
from .denoiser import StepHook, UNetInput
from .errors import UserError, finite
from .folders import convert_once, write_mlx_folder
from .hub import hub_file, is_repo_id, is_weights_file, model_files, names_a, split_hub_path
from .images import to_rgb
from .loaded import LoadOrder
from .loading import build, is_mlx_folder, load_component, read_json
from .models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from .models.unet import Residuals

log = logging.getLogger(__name__)
COMPONENT = "t2i_adapter"  # the sub-folder of a converted T2I-Adapter
PRESETS = {
    "t2i-canny-sdxl": "TencentARC/t2i-adapter-canny-sdxl-1.0",
    "t2i-sketch-sdxl": "TencentARC/t2i-adapter-sketch-sdxl-1.0",
    "t2i-lineart-sdxl": "TencentARC/t2i-adapter-lineart-sdxl-1.0",
    "t2i-openpose-sdxl": "TencentARC/t2i-adapter-openpose-sdxl-1.0",
    "t2i-depth-midas-sdxl": "TencentARC/t2i-adapter-depth-midas-sdxl-1.0",
    "t2i-depth-zoe-sdxl": "TencentARC/t2i-adapter-depth-zoe-sdxl-1.0",
    "t2i-canny-sd15": "TencentARC/t2iadapter_canny_sd15v2",
    "t2i-depth-sd15": "TencentARC/t2iadapter_depth_sd15v2",
    "t2i-sketch-sd15": "TencentARC/t2iadapter_sketch_sd15v2",
    "t2i-zoedepth-sd15": "TencentARC/t2iadapter_zoedepth_sd15v1",
    "t2i-openpose-sd15": "TencentARC/t2iadapter_openpose_sd14v1",
    "t2i-keypose-sd15": "TencentARC/t2iadapter_keypose_sd14v1",
    "t2i-seg-sd15": "TencentARC/t2iadapter_seg_sd14v1",
    "t2i-color-sd15": "TencentARC/t2iadapter_color_sd14v1",
}


# -- finding and converting --------------------------------------------------------------------------------


ConfigCheck = Callable[[T2IAdapterConfig], None]


def _config(path: Path, where: str) -> T2IAdapterConfig:
    try:
        return T2IAdapterConfig.from_dict(read_json(path))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def convert_t2i_adapter(src: str | Path, dst: str | Path, dtype: mx.Dtype | None = None,
                        check: ConfigCheck | None = None) -> Path:
    """A diffusers T2I-Adapter folder (config.json + diffusion_pytorch_model.*) or a single file (TencentARC's
    original .pth, or diffusers' weights as one file: checkpoints/t2i_files.py) -> a converted MLX folder
    (t2i_adapter/config.json, t2i_adapter/model.safetensors, mlx_model.json), checked strictly. `check` sees a
    single file's inferred config before anything is written."""
    from .checkpoints.stable_diffusion import component_weights
    from .checkpoints.t2i_files import convert_t2i_file
    from .checkpoints.weights import fit_weights

    src = Path(src)
    if src.is_file():
        return convert_t2i_file(src, dst, dtype, check)
    config = read_json(src / "config.json")
    try:
        model = build(COMPONENT, config)
    except UserError as e:
        raise UserError(f"{src}: {e}") from None
    log.info("converting T2I-Adapter %s ...", src)
    weights = fit_weights(model, component_weights(src), what=str(src), dtype=dtype)
    return write_mlx_folder(Path(dst), {COMPONENT: (config, weights)}, str(src), kind="t2i-adapter")


def is_t2i_adapter_folder(path: Path) -> bool:
    """A diffusers T2I-Adapter folder (its config.json names the class) or a converted one."""
    if is_mlx_folder(path):
        return (path / COMPONENT).is_dir()
    try:
        return read_json(path / "config.json").get("_class_name") == "T2IAdapter"
    except (UserError, AttributeError):
        return False


def t2i_source(ref: str, check: ConfigCheck | None = None) -> tuple[Path, str]:
    """A preset, Hub repo id, `REPO:FOLDER`, `REPO:PATH` to a file, diffusers folder or single file -> (the local
    diffusers folder or file, an identity for the cache: the local files' sizes and times, or the Hub commit).
    `check` sees a folder's config first (a single file's config is inferred when it is converted)."""
    source = PRESETS.get(ref, ref)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a T2I-Adapter folder: no config.json (a diffusers T2I-Adapter folder "
                            "holds config.json and diffusion_pytorch_model.safetensors or .bin)")
        if check:
            check(_config(path / "config.json", str(path)))
        return path, _local_fingerprint(path)
    if path.is_file():
        return path, _local_fingerprint(path)
    hub = split_hub_path(source) or ((source, "") if is_repo_id(source) else None)
    if hub is None:
        raise UserError(f"T2I-Adapter not found: {ref} is not a folder, a file, a Hub repo id, REPO:FOLDER, "
                        f"REPO:PATH or a preset ({', '.join(PRESETS)})")
    if is_weights_file(hub[1]):
        file = hub_file(*hub)
        return file, _local_fingerprint(file)  # the resolved path is the blob's: its content hash
    root, folder = model_files(*hub, "T2I-Adapter", (lambda c: check(_config(c, source))) if check else None)
    return folder, _key(*hub, root.name)  # root.name is the Hub commit


def is_t2i_adapter(ref: str) -> bool:
    """For `python -m convert`: is SOURCE a T2I-Adapter? A preset, a diffusers or converted folder, a single file
    told by its tensor names (either layout), REPO:PATH to one, or a Hub repo (or REPO:FOLDER) whose config.json
    names the class."""
    from .checkpoints.t2i_files import FILE_NAMES
    from .loading import holds_tensors

    return names_a(ref, PRESETS, is_t2i_adapter_folder, lambda path: holds_tensors(path, *FILE_NAMES))


def resolve_t2i_adapter(ref: str, dtype: mx.Dtype | None = None, check: ConfigCheck | None = None) -> Path:
    """Any T2I-Adapter reference -> its converted MLX folder (converted once, then cached like the models;
    `dtype` None keeps the source's). A converted folder is used as it is. `check` sees the adapter's config
    before any weights are downloaded (a folder or repo) or converted (a single file), and a cached one's again."""
    path = Path(PRESETS.get(ref, ref)).expanduser()
    if path.is_dir() and is_mlx_folder(path):
        if not (path / COMPONENT).is_dir():
            raise UserError(f"{path} is a converted folder but not a T2I-Adapter (no {COMPONENT}/ in it)")
        if check:
            check(_config(path / COMPONENT / "config.json", str(path)))
        return path
    src, identity = t2i_source(ref, check)
    label = (src.stem if src.is_file() else path.name).replace(":", "-")[:40]
    name = f"t2i-adapter-{label}-{identity}-{_dtype_name(dtype)}"
    dst = cache_root() / "converted" / name
    folder = convert_once(dst, lambda: convert_t2i_adapter(src, dst, dtype, check))
    if check and src.is_file():  # a cached conversion of a file: its inferred config, checked again
        check(_config(folder / COMPONENT / "config.json", str(src)))
    return folder


# -- fitting the UNet ----------------------------------------------------------------------------------------


def family(is_sdxl: bool) -> str:
    return "SDXL" if is_sdxl else "SD 1.x/2.x"


def unet_slots(unet_config, vae_factor: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Where diffusers' UNet adds T2I features: per down block (channels, stride in pixels) - inside a block with
    attention before its downsampling, after a block without - and the mid block's (SDXL's fourth feature)."""
    ch, kinds = unet_config.block_out_channels, unet_config.down_block_types
    slots = []
    for i, kind in enumerate(kinds):
        after_down = "CrossAttn" not in kind and i < len(kinds) - 1
        slots.append((ch[i], vae_factor * 2 ** (i + after_down)))
    return slots, (ch[-1], vae_factor * 2 ** (len(kinds) - 1))


def _describe(shapes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{c}ch at 1/{s}" for c, s in shapes)


def check_fits(config: T2IAdapterConfig, ref: str, unet_config, vae_factor: int, is_sdxl: bool) -> None:
    """Refuse an adapter whose features the UNet cannot take (consumed as diffusers' UNet consumes them: one per
    down block, then one more into the mid block if it has that shape), naming both sides."""
    features, (slots, mid) = config.features(), unet_slots(unet_config, vae_factor)
    taken = [f for f, s in zip(features, slots) if f == s]
    ok = len(taken) == min(len(features), len(slots))
    rest = features[len(slots):] if ok else []
    if ok and rest:
        ok = rest == [mid]
    if not ok:
        made_for = family(config.adapter_type == "full_adapter_xl")
        theirs = f"features {_describe(features)} of the picture"
        ours = f"down blocks take {_describe(slots)}, its mid block {_describe([mid])}"
        if made_for != family(is_sdxl):
            raise UserError(f"T2I-Adapter {ref} does not fit this model: it was made for {made_for} ({theirs}), this "
                            f"model is {family(is_sdxl)} (its {ours})")
        # one family, other sizes (another VAE, a retrained adapter): no family to blame, the shapes say it
        raise UserError(f"T2I-Adapter {ref} does not fit this {family(is_sdxl)} model: its {theirs} (pixel "
                        f"unshuffle {config.downscale_factor}, widths {config.channels}); this model's {ours}")


# -- one generation ------------------------------------------------------------------------------------------


@dataclass
class T2IControl:
    """One T2I-Adapter's part in a generation, as diffusers' adapter pipelines take it: the loaded adapter's index
    (from load_t2i_adapter), its control image (edges, depth, pose, sketch ...; resized to the picture),
    `scale` (adapter_conditioning_scale: its features are multiplied by it) and `factor`
    (adapter_conditioning_factor: the fraction of the first steps it acts in)."""

    adapter: int
    image: Image.Image | np.ndarray
    scale: float = 1.0
    factor: float = 1.0


@dataclass
class LoadedT2IAdapter:
    ref: str
    model: T2IAdapter
    folder: Path


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """A control image as given to the API: a PIL image, or a uint8 array (H, W) or (H, W, 1/3/4)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise UserError(f"a control image array must be uint8 (H, W) or (H, W, 1/3/4), got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise UserError(f"a control image must be a PIL image or a uint8 array, got {type(image).__name__}")
    return image


def control_pixels(image: Image.Image | np.ndarray, size: tuple[int, int], in_channels: int) -> mx.array:
    """A control image -> (1, H, W, in_channels) in [0, 1] at size (w, h): grey for a 1-channel adapter (PIL's
    "L", as diffusers' examples convert it), else RGB; resized with lanczos as diffusers' _preprocess_adapter_image."""
    image = to_rgb(as_pil(image))
    if in_channels == 1:
        image = image.convert("L")
    if image.size != tuple(size):
        image = image.resize(size, Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return mx.array(arr.reshape(1, arr.shape[0], arr.shape[1], -1))


class T2IAdapterSet(LoadOrder[LoadedT2IAdapter]):
    """The T2I-Adapters loaded into a pipeline, in load order (index them like a list)."""

    what = "T2I-Adapter"

    def __init__(self, dtype: mx.Dtype, vae_factor: int):
        super().__init__()
        self.dtype, self.vae_factor = dtype, vae_factor

    def load(self, ref: str, unet_config, is_sdxl: bool) -> int:
        """Find (and convert once) an adapter, refuse it unless it fits this UNet, load it; returns its index."""
        fits = lambda config: check_fits(config, ref, unet_config, self.vae_factor, is_sdxl)  # noqa: E731
        folder = resolve_t2i_adapter(ref, check=fits)  # checked before the weights are downloaded or read
        model = self.model_for(folder, lambda: load_component(folder, COMPONENT, self.dtype))
        self.loaded.append(LoadedT2IAdapter(ref, model, folder))
        return len(self.loaded) - 1

    def _get(self, control: T2IControl) -> LoadedT2IAdapter:
        if not isinstance(control, T2IControl):
            raise UserError(f"t2i_adapters takes T2IControl entries, got {type(control).__name__}")
        if type(control.adapter) is not int or not 0 <= control.adapter < len(self.loaded):
            raise UserError(f"no T2I-Adapter at index {control.adapter!r:.20} ({len(self.loaded)} loaded; "
                            "load_t2i_adapter returns the index)")
        return self.loaded[control.adapter]

    def default_size(self, controls: list[T2IControl], height: int | None,
                     width: int | None) -> tuple[int | None, int | None]:
        """A side not given: the first control image's, rounded down to a multiple of its adapter's downscale
        factor (and the VAE's), as diffusers' adapter pipelines default it."""
        if not controls or (height and width):
            return height, width
        la = self._get(controls[0])
        w0, h0 = as_pil(controls[0].image).size
        m = math.lcm(self.vae_factor, la.model.config.downscale_factor)
        if h0 < m or w0 < m:
            raise UserError(f"the control image is {w0}x{h0} pixels; T2I-Adapter {la.ref} needs at least {m}x{m}")
        return height or h0 - h0 % m, width or w0 - w0 % m

    def hooks(self, controls: list[T2IControl], batch: int, guided: bool, size: tuple[int, int],
              total: int) -> list[StepHook]:
        """One denoiser hook per control. Features are computed here, once (they do not depend on the step),
        scaled, and repeated for the batch (and both halves of the CFG batch)."""
        height, width = size
        shapes, hooks = None, []
        for c in controls:
            la = self._get(c)
            finite(f"T2I-Adapter {la.ref} scale", c.scale)
            if not 0 <= finite(f"T2I-Adapter {la.ref} factor", c.factor) <= 1:
                raise UserError(f"T2I-Adapter {la.ref} factor must be a fraction in [0, 1], got {c.factor}")
            d = la.model.config.downscale_factor
            if height % d or width % d:
                raise UserError(f"T2I-Adapter {la.ref} needs a height and width divisible by {d} (its pixel "
                                f"unshuffle); got {width}x{height}")
            pixels = control_pixels(c.image, (width, height), la.model.config.in_channels)
            features = la.model(pixels.astype(self.dtype))
            n = batch * (2 if guided else 1)
            features = [mx.broadcast_to(f * c.scale, (n, *f.shape[1:])) for f in features]
            mx.eval(features)
            if shapes is not None and [f.shape for f in features] != shapes[1]:  # MultiAdapter needs them equal
                raise UserError(f"T2I-Adapters {shapes[0]} and {la.ref} give features of different shapes; "
                                "several adapters at once must be of one kind")
            shapes = shapes or (la.ref, [f.shape for f in features])
            hooks.append(_hook(features, int(total * c.factor)))
        return hooks

    def memory_bytes(self, height: int, width: int, num_images: int) -> int:
        """The adapters' weights plus the features they hold through a generation (CFG batch)."""
        weights = sum(v.nbytes for la in self.loaded for _, v in tree_flatten(la.model.parameters()))
        held = sum(c * math.ceil(height / s) * math.ceil(width / s)
                   for la in self.loaded for c, s in la.model.config.features())
        return weights + held * 2 * num_images * self.dtype.size


def _hook(features: list[mx.array], active_steps: int) -> StepHook:
    def add_features(step: UNetInput, i: int, sigma: float) -> UNetInput:
        if i >= active_steps:  # diffusers' XL adapter pipeline: on while i < int(N * adapter_conditioning_factor)
            return step
        r = Residuals(intrablock=features)
        return replace(step, residuals=r if step.residuals is None else step.residuals + r)

    return add_features


# -- the command line ----------------------------------------------------------------------------------------


def _per_adapter(values: list[float], n: int, flag: str, default: float) -> list[float]:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{len(values)} {flag} for {n} --t2i-adapter (give one for all, or one each)")
    return values


def cli_requests(args) -> list[tuple]:
    """--t2i-adapter/--t2i-image/... checked before anything is loaded: (ref, image path, image, scale, factor)."""
    from .images import open_image

    refs, paths = args.t2i_adapter or [], args.t2i_image or []
    if len(paths) != len(refs):
        raise UserError(f"{len(paths)} --t2i-image for {len(refs)} --t2i-adapter (one control image each)")
    if not refs and (args.adapter_conditioning_scale or args.adapter_conditioning_factor):
        raise UserError("--adapter-conditioning-scale/--adapter-conditioning-factor need a --t2i-adapter")
    scales = _per_adapter(args.adapter_conditioning_scale or [], len(refs), "--adapter-conditioning-scale", 1.0)
    factors = _per_adapter(args.adapter_conditioning_factor or [], len(refs), "--adapter-conditioning-factor", 1.0)
    return [(r, p, open_image(p), s, f) for r, p, s, f in zip(refs, paths, scales, factors)]


def cli_controls(pipe, requests: list[tuple]) -> list[T2IControl]:
    """Load each requested adapter into `pipe` (refused there if it fits another model family)."""
    return [T2IControl(pipe.load_t2i_adapter(ref), image, scale, factor) for ref, _, image, scale, factor in requests]
