"""Single-file T2I-Adapters -> a converted MLX folder (`t2i_adapter/config.json`, `t2i_adapter/model.safetensors`).

Two layouts, in .pth (through the restricted unpickler) or .safetensors, as ComfyUI's models/t2i_adapter holds them:
- TencentARC's original files (`t2iadapter_canny_sd15v2.pth`, `t2iadapter_color_sd14v1.pth`, ...): the full
  adapter's residual blocks in one flat list (`body.{level * blocks + j}`, a level's `in_conv` on its first
  block), the light ("color") adapter's as `body.{level}.body.{j}`. Renamed to diffusers' names by the table of
  diffusers' scripts/convert_original_t2iadapter.py.
- diffusers' own weights saved as one file (`adapter.*` keys).
The config is inferred from the shapes: input channels and pixel-unshuffle factor from the first convolution
(`in_channels * factor**2` inputs: 3 x a square for RGB, a square for grey), widths and block counts from the
blocks. An unshuffle of 16 means SDXL's layout (`full_adapter_xl`): every published SDXL adapter has it, every
SD 1.x one 8.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..errors import UserError
from ..folders import write_mlx_folder
from ..loading import build, holds_tensors
from ..models.t2i_adapter import MAX_RES_BLOCKS, T2IAdapterConfig
from . import keymaps
from .stable_diffusion import tensor_shape
from .weights import fit_weights, read_weights

log = logging.getLogger(__name__)
COMPONENT = "t2i_adapter"
XL_DOWNSCALE = 16  # SDXL's adapters unshuffle by 16, SD 1.x's by 8
MAX_LEVELS = 16  # the published adapters have 4 (bounds what a crafted file's key names can make us build)
STYLE_KEY = "style_embedding"  # TencentARC's style adapter: image tokens, not feature maps
# The names that tell a single-file T2I-Adapter (for `python -m convert` and the loaders): either layout.
FILE_NAMES = ("adapter.body.", "body.0.block1.", "body.0.in_conv.", "body.0.body.0.", STYLE_KEY)


def full_original_to_diffusers(levels: int, blocks: int) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) pairs of TencentARC's full adapter: block j of level i is body.{i * blocks
    + j}; a level's in_conv (where its width changes) sits on its first block."""
    pairs = [("conv_in", "adapter.conv_in")]
    for i in range(levels):
        pairs += [(f"body.{i * blocks + j}", f"adapter.body.{i}.resnets.{j}") for j in range(blocks)]
        pairs.append((f"body.{i * blocks}.in_conv", f"adapter.body.{i}.in_conv"))
    return pairs


def light_original_to_diffusers(levels: int, blocks: int) -> list[tuple[str, str]]:
    """The light adapter's: body.{i}.body.{j} -> adapter.body.{i}.resnets.{j}; in_conv and out_conv keep their
    names under adapter."""
    pairs = [(f"body.{i}", f"adapter.body.{i}") for i in range(levels)]
    return pairs + [(f"body.{i}.body.{j}", f"adapter.body.{i}.resnets.{j}") for i in range(levels)
                    for j in range(blocks)]


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _counted(indices: list[int], what: str, where: str, most: int) -> int:
    """How many of body.0, body.1, ... there are, refusing gaps (a hostile file cannot make us build blocks
    for missing weights) and more than `most`."""
    if not indices or indices != list(range(len(indices))):
        raise UserError(f"{where}: {what} numbered {indices[:8]}, expected 0, 1, 2, ...")
    if len(indices) > most:
        raise UserError(f"{where}: {len(indices)} {what}; a T2I-Adapter has at most {most}")
    return len(indices)


