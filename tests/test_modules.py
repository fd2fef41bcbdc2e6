"""Per-module parity with the PyTorch reference (float32, max abs error ~1e-4)."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import mlx.core as mx

from ipadapter_mlx.conditioning import StepConditioning
import numpy as np
import pytest
import torch

from conftest import UNET_CONFIGS, make_torch_pipeline, record, to_np
from ipadapter_mlx.checkpoints.stable_diffusion import component_weights, diffusers_rename
from ipadapter_mlx.checkpoints.weights import fit_weights
from ipadapter_mlx.loading import build, read_json

TOL = 1e-4


def mlx_module(name, folder):
    """Our module, built from the saved config.json and filled from the saved weights."""
    model = build(name, read_json(folder / name / "config.json"))
    model.load_weights(list(fit_weights(model, component_weights(folder / name), diffusers_rename(name)).items()))
    return model


def test_text_encoder(torch_pipe, diffusers_dir):
    ours = mlx_module("text_encoder", diffusers_dir)
    ids = torch_pipe.tokenizer(["a red fox in snow", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch_pipe.text_encoder(ids, output_hidden_states=True)
    out = ours(mx.array(ids.numpy()))
    assert record("text encoder: last hidden state", np.abs(to_np(out.last_hidden_state) - to_np(ref.last_hidden_state)).max(), "abs") < TOL
    assert np.abs(to_np(out.pooler_output) - to_np(ref.pooler_output)).max() < TOL
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert np.abs(to_np(a) - to_np(b)).max() < TOL


@pytest.mark.parametrize("layout", list(UNET_CONFIGS))
def test_unet(layout, tmp_path):
    pipe = make_torch_pipeline(layout, seed=7)
    pipe.unet.save_pretrained(tmp_path / "unet")
    ours = mlx_module("unet", tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 9, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([981.0, 3.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
    out = ours(mx.array(x.permute(0, 2, 3, 1).numpy()), mx.array(t.numpy()), StepConditioning(mx.array(ctx.numpy())))
    err = record(f"UNet ({layout} layout)", np.abs(to_np(out).transpose(0, 3, 1, 2) - to_np(ref)).max(), "abs")
    assert err < TOL, err


def test_vae_encode_decode(torch_pipe, diffusers_dir):
    ours = mlx_module("vae", diffusers_dir)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        dist = torch_pipe.vae.encode(img).latent_dist
        z = torch.randn(1, 4, 4, 6, generator=g)
        dec = torch_pipe.vae.decode(z).sample
    mean, std = ours.encode(mx.array(img.permute(0, 2, 3, 1).numpy()))
    assert record("VAE encode (mean)", np.abs(to_np(mean).transpose(0, 3, 1, 2) - to_np(dist.mean)).max(), "abs") < TOL
    assert np.abs(to_np(std).transpose(0, 3, 1, 2) - to_np(dist.std)).max() < TOL
    out = ours.decode(mx.array(z.permute(0, 2, 3, 1).numpy()))
    assert record("VAE decode", np.abs(to_np(out).transpose(0, 3, 1, 2) - to_np(dec)).max(), "abs") < TOL
