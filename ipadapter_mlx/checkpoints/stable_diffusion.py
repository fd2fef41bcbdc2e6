"""Stable Diffusion checkpoints (diffusers folders, original single files) -> one converted MLX folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..config import UNetConfig, VAEConfig
from ..errors import UserError
from ..folders import write_mlx_folder
from ..loading import build, read_json

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
# SDXL base's scheduler_config.json, for SDXL single files.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "interpolation_type": "linear", "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False,
}
DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"
DEFAULT_TOKENIZER_2 = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"  # SDXL's second tokenizer


log = logging.getLogger(__name__)


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
    return keymaps.renamer(pairs)


def quantized(component: str, config: dict, weights: dict[str, mx.array], quantize: tuple[int, int] | None):
    """Quantize a component's Linear layers for storage; the config records how, so loading needs no redo."""
    from mlx.utils import tree_flatten

    from ..loading import QUANTIZABLE
    from ..quantize import quantize_model

    if not quantize or component not in QUANTIZABLE:
        return config, weights
    model = build(component, config)
    model.load_weights(list(weights.items()))
    quantize_model(model, *quantize)
    return {**config, "quantization": {"bits": quantize[0], "group_size": quantize[1]}}, dict(tree_flatten(model.parameters()))


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
        log.info("converting %s ...", name)
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


def tensor_shape(w: dict[str, mx.array], key: str, ndim: int, what: str) -> tuple[int, ...]:
    """The shape of a tensor a config is inferred from, checked first: present, `ndim` dimensions, sizes > 0.
    `what`: "the UNet's config from FILE" for the message."""
    if key not in w:
        raise UserError(f"cannot infer {what}: key {key} is missing")
    shape = tuple(w[key].shape)
    if len(shape) != ndim or not all(shape):
        raise UserError(f"cannot infer {what}: key {key} has shape {shape}, expected {ndim} dimensions, all > 0")
    return shape