def _blocks_per_level(n: int, widening: list[int]) -> int:
    """Blocks a level, for n blocks whose width changes at `widening` (a level's first block). Levels of equal
    width leave no trace, so several readings can fit: four levels, what SD 1.x's and SDXL's UNets take (every
    published adapter), when that fits; else the fewest levels that do."""
    fits = [b for b in range(1, n + 1) if n % b == 0 and all(i % b == 0 for i in widening)]
    four = [b for b in fits if n // b == 4]
    return four[0] if four else max(fits)


def _unshuffled(channels_in: int, where: str) -> tuple[int, int]:
    """(image channels, unshuffle factor) from the first convolution's inputs: 3 r^2 (RGB) or r^2 (grey)."""
    for image in (3, 1):
        r = math.isqrt(channels_in // image)
        if channels_in % image == 0 and r * r * image == channels_in:
            return image, r
    raise UserError(f"{where}: the first convolution takes {channels_in} channels; a T2I-Adapter's takes "
                    "3 x r^2 (RGB) or r^2 (grey) for its pixel unshuffle by r")


def to_diffusers(w: dict[str, mx.array], where: str) -> dict[str, mx.array]:
    """Any single-file layout -> diffusers' names (`adapter.*`), refusing what no diffusers T2IAdapter holds.
    diffusers' own names have `adapter.body.0.resnets.`; TencentARC's loaders strip an `adapter.` before their
    names, so a file may carry one (as ComfyUI tells the two)."""
    if any(k.startswith("adapter.body.0.resnets.") for k in w):
        return w
    w = {k.removeprefix("adapter."): v for k, v in w.items()}
    if any(k.startswith(STYLE_KEY) for k in w):
        raise UserError(f"{where} is TencentARC's style adapter (image tokens for the text attention, not feature "
                        "maps): not supported; for an image prompt use an IP-Adapter (--ip-adapter)")
    if any(".skep." in k or ".down_opt." in k for k in w):
        raise UserError(f"{where}: a T2I-Adapter with skip or strided-downsampling convolutions (sk=False or "
                        "use_conv=True); only the published layout (sk=True, average-pool downsampling) is supported")
    if "conv_in.weight" in w:  # the full adapter
        n = _counted(_indices(w, r"body\.(\d+)\.block1\.weight$"), "residual blocks", where,
                     MAX_LEVELS * MAX_RES_BLOCKS)
        widening = _indices(w, r"body\.(\d+)\.in_conv\.weight$")  # a level's first block, where widths change
        if 0 in widening:
            raise UserError(f"{where}: an in_conv on the first residual block (sk=False); only the published layout "
                            "(sk=True) is supported")
        blocks = _blocks_per_level(n, widening)
        if n // blocks > MAX_LEVELS:
            raise UserError(f"{where}: {n // blocks} levels of {blocks} residual blocks; a T2I-Adapter has at most "
                            f"{MAX_LEVELS}")
        rename = keymaps.renamer(full_original_to_diffusers(n // blocks, blocks))
        return {rename(k): v for k, v in w.items()}
    if "body.0.out_conv.weight" in w:  # the light adapter
        levels = _counted(_indices(w, r"body\.(\d+)\.out_conv\.weight$"), "levels", where, MAX_LEVELS)
        blocks = _counted(_indices(w, r"body\.0\.body\.(\d+)\.block1\.weight$"), "residual blocks", where,
                          MAX_RES_BLOCKS)
        rename = keymaps.renamer(light_original_to_diffusers(levels, blocks))
        return {rename(k): v for k, v in w.items()}
    raise UserError(f"{where}: not a T2I-Adapter (no conv_in, body.* or adapter.* tensors)")


def infer_t2i_config(w: dict[str, mx.array], where: str) -> dict:
    """A diffusers T2IAdapter config.json from diffusers-named tensors' shapes."""
    what = f"the T2I-Adapter's config from {where}"
    levels = _counted(_indices(w, r"adapter\.body\.(\d+)\."), "levels", where, MAX_LEVELS)
    blocks = _counted(_indices(w, r"adapter\.body\.0\.resnets\.(\d+)\."), "residual blocks", where,
                      MAX_RES_BLOCKS)
    if "adapter.body.0.out_conv.weight" in w:  # light: each level widens through in_conv ... out_conv
        image, r = _unshuffled(tensor_shape(w, "adapter.body.0.in_conv.weight", 4, what)[1], where)
        widths = [tensor_shape(w, f"adapter.body.{i}.out_conv.weight", 4, what)[0] for i in range(levels)]
        if levels < 2 or widths[-1] != widths[-2]:
            raise UserError(f"{where}: light adapter levels {widths}; diffusers' LightAdapter repeats the last width "
                            "in its last level")
        return {"_class_name": "T2IAdapter", "in_channels": image, "channels": widths[:-1],
                "num_res_blocks": blocks, "downscale_factor": r, "adapter_type": "light_adapter"}
    image, r = _unshuffled(tensor_shape(w, "adapter.conv_in.weight", 4, what)[1], where)
    widths = [tensor_shape(w, f"adapter.body.{i}.resnets.0.block1.weight", 4, what)[0] for i in range(levels)]
    return {"_class_name": "T2IAdapter", "in_channels": image, "channels": widths, "num_res_blocks": blocks,
            "downscale_factor": r, "adapter_type": "full_adapter_xl" if r == XL_DOWNSCALE else "full_adapter"}


def convert_t2i_file(path: str | Path, dst: str | Path, dtype: mx.Dtype | None = None,
                     check: Callable[[T2IAdapterConfig], None] | None = None) -> Path:
    """A single-file T2I-Adapter (either layout) -> a converted MLX folder. `check` sees the inferred config
    before anything is written (the family check)."""
    path = Path(path)
    if holds_tensors(path, "image_proj", "ip_adapter", every=True):  # the likeliest mix-up, told before reading
        raise UserError(f"{path} is an IP-Adapter (image_proj, ip_adapter tensors), not a T2I-Adapter: give it "
                        "as --ip-adapter")
    log.info("reading T2I-Adapter %s ...", path)
    weights = to_diffusers(read_weights(path, unwrap="adapter"), str(path))  # {"adapter": {...}}: ComfyUI reads it
    config = infer_t2i_config(weights, str(path))
    try:
        model = build(COMPONENT, config)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if check:
        check(model.config)
    fitted = fit_weights(model, weights, what=str(path), dtype=dtype)
    return write_mlx_folder(Path(dst), {COMPONENT: (config, fitted)}, str(path), kind="t2i-adapter")
