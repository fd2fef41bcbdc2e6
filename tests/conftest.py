"""Tiny random models in the real public file formats, built once per test session.

The PyTorch side (diffusers, transformers) is the independent reference; it is a test-only dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may touch the network (set before any HF import)
# One scratch folder for what the session writes outside tmp_path (the conversion cache, tokenizer files),
# never the user's cache; removed when the session ends.
SCRATCH = Path(tempfile.mkdtemp(prefix="ipadapter-mlx-tests-"))
os.environ["IPADAPTER_MLX_CACHE"] = str(SCRATCH / "cache")

import ipadapter_mlx  # noqa: E402,F401  (before anything loads mlx: it routes MLX to OpenBLAS on Linux)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ipadapter_mlx.synthetic import write_tokenizer  # noqa: E402  (real CLIP tokenizer files, tiny vocab)

try:  # the PyTorch reference: a test-only dependency. Without it the MLX-only tests run, parity tests skip.
    import diffusers
    import torch
    import transformers
except ImportError:
    torch = diffusers = transformers = None
NO_TORCH = "parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')"


def needs_torch() -> None:
    if torch is None:
        pytest.skip(NO_TORCH)

# SD 1.5's scheduler_config.json, as published.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}

# Two UNet layouts: SD 1.x style (conv proj, one int for heads) and SD 2.x/XL style (linear proj,
# per-block heads and transformer depth, uneven layers per block).
UNET_CONFIGS = {
    "sd1": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ),
    "sd2": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 48), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=[2, 4, 6], use_linear_projection=True,
        transformer_layers_per_block=[2, 1, 1], norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
    ),
}
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=16,
)
TEXT_CONFIG = dict(
    vocab_size=514, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513,
)


def perturb(module, seed: int):
    """Default init plus noise: no zero-initialised layer or unit norm hides a mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.02))
    return module.eval()


def make_torch_pipeline(unet_config: str = "sd1", seed: int = 0):
    needs_torch()
    tok_dir = write_tokenizer(SCRATCH / "tokenizer")
    torch.manual_seed(seed)
    unet = perturb(diffusers.UNet2DConditionModel(**UNET_CONFIGS[unet_config]), seed + 1)
    vae = perturb(diffusers.AutoencoderKL(**VAE_CONFIG), seed + 2)
    text = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)), seed + 3)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=unet, scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def diffusers_dir(tmp_path_factory) -> Path:
    """A diffusers folder as save_pretrained writes it (safetensors)."""
    path = tmp_path_factory.mktemp("sd-tiny")
    make_torch_pipeline("sd1").save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def torch_pipe(diffusers_dir):
    """The reference: diffusers' pipeline loaded from that folder, as a user would load it."""
    needs_torch()
    return diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)


@pytest.fixture(scope="session")
def mlx_dir(request, tmp_path_factory) -> Path:
    """The tiny model converted from `diffusers_dir` (the same weights as torch_pipe); without torch, the same
    shapes with MLX's random weights, for the tests that compare with no reference."""
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
    from ipadapter_mlx.synthetic import random_pipeline

    dst = tmp_path_factory.mktemp("mlx") / "sd-tiny"
    if torch is None:
        shapes = {"text_encoder": TEXT_CONFIG, "unet": UNET_CONFIGS["sd1"], "vae": {**VAE_CONFIG, "scaling_factor": 0.18215}}
        return random_pipeline(dst, shapes)
    return convert_diffusers_folder(request.getfixturevalue("diffusers_dir"), dst)


@pytest.fixture(scope="session")
def mlx_pipe(mlx_dir):
    import mlx.core as mx

    from ipadapter_mlx import StableDiffusion

    return StableDiffusion(mlx_dir, dtype=mx.float32)


def to_np(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x.detach().float().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# -- measured parity figures: every parity test records its number; the run ends with the table ----------

PARITY: dict[str, str] = {}


def record(name: str, value: float, unit: str) -> float:
    PARITY[name] = f"{value:.3g} {unit}" if unit != "dB" else f"{value:.1f} dB"
    return value


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SCRATCH, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("measured parity (max abs error per module; PSNR per picture)")
        for name in sorted(PARITY):
            terminalreporter.write_line(f"{name:60s} {PARITY[name]}")