def infer_unet_config(w: dict[str, mx.array], pooled_dim: int | None = None,
                      what: str = "the UNet's config from this file") -> dict:
    """A diffusers UNet config.json from the shapes of an LDM UNet (keys without the prefix)."""
    keys = list(w)
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    lpb = (n_input - 1 - (levels - 1)) // levels
    if lpb < 1 or 1 + levels * lpb + levels - 1 != n_input:
        raise UserError(f"cannot infer {what}: unexpected input_blocks")
    channels, attn, depth = [], [], []
    for i in range(levels):
        first = 1 + i * (lpb + 1)
        channels.append(tensor_shape(w, f"input_blocks.{first}.0.out_layers.3.weight", 4, what)[0])
        attn.append(f"input_blocks.{first}.1.proj_in.weight" in w)
        depth.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") or 1)
    to_k = next((k for k in w if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise UserError(f"cannot infer {what}: no cross-attention layers")
    context = tensor_shape(w, to_k, 2, what)[1]
    proj = next((k for k in w if k.endswith(".proj_in.weight")), None)
    if proj is None:
        raise UserError(f"cannot infer {what}: no *.proj_in.weight beside the cross-attention layers")
    linear = w[proj].ndim == 2  # SD 2.x / SDXL: a Linear; SD 1.x: a 1x1 conv
    tensor_shape(w, proj, 2 if linear else 4, what)
    # SD 1.x (768-d text) trained with 8 heads; SD 2.x with 64-wide heads (the original yaml configs).
    heads = 8 if context == 768 else [c // 64 for c in channels]
    extra = {}
    if "label_emb.0.0.weight" in w:  # SDXL: pooled text + 6 size/crop ids, each embedded like a timestep
        extra_in = tensor_shape(w, "label_emb.0.0.weight", 2, what)[1]
        if not pooled_dim:
            raise UserError("SDXL UNet without a second text encoder in the file")
        if pooled_dim < 0 or (extra_in - pooled_dim) % 6 or extra_in <= pooled_dim:
            raise UserError(f"cannot infer {what}: key label_emb.0.0.weight has {extra_in} inputs, expected the "
                            f"pooled text ({pooled_dim}) plus 6 size/crop embeddings")
        extra = {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": extra_in,
                 "addition_time_embed_dim": (extra_in - pooled_dim) // 6, "sample_size": 128}
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": tensor_shape(w, "input_blocks.0.0.weight", 4, what)[1],
        "out_channels": tensor_shape(w, "out.2.weight", 4, what)[0] if "out.2.weight" in w else 4,  # a ControlNet has none
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
        "norm_num_groups": 32,
        "sample_size": 64,
        **extra,
    }


def infer_vae_config(w: dict[str, mx.array], sdxl: bool = False) -> dict:
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
        "scaling_factor": 0.13025 if sdxl else 0.18215,  # the one thing shapes cannot tell between the two
    }


def infer_text_config(w: dict[str, mx.array]) -> dict:
    emb = w["text_model.embeddings.token_embedding.weight"]
    hidden = emb.shape[1]
    projection = {}
    if "text_projection.weight" in w:  # OpenCLIP bigG (SDXL's second encoder): exact GELU, a projection
        projection = {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                      "projection_dim": w["text_projection.weight"].shape[0]}
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
        **projection,
    }


def openclip_to_transformers(w: dict[str, mx.array]) -> dict[str, mx.array]:
    """OpenCLIP's text transformer names and layout -> transformers' CLIPTextModelWithProjection."""
    out, layer = {}, keymaps.renamer(list(keymaps.OPENCLIP_LAYER.items()))
    for k, v in w.items():
        if k in keymaps.OPENCLIP_TOP:
            out[keymaps.OPENCLIP_TOP[k]] = v.T if k == "text_projection" else v
        elif k.startswith("transformer.resblocks."):
            _, _, i, rest = k.split(".", 3)
            prefix = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):  # q, k and v stacked along the output axis
                kind = rest.rpartition("_")[2]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), mx.split(v, 3, axis=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
            else:
                out[prefix + layer(rest)] = v
        elif k not in keymaps.OPENCLIP_IGNORED:
            out[k] = v  # reported as left over by the strict fit
    return out


def split_single_file(weights: dict[str, mx.array], path: str) -> dict[str, dict[str, mx.array]]:
    """Sort an original checkpoint's tensors by model; anything unclaimed is an error (strict)."""
    sdxl = any(k.startswith(keymaps.SDXL_TEXT_PREFIX) for k in weights)
    parts: dict[str, dict[str, mx.array]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    prefixes = {"unet": keymaps.UNET_PREFIX, "vae": keymaps.VAE_PREFIX, "text_encoder": keymaps.TEXT_PREFIX}
    if sdxl:
        parts["text_encoder_2"] = {}
        prefixes.update(text_encoder=keymaps.SDXL_TEXT_PREFIX, text_encoder_2=keymaps.SDXL_TEXT2_PREFIX)
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
    if sdxl:
        parts["text_encoder_2"] = openclip_to_transformers(parts["text_encoder_2"])
    for name, part in parts.items():
        if not part:
            raise UserError(f"{path}: no {name} weights (expected keys starting with {prefixes[name]!r})")
    return parts


def convert_single_file(
    path: str | Path,
    dst: str | Path,
    tokenizer: str | Path | None = None,
    dtype: mx.Dtype | None = None,
    config_dir: str | Path | None = None,
    quantize: tuple[int, int] | None = None,
    tokenizer_2: str | Path | None = None,
) -> Path:
    """An original `.safetensors` / `.ckpt`: SD 1.x (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.*) or SDXL (conditioner.embedders.0/1.*), told apart by its keys.

    Configs are inferred from tensor shapes (with SD conventions for what shapes cannot tell: head counts,
    32 norm groups, the VAE scale, the schedule). `config_dir`, a diffusers folder of the same architecture,
    supplies all configs and tokenizers instead, as diffusers' `from_single_file(config=...)` does. Tokenizers
    (folders or Hub repos) default to those of the config folder, else CLIP ViT-L/14's (and bigG's for SDXL).
    """
    from ..hub import resolve_tokenizer

    path = Path(path)
    log.info("reading %s ...", path)
    parts = split_single_file(read_weights(path), str(path))
    sdxl = "text_encoder_2" in parts
    text_names = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    model_index = None
    if config_dir is not None:
        config_dir = Path(config_dir)
        configs = {n: read_json(config_dir / n / "config.json") for n in [*text_names, "unet", "vae"]}
        scheduler = read_json(config_dir / "scheduler" / "scheduler_config.json")
        if (config_dir / "model_index.json").is_file():
            model_index = read_json(config_dir / "model_index.json")
        # an inpainting file (9 input channels) with its base model's configs, as sd-v1-5-inpainting.ckpt is used
        conv_in = parts["unet"].get("input_blocks.0.0.weight")
        if conv_in is not None and conv_in.ndim == 4:  # (a wrong shape is reported when the weights are fitted)
            configs["unet"] = {**configs["unet"], "in_channels": int(conv_in.shape[1])}
    else:
        configs = {n: infer_text_config(parts[n]) for n in text_names}
        pooled = configs.get("text_encoder_2", {}).get("projection_dim")
        configs.update(unet=infer_unet_config(parts["unet"], pooled), vae=infer_vae_config(parts["vae"], sdxl))
        scheduler = SDXL_SCHEDULER if sdxl else SD1_SCHEDULER
    unet_pairs = keymaps.unet_original_to_diffusers(UNetConfig.from_dict(configs["unet"]))
    vae_pairs = keymaps.vae_original_to_diffusers(VAEConfig.from_dict(configs["vae"]))
    renames = {"unet": keymaps.renamer(unet_pairs), "vae": keymaps.renamer(vae_pairs)}
    components = {}
    for name in [*text_names, "unet", "vae"]:
        log.info("converting %s ...", name)
        weights = fit_weights(build(name, configs[name]), parts[name], renames.get(name, lambda k: k),
                              what=f"{path} ({name})", dtype=dtype)
        components[name] = quantized(name, configs[name], weights, quantize)
    tokenizers = {}
    for name, given, default in (("tokenizer", tokenizer, DEFAULT_TOKENIZER), ("tokenizer_2", tokenizer_2, DEFAULT_TOKENIZER_2)):
        if name == "tokenizer_2" and not sdxl:
            continue
        ref = given or (config_dir / name if config_dir is not None and (config_dir / name).is_dir() else default)
        folder = resolve_tokenizer(str(ref))
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "vocab.json").is_file():
            raise UserError(f"{folder} is not a tokenizer folder")
        tokenizers[name] = folder
    return _write_pipeline(Path(dst), components, scheduler, tokenizers, str(path), model_index)
