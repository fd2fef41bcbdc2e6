"""ControlNet parity with diffusers: the model per module (SD 1.5 and SDXL layouts), whole generations of its
ControlNet pipelines with IP-Adapters, MultiControlNet, guess mode, image-to-image, original single files."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import json
from pathlib import Path

import diffusers
import mlx.core as mx
import numpy as np
import torch
from PIL import Image

from conftest import perturb, psnr, record, to_np, write_tokenizer
from ip_fixtures import SDXL_VARIANTS, VARIANTS, make_adapter_repo
from ipadapter_mlx import ImagePrompt, StableDiffusion, UserError
from ipadapter_mlx.conditioning import StepConditioning
from ipadapter_mlx.controlnet import Control
from test_ip_adapter import reference_image
from test_pipeline import torch_noise

H, W, STEPS = 32, 48, 5
TOL = 1e-4
HINT = (8, 16)  # the tiny VAE downsamples by 2: one stride-2 conv in the control image's embedding


def make_controlnet(unet, seed: int, **kw):
    """A ControlNet copied from the UNet's layout, every weight random (its zero convs too, so it matters)."""
    torch.manual_seed(seed)
    net = perturb(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT,
                                                      load_weights_from_unet=False, **kw), seed)
    g = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return net


def nhwc(a):
    return mx.array(a.permute(0, 2, 3, 1).numpy())


def control_image(seed, size=(W, H)):
    """Edges-like: a few bright shapes on black, not at the output size (so the resize matters)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1] + 8, size[0] + 4, 3), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, a.shape[0] - 8), rng.integers(0, a.shape[1] - 8)
        a[y:y + 8, x:x + 8] = rng.integers(100, 256, 3)
    return Image.fromarray(a)


# -- the model, per module ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_nets(torch_pipe, tmp_path_factory):
    """Two diffusers ControlNet folders for the tiny SD 1.5 pipeline (one with BGR order)."""
    root = tmp_path_factory.mktemp("controlnets")
    for i in range(2):
        make_controlnet(torch_pipe.unet, 10 + i).save_pretrained(root / f"net{i}")
    return root


@pytest.mark.parametrize("guess,pool,order", [(False, False, "rgb"), (True, False, "bgr"), (True, True, "rgb")])
def test_model_matches_diffusers_sd15(sd_nets, tmp_path, guess, pool, order):
    ref = diffusers.ControlNetModel.from_pretrained(sd_nets / "net0")
    ref.register_to_config(global_pool_conditions=pool, controlnet_conditioning_channel_order=order)
    ref.save_pretrained(tmp_path / "net")
    from ipadapter_mlx.controlnet import resolve_controlnet
    from ipadapter_mlx.loading import load_component

    ours = load_component(resolve_controlnet(str(tmp_path / "net")), "controlnet", mx.float32)
    _compare(ref, ours, f"ControlNet SD 1.5 (guess {guess}, pool {pool}, {order})", guess, context=32)


def _compare(ref, ours, name, guess=False, context=32, added=None):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, context, generator=g)
    image = torch.rand(2, 3, 16, 24, generator=g)
    t = torch.tensor([900.0, 20.0])
    with torch.no_grad():
        down, mid = ref(x, t, ctx, image, conditioning_scale=0.7, guess_mode=guess, return_dict=False,
                        added_cond_kwargs=added)
    cond = StepConditioning(mx.array(ctx.numpy()), {k: mx.array(v.numpy()) for k, v in (added or {}).items()})
    r = ours(nhwc(x), mx.array(t.numpy()), cond, nhwc(image), 0.7, guess)
    assert len(r.down) == len(down)
    err = max(np.abs(to_np(a).transpose(0, 3, 1, 2) - to_np(b)).max() for a, b in zip(r.down + [r.mid], list(down) + [mid]))
    scale = max(np.abs(to_np(b)).max() for b in down)
    assert scale > 1e-2  # real residuals, not zeros
    assert record(name, err, "abs") < TOL


@pytest.fixture(scope="module")
def xl_parts(tmp_path_factory):
    from test_sdxl import UNET, make_sdxl_pipeline

    root = tmp_path_factory.mktemp("sdxl-cn")
    pipe = make_sdxl_pipeline(UNET, write_tokenizer(root / "tok"))
    pipe.save_pretrained(root / "pipe")
    make_controlnet(pipe.unet, 20).save_pretrained(root / "net")
    return root


def test_model_matches_diffusers_sdxl(xl_parts):
    from ipadapter_mlx.controlnet import resolve_controlnet
    from ipadapter_mlx.loading import load_component

    ref = diffusers.ControlNetModel.from_pretrained(xl_parts / "net")
    ours = load_component(resolve_controlnet(str(xl_parts / "net")), "controlnet", mx.float32)
    g = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96], [32, 32, 4, 8, 64, 64]])}
    _compare(ref, ours, "ControlNet SDXL (text_time)", False, context=64, added=added)
