"""IP-Adapter-FaceID: projections, LoRA, whole generations against diffusers (load_ip_adapter of FaceID files +
ip_adapter_image_embeds, float32) and the authors' code transcribed where diffusers has no equivalent; face
embeddings files and the CLI's one-line errors."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch

from conftest import psnr, record, to_np
from faceid_fixtures import FACEID_VARIANTS, ID_DIM, make_faceid_repo
from ip_fixtures import make_adapter_repo
from ipadapter_mlx import StableDiffusion
from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.ip_adapter import ImagePrompt
from test_ip_adapter import reference_image

H, W, STEPS = 32, 32, 4


@pytest.fixture(scope="module")
def faceid_repo(torch_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("h94-faceid")
    make_adapter_repo(root / "clip", torch_pipe.unet)  # the CLIP towers the Plus adapters read (models/...)
    return make_faceid_repo(root, torch_pipe.unet)


def faces(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, ID_DIM)).astype(np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)  # as insightface's normed_embedding


def diffusers_projection(path):
    state = torch.load(path, weights_only=True)
    return diffusers.UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        diffusers.UNet2DConditionModel, state["image_proj"], low_cpu_mem_usage=False).eval()


# -- per module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["faceid", "portrait", "portrait-unnorm"])
def test_projection_matches_diffusers(variant, faceid_repo):
    path = faceid_repo / FACEID_VARIANTS[variant][0]
    adapter = read_ip_adapter(path)
    c = adapter.config.image_proj
    assert c.face and c.tokens == FACEID_VARIANTS[variant][2] and not c.reads_hidden_states
    x = torch.tensor(faces(3, 1))
    with torch.no_grad():  # portrait-unnorm is diffusers' plus Resampler over one-token sequences
        ref = diffusers_projection(path)(x[:, None] if variant == "portrait-unnorm" else x)
    got = adapter.image_proj(mx.array(x.numpy())[:, None] if variant == "portrait-unnorm" else mx.array(x.numpy()))
    assert record(f"FaceID projection {variant}", np.abs(to_np(got) - to_np(ref)).max(), "abs") < 1e-4


@pytest.mark.parametrize("variant,shortcut,scale", [("plus", False, 1.0), ("plusv2", True, 1.0), ("plusv2", True, 0.6)])
def test_plus_projection_matches_diffusers(variant, shortcut, scale, faceid_repo):
    path = faceid_repo / FACEID_VARIANTS[variant][0]
    adapter = read_ip_adapter(path)
    c = adapter.config.image_proj
    assert c.kind == "faceid-plus" and c.shortcut == shortcut and c.clip_width == c.clip_dim
    ref = diffusers_projection(path)
    g = torch.Generator().manual_seed(2)
    x, clip = torch.tensor(faces(3, 2)), torch.randn(3, 257, c.clip_dim, generator=g)
    ref.clip_embeds, ref.shortcut, ref.shortcut_scale = clip[None], shortcut, scale  # diffusers' by-hand settings
    with torch.no_grad():
        expected = ref(x)
    got = adapter.image_proj(mx.array(x.numpy()), mx.array(clip.numpy()), scale)
    assert record(f"FaceID projection {variant} (scale {scale})", np.abs(to_np(got) - to_np(expected)).max(),
                  "abs") < 1e-4
