"""Stable Diffusion checkpoints (diffusers folders, original single files) -> one converted MLX folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ipadapter_mlx.config import UNetConfig, VAEConfig
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.loading import FORMAT_VERSION, MARKER, build, read_json

from . import keymaps
from .weights import fit_weights, read_weights

# Weight file names a diffusers/transformers component folder may use, in order of preference.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")  # text_encoder_2: SDXL only
TOKENIZERS = ("tokenizer", "tokenizer_2")

# The SD 1.x training schedule (the original v1-inference.yaml), for single files that carry none.
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}
DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"


def _log(msg: str) -> None:
    print(msg, flush=True)


def component_weights(folder: Path) -> dict[str, mx.array]:
    """The weights of one diffusers component folder (single or sharded file)."""
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            weights = {}
            for shard in shards:
                weights.update(read_weights(folder / shard))
            return weights
        if (folder / name).is_file():
            return read_weights(folder / name)
    raise UserError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)})")


def diffusers_rename(component: str) -> Callable[[str], str]:
    if component in ("text_encoder", "text_encoder_2"):
        return keymaps.clip_text_key
    if component == "image_encoder":
        return keymaps.clip_vision_key
    if component != "vae":
        return lambda k: k
    pairs = []
    for p in ("encoder", "decoder"):
        pairs += [(f"{p}.mid_block.attentions.0.{a}", f"{p}.mid_block.attentions.0.{b}")
                  for a, b in keymaps.DIFFUSERS_DEPRECATED_VAE_ATTENTION.items()]
    return lambda k: keymaps.rename(k, pairs)


def quantized(component: str, config: dict, weights: dict[str, mx.array], quantize: tuple[int, int] | None):
    """Quantize a component's Linear layers for storage; the config records how, so loading needs no redo."""
    from mlx.utils import tree_flatten

    from ipadapter_mlx.loading import QUANTIZABLE
    from ipadapter_mlx.quantize import quantize_model

    if not quantize or component not in QUANTIZABLE:
        return config, weights
    model = build(component, config)
    model.load_weights(list(weights.items()))
    quantize_model(model, *quantize)
    return {**config, "quantization": {"bits": quantize[0], "group_size": quantize[1]}}, dict(tree_flatten(model.parameters()))


def write_mlx_folder(
    dst: Path,
    components: dict[str, tuple[dict, dict[str, mx.array]]],
    source: str,
    kind: str = "stable-diffusion",
    json_files: dict[str, dict] | None = None,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write into a temp folder beside `dst`, then rename it into place: never a half-written folder.

    `components`: sub-folder -> (config.json, MLX weights); `json_files`: relative path -> content;
    `folders`: sub-folder -> a folder copied as it is (the tokenizer)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for name, (config, weights) in components.items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
            mx.save_safetensors(str(tmp / name / "model.safetensors"), weights)
        for rel, content in (json_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2))
        for name, folder in (folders or {}).items():
            shutil.copytree(folder, tmp / name)
        marker = {"format": "ipadapter-mlx", "version": FORMAT_VERSION, "kind": kind, "source": source}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _write_pipeline(dst: Path, components, scheduler: dict, tokenizers: dict[str, Path], source: str,
                    model_index: dict | None = None) -> Path:
    files = {"scheduler/scheduler_config.json": scheduler}
    if model_index:
        files["model_index.json"] = model_index
    kind = "stable-diffusion-xl" if "text_encoder_2" in components else "stable-diffusion"
    return write_mlx_folder(dst, components, source, kind=kind, json_files=files, folders=tokenizers)


def convert_diffusers_folder(
    src: str | Path, dst: str | Path, dtype: mx.Dtype | None = None, quantize: tuple[int, int] | None = None
) -> Path:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    src = Path(src)
    if not (src / "model_index.json").is_file():
        raise UserError(f"{src} is not a diffusers pipeline folder (no model_index.json)")
    components = {}
    for name in MODEL_COMPONENTS:
        if not (src / name).is_dir():
            if name == "text_encoder_2":
                continue
            raise UserError(f"{src} has no {name}/ folder")
        config = read_json(src / name / "config.json")
        _log(f"converting {name} ...")
        weights = fit_weights(build(name, config), component_weights(src / name), diffusers_rename(name),
                              what=f"{src / name}", dtype=dtype)
        components[name] = quantized(name, config, weights, quantize)
    scheduler = read_json(src / "scheduler" / "scheduler_config.json")
    tokenizers = {t: src / t for t in TOKENIZERS[: 2 if "text_encoder_2" in components else 1]}
    for t, folder in tokenizers.items():
        if not folder.is_dir():
            raise UserError(f"{src} has no {t}/ folder")
    return _write_pipeline(Path(dst), components, scheduler, tokenizers, str(src), read_json(src / "model_index.json"))


# ---------------------------------------------------------------------------------------------------
# Original single-file checkpoints: configs inferred from tensor shapes.


