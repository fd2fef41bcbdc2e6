"""Random-weight models at given shapes, written in the formats the real loaders read: a converted pipeline
folder, a tencent-format IP-Adapter file and a converted image-encoder folder. `bench` times the real pipeline on
them at real shapes (timing and memory do not depend on the values); the tests use them at tiny shapes where no
PyTorch reference is needed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .folders import write_mlx_folder
from .loading import build

# SD 1.5's scheduler_config.json, as published.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}
MODEL_PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer with a byte-level vocabulary (no merges): real files, 514 tokens (ids < 514)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))
    return folder


def random_weights(component: str, config: dict, dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """MLX's own initialisation of the module the config describes, flat, in `dtype`."""
    model = build(component, config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return dict(tree_flatten(model.parameters()))


def random_pipeline(dst: Path, shapes: dict, dtype: mx.Dtype = mx.float32) -> Path:
    """A converted pipeline folder (SD 1.x, or SDXL when `shapes` has text_encoder_2) with random weights.
    The VAE is stored in float32, as the pipeline runs it."""
    components = {n: (shapes[n], random_weights(n, shapes[n], mx.float32 if n == "vae" else dtype))
                  for n in MODEL_PARTS if n in shapes}
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-tokenizer-") as tmp:  # copied in, then gone
        tokenizer = write_tokenizer(Path(tmp))
        folders = {"tokenizer": tokenizer, **({"tokenizer_2": tokenizer} if "text_encoder_2" in shapes else {})}
        return write_mlx_folder(Path(dst), components, "random weights",
                                json_files={"scheduler/scheduler_config.json": SD15_SCHEDULER}, folders=folders)


def random_image_encoder(dst: Path, config: dict, dtype: mx.Dtype = mx.float32) -> Path:
    """A converted image-encoder folder (image_encoder/ inside) with random weights."""
    return write_mlx_folder(Path(dst), {"image_encoder": (config, random_weights("image_encoder", config, dtype))},
                            "random weights", kind="image-encoder")


def random_ip_adapter(path: Path, shapes: dict, seed: int = 0) -> Path:
    """An IP-Adapter-plus in the tencent .safetensors layout for `shapes` (bench_shapes' layout: a Resampler
    reading the image encoder's hidden states, to_k_ip/to_v_ip for every cross-attention layer of the UNet)."""
    from .bench_shapes import ip_adapter_weights
    from .ip_adapter import cross_attention_slots

    widths = {i: layer.to_q.weight.shape[0] for i, (_, layer) in cross_attention_slots(build("unet", shapes["unet"])).items()}
    weights = ip_adapter_weights(shapes, widths, np.random.default_rng(seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in weights.items()})
    return path
