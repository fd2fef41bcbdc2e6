"""Converted MLX folder -> MLX modules, strictly: every parameter filled, no tensor left over.

A converted folder mirrors a diffusers repo: `text_encoder/`, `unet/`, `vae/` each hold the checkpoint's
own `config.json` and a `model.safetensors` in MLX layout; `tokenizer/` and `scheduler/` are copied as they
are; `mlx_model.json` is written last and marks the folder complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CLIPTextConfig, CLIPVisionConfig, SchedulerConfig, UNetConfig, VAEConfig
from .errors import UserError
from .models import AutoencoderKL, CLIPTextModel, CLIPVisionModel, UNet2DConditionModel

MARKER = "mlx_model.json"
FORMAT_VERSION = 1

# component folder -> (config class, module class)
COMPONENTS = {
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "text_encoder_2": (CLIPTextConfig, CLIPTextModel),
    "unet": (UNetConfig, UNet2DConditionModel),
    "vae": (VAEConfig, AutoencoderKL),
    "image_encoder": (CLIPVisionConfig, CLIPVisionModel),
}


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def build(component: str, config: dict) -> nn.Module:
    """An MLX module with freshly initialised weights, sized by the checkpoint's config dict."""
    config_cls, module_cls = COMPONENTS[component]
    try:
        return module_cls(config_cls.from_dict(config))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{component} config.json is incomplete or invalid ({type(e).__name__}: {e})") from None


def is_mlx_folder(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


QUANTIZABLE = ("text_encoder", "text_encoder_2", "unet", "image_encoder")  # the VAE is convolutions; adapters are small


def load_component(
    folder: str | Path, component: str, dtype: mx.Dtype | None = None, quantize: tuple[int, int] | None = None
) -> nn.Module:
    """One model of a converted folder. `quantize` = (bits, group_size) quantizes its Linear layers on load;
    a folder converted with --quantize is loaded quantized as it is, without quantizing again."""
    from .quantize import quantize_model

    folder = Path(folder) / component
    config = read_json(folder / "config.json")
    model = build(component, config)
    stored = config.get("quantization")
    if stored:
        quantize_model(model, stored["bits"], stored["group_size"])
    path = folder / "model.safetensors"
    if not path.is_file():
        raise UserError(f"weights not found: {path}")
    try:
        weights = mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: truncated or corrupt safetensors file ({e})") from None
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    bad = [k for k in params if k in weights and weights[k].shape != params[k].shape]
    if missing or extra or bad:
        detail = "; ".join(
            f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", bad))
            if names
        )
        raise UserError(f"{path}: weights do not fit {component}/config.json ({detail})")
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    if quantize and not stored and component in QUANTIZABLE:
        quantize_model(model, *quantize)
    mx.eval(model.parameters())
    model.eval()
    return model


def component_bytes(
    folder: str | Path, component: str, dtype: mx.Dtype, quantize: tuple[int, int] | None = None
) -> int:
    """The bytes load_component(folder, component, dtype, quantize) will hold, from shapes alone: MLX arrays
    are lazy, so the model built here is never computed."""
    from .quantize import quantize_model

    config = read_json(Path(folder) / component / "config.json")
    model = build(component, config)
    model.set_dtype(dtype)
    stored = config.get("quantization")
    if stored or (quantize and component in QUANTIZABLE):
        quantize_model(model, *((stored["bits"], stored["group_size"]) if stored else quantize))
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_scheduler_config(folder: str | Path) -> SchedulerConfig:
    return SchedulerConfig.from_dict(read_json(Path(folder) / "scheduler" / "scheduler_config.json"))
