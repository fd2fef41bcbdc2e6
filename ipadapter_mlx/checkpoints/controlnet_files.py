"""ControlNet checkpoints -> a converted MLX folder (`controlnet/config.json`, `controlnet/model.safetensors`).

Two formats: diffusers folders (config.json + diffusion_pytorch_model.*; names as ours, no table) and the
original single files (lllyasviel's `control_v11p_sd15_canny.pth` / `.safetensors`: `control_model.*` keys in
the LDM layout of the UNet's input half, plus the hint block, zero convs and middle-block-out).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx

from ..config import ControlNetConfig
from ..errors import UserError
from ..folders import write_mlx_folder
from ..loading import build, read_json
from . import keymaps
from .stable_diffusion import _count, component_weights, infer_unet_config, quantized, tensor_shape
from .weights import fit_weights, read_weights

log = logging.getLogger(__name__)
PREFIX = "control_model."  # where an original ControlNet's tensors live in its file
HINT = "input_hint_block"  # the control image's embedding: convs at the even indices, SiLUs between
SDXL_TIME_EMBED_DIM = 256  # SDXL's size/crop embedding width: what shapes alone cannot split from the pooled text


def controlnet_original_to_diffusers(c: ControlNetConfig) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) pairs: the UNet's input half (keymaps' own table, no up blocks), the
    hint block (conv_in at 0, blocks at 2, 4, ..., conv_out after them), one zero conv per skip, the mid one."""
    pairs = keymaps.unet_original_to_diffusers(c)
    n_blocks = 2 * (len(c.conditioning_embedding_out_channels) - 1)
    pairs += [(f"{HINT}.0", "controlnet_cond_embedding.conv_in"),
              (f"{HINT}.{2 * n_blocks + 2}", "controlnet_cond_embedding.conv_out")]
    pairs += [(f"{HINT}.{2 * k + 2}", f"controlnet_cond_embedding.blocks.{k}") for k in range(n_blocks)]
    skips = 1 + sum(n + (i < len(c.block_out_channels) - 1) for i, n in enumerate(c.layers_per_block))
    pairs += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(skips)]
    pairs.append(("middle_block_out.0", "controlnet_mid_block"))
    return pairs


def strip_prefix(weights: dict[str, mx.array], path: str | Path) -> dict[str, mx.array]:
    """An original file's tensors without `control_model.`; files saved without the prefix are taken as they are."""
    if any(k.startswith(PREFIX) for k in weights):
        other = [k for k in weights if not k.startswith(PREFIX) and not k.startswith(keymaps.ORIGINAL_IGNORED_PREFIXES)]
        if other:
            raise UserError(f"{path}: {len(other)} tensors outside {PREFIX}*, e.g. {', '.join(other[:3])} "
                            "(a whole model with a ControlNet inside is not supported)")
        return {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    if f"{HINT}.0.weight" not in weights:
        raise UserError(f"{path}: not a ControlNet (no {PREFIX}{HINT}.* or {HINT}.* tensors)")
    return weights


def infer_controlnet_config(w: dict[str, mx.array], path: str | Path = "this file") -> dict:
    """A diffusers ControlNet config.json from an original ControlNet's shapes (keys without the prefix): the
    UNet's rules (stable_diffusion.infer_unet_config) plus the hint block's widths."""
    what = f"the ControlNet's config from {path}"
    hint = sorted(int(m.group(1)) for k in w if (m := re.match(rf"{HINT}\.(\d+)\.weight$", k)))
    if len(hint) < 2 or hint != list(range(0, 2 * len(hint), 2)):
        raise UserError(f"cannot infer {what}: {HINT} convs at {hint}, expected 0, 2, 4, ...")
    pooled = None
    if "label_emb.0.0.weight" in w:  # SDXL: pooled text + 6 ids of 256 each
        pooled = tensor_shape(w, "label_emb.0.0.weight", 2, what)[1] - 6 * SDXL_TIME_EMBED_DIM
        if pooled <= 0:
            raise UserError(f"cannot infer {what}: key label_emb.0.0.weight has {pooled + 6 * SDXL_TIME_EMBED_DIM} "
                            f"inputs, expected the pooled text plus 6 x {SDXL_TIME_EMBED_DIM}")
    if _count(list(w), r"input_blocks\.(\d+)\.") < 2:
        raise UserError(f"cannot infer {what}: no input_blocks")
    config = infer_unet_config(w, pooled, what)
    del config["up_block_types"], config["out_channels"]
    # conv_in, (a->a, a->b stride 2) per width, conv_out
    convs = [tensor_shape(w, f"{HINT}.{i}.weight", 4, what) for i in hint]
    return {**config, "_class_name": "ControlNetModel", "conditioning_channels": convs[0][1],
            "conditioning_embedding_out_channels": [convs[0][0]] + [c[0] for c in convs[2:-1:2]]}


def controlnet_config_dict(config: dict, source: str = "config.json") -> dict:
    """The config, checked to describe a ControlNet (a UNet config.json would build without its hint block) and
    every value checked (ControlNetConfig.from_dict) before anything is converted or written."""
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a JSON object")
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise UserError(f"{source}: not a ControlNet config: _class_name is {str(config['_class_name'])[:60]!r}")
    ControlNetConfig.from_dict(config, source)
    return config


def _write(dst: Path, config: dict, weights: dict[str, mx.array], source: str,
           quantize: tuple[int, int] | None) -> Path:
    return write_mlx_folder(dst, {"controlnet": quantized("controlnet", config, weights, quantize)}, source,
                            kind="controlnet")


def convert_controlnet_folder(src: str | Path, dst: str | Path, dtype: mx.Dtype | None = None,
                              quantize: tuple[int, int] | None = None) -> Path:
    """A diffusers ControlNet folder (config.json, diffusion_pytorch_model.safetensors or .bin)."""
    src = Path(src)
    config = controlnet_config_dict(read_json(src / "config.json"), str(src / "config.json"))
    log.info("converting ControlNet %s ...", src)
    weights = fit_weights(build("controlnet", config), component_weights(src), what=str(src), dtype=dtype)
    return _write(Path(dst), config, weights, str(src), quantize)


def convert_controlnet_file(path: str | Path, dst: str | Path, dtype: mx.Dtype | None = None,
                            quantize: tuple[int, int] | None = None, config: dict | None = None) -> Path:
    """An original single file (.pth through the restricted unpickler, or .safetensors). `config`: a diffusers
    ControlNet config.json to use instead of inferring one from the shapes (as from_single_file(config=...))."""
    path = Path(path)
    log.info("reading ControlNet %s ...", path)
    weights = strip_prefix(read_weights(path), path)
    if config:
        config = controlnet_config_dict(config, "--config")
    else:
        config = controlnet_config_dict(infer_controlnet_config(weights, path), f"the config inferred from {path}")
    model = build("controlnet", config)
    pairs = controlnet_original_to_diffusers(model.config)
    fitted = fit_weights(model, weights, keymaps.renamer(pairs), what=str(path), dtype=dtype)
    return _write(Path(dst), config, fitted, str(path), quantize)