def _count(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_unet_config(w: dict[str, mx.array]) -> dict:
    """A diffusers UNet config.json from the shapes of an LDM UNet (keys without the prefix)."""
    keys = list(w)
    if any(k.startswith("label_emb.") for k in keys):
        raise UserError("this single file is an SDXL checkpoint; SDXL is not supported yet (use an SD 1.x/2.x file)")
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    lpb = (n_input - 1 - (levels - 1)) // levels
    if lpb < 1 or 1 + levels * lpb + levels - 1 != n_input:
        raise UserError("cannot infer the UNet layout from this file: unexpected input_blocks")
    channels, attn, depth = [], [], []
    for i in range(levels):
        first = 1 + i * (lpb + 1)
        channels.append(w[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attn.append(f"input_blocks.{first}.1.proj_in.weight" in w)
        depth.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") or 1)
    to_k = next((v for k, v in w.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise UserError("cannot infer the UNet layout from this file: no cross-attention layers")
    context = to_k.shape[1]
    proj = next(v for k, v in w.items() if k.endswith(".proj_in.weight"))
    # SD 1.x (768-d text) trained with 8 heads; SD 2.x with 64-wide heads (the original yaml configs).
    heads = 8 if context == 768 else [c // 64 for c in channels]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": w["input_blocks.0.0.weight"].shape[1],
        "out_channels": w["out.2.weight"].shape[0],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": proj.ndim == 2,
        "norm_num_groups": 32,
        "sample_size": 64,
    }


def infer_vae_config(w: dict[str, mx.array]) -> dict:
    keys = list(w)
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    lpb = _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": w["encoder.conv_in.weight"].shape[1],
        "out_channels": w["decoder.conv_out.weight"].shape[0],
        "latent_channels": w["decoder.conv_in.weight"].shape[1],
        "block_out_channels": [w[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        "layers_per_block": lpb,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    }


def infer_text_config(w: dict[str, mx.array]) -> dict:
    emb = w["text_model.embeddings.token_embedding.weight"]
    hidden = emb.shape[1]
    return {
        "architectures": ["CLIPTextModel"],
        "vocab_size": emb.shape[0],
        "hidden_size": hidden,
        "intermediate_size": w["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": _count(list(w), r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": w["text_model.embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def split_single_file(weights: dict[str, mx.array], path: str) -> dict[str, dict[str, mx.array]]:
    """Sort an original checkpoint's tensors by model; anything unclaimed is an error (strict)."""
    parts: dict[str, dict[str, mx.array]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    prefixes = {"unet": keymaps.UNET_PREFIX, "vae": keymaps.VAE_PREFIX, "text_encoder": keymaps.TEXT_PREFIX}
    unclaimed = []
    for key, value in weights.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                sub = key[len(prefix):]
                parts[name][keymaps.clip_text_key(sub) if name == "text_encoder" else sub] = value
                break
        else:
            if not key.startswith(keymaps.ORIGINAL_IGNORED_PREFIXES):
                unclaimed.append(key)
    if any(k.startswith("cond_stage_model.model.") for k in weights):
        raise UserError(f"{path}: OpenCLIP text encoder (SD 2.x single file) is not supported yet")
    if unclaimed:
        raise UserError(f"{path}: {len(unclaimed)} tensors belong to no known model, e.g. {', '.join(unclaimed[:3])}")
    for name, part in parts.items():
        if not part:
            raise UserError(f"{path}: no {name} weights (expected keys starting with {prefixes[name]!r})")
    return parts


def convert_single_file(
    path: str | Path,
    dst: str | Path,
    tokenizer_dir: str | Path,
    dtype: mx.Dtype | None = None,
    config_dir: str | Path | None = None,
    quantize: tuple[int, int] | None = None,
) -> Path:
    """An original `.safetensors` / `.ckpt` (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*).

    Configs are inferred from tensor shapes (SD 1.x/2.x conventions for what shapes cannot tell: head
    counts, 32 norm groups, the SD 1 schedule). `config_dir`, a diffusers folder of the same architecture,
    supplies all configs instead, as diffusers' `from_single_file(config=...)` does.
    """
    path = Path(path)
    _log(f"reading {path} ...")
    parts = split_single_file(read_weights(path), str(path))
    if config_dir is not None:
        config_dir = Path(config_dir)
        unet_cfg, vae_cfg, text_cfg = (read_json(config_dir / n / "config.json") for n in ("unet", "vae", "text_encoder"))
        scheduler = read_json(config_dir / "scheduler" / "scheduler_config.json")
    else:
        unet_cfg = infer_unet_config(parts["unet"])
        vae_cfg = infer_vae_config(parts["vae"])
        text_cfg = infer_text_config(parts["text_encoder"])
        scheduler = SD1_SCHEDULER
    unet_pairs = keymaps.unet_original_to_diffusers(UNetConfig.from_dict(unet_cfg))
    vae_pairs = keymaps.vae_original_to_diffusers(VAEConfig.from_dict(vae_cfg))
    components = {}
    for name, config, rename in (
        ("text_encoder", text_cfg, lambda k: k),
        ("unet", unet_cfg, lambda k: keymaps.rename(k, unet_pairs)),
        ("vae", vae_cfg, lambda k: keymaps.rename(k, vae_pairs)),
    ):
        _log(f"converting {name} ...")
        weights = fit_weights(build(name, config), parts[name], rename, what=f"{path} ({name})", dtype=dtype)
        components[name] = quantized(name, config, weights, quantize)
    if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file() and not (Path(tokenizer_dir) / "vocab.json").is_file():
        raise UserError(f"{tokenizer_dir} is not a tokenizer folder")
    return _write_pipeline(Path(dst), components, scheduler, {"tokenizer": Path(tokenizer_dir)}, str(path))
