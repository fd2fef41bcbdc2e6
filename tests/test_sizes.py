"""Any picture size that is a multiple of 8: latents whose sides are not multiples of the UNet's 2**levels.

diffusers forwards each skip connection's size to the upsampler (nearest interpolation to that size), so an odd
side halved by a stride-2 downsampling comes back to its exact size. The tiny models here have SD's 8x VAE, so
200x136 pixels are 25x17 latents, as SD 1.5 gets them.
"""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")


import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import UNET_CONFIGS, make_torch_pipeline, perturb, psnr, record, to_np
from test_modules import mlx_module
from test_pipeline import torch_noise, with_scheduler
from test_sdxl import UNET as SDXL_UNET

TOL = 1e-4
# SDXL's real layout: three levels, no attention at the first, deeper transformers at the last.
SDXL3_UNET = {**SDXL_UNET, "block_out_channels": (16, 32, 48), "layers_per_block": 1,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              "attention_head_dim": (1, 2, 4), "transformer_layers_per_block": (1, 1, 2), "cross_attention_dim": 24}
UNETS = {**UNET_CONFIGS, "sdxl": SDXL3_UNET}
# SD's VAE shape (four levels: 8x), tiny channels.
VAE8_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    sample_size=32,
)
PROMPT, H, W = "a fox in the snow", 136, 200


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """One (diffusers, ours) UNet pair per layout, built on first use."""
    cache = {}

    def get(layout):
        if layout not in cache:
            torch.manual_seed(0)
            ref = perturb(diffusers.UNet2DConditionModel(**UNETS[layout]), 7)
            folder = tmp_path_factory.mktemp(f"unet-{layout}")
            ref.save_pretrained(folder / "unet")
            cache[layout] = ref, mlx_module("unet", folder)
        return cache[layout]

    return get


@pytest.mark.parametrize("size", [(25, 17), (45, 80), (65, 65), (16, 24)])
@pytest.mark.parametrize("layout", list(UNETS))
def test_unet_any_latent_size(unets, layout, size):
    ref, ours = unets(layout)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *size, generator=g)
    ctx = torch.randn(1, 7, ref.config.cross_attention_dim, generator=g)
    t = torch.tensor([421.0])
    kw, ours_kw = {}, {}
    if layout == "sdxl":
        pooled, ids = torch.randn(1, 32, generator=g), torch.tensor([[size[0] * 8.0, size[1] * 8, 0, 0, 64, 64]])
        kw = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        ours_kw = dict(text_embeds=mx.array(pooled.numpy()), time_ids=mx.array(ids.numpy()))
    from ipadapter_mlx.conditioning import StepConditioning

    with torch.no_grad():
        expected = ref(x, t, ctx, **kw).sample
    got = ours(mx.array(x.permute(0, 2, 3, 1).numpy()), mx.array(t.numpy()), StepConditioning(mx.array(ctx.numpy()), ours_kw))
    assert got.shape == (1, *size, 4)
    err = record(f"UNet ({layout} layout) at {size[0]}x{size[1]} latents",
                 np.abs(to_np(got).transpose(0, 3, 1, 2) - to_np(expected)).max(), "abs")
    assert err < TOL, err


@pytest.fixture(scope="module")
def sd8(tmp_path_factory):
    """A tiny SD pipeline with an 8x VAE and a 3-level UNet: (converted folder, diffusers pipe, ours)."""
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
    from ipadapter_mlx import StableDiffusion

    parts = make_torch_pipeline("sd1", seed=3).components
    torch.manual_seed(4)
    parts["unet"] = perturb(diffusers.UNet2DConditionModel(**{**UNET_CONFIGS["sd2"], "cross_attention_dim": 32}), 6)
    parts["vae"] = perturb(diffusers.AutoencoderKL(**VAE8_CONFIG), 5)
    folder = tmp_path_factory.mktemp("sd8") / "diffusers"
    diffusers.StableDiffusionPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert ref.vae_scale_factor == 8
    mlx = convert_diffusers_folder(folder, folder.parent / "mlx")
    return mlx, ref, StableDiffusion(mlx, dtype=mx.float32)


@pytest.mark.parametrize("pixels", [(H, W), (138, 202)])  # 138x202: odd sizes inside the encoder too
def test_vae_any_size(sd8, pixels):
    folder, ref, ours = sd8
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, *pixels, generator=g) * 2 - 1
    z = torch.randn(1, 4, H // 8, W // 8, generator=g)
    with torch.no_grad():
        mean = ref.vae.encode(img).latent_dist.mean
        dec = ref.vae.decode(z).sample
    got_mean, _ = ours.vae.encode(mx.array(img.permute(0, 2, 3, 1).numpy()))
    assert got_mean.shape[1:3] == mean.shape[2:]
    err = np.abs(to_np(got_mean).transpose(0, 3, 1, 2) - to_np(mean)).max()
    assert record(f"VAE (8x) encode at {pixels[0]}x{pixels[1]}", err, "abs") < TOL
    out = ours.vae.decode(mx.array(z.permute(0, 2, 3, 1).numpy()))
    assert out.shape == (1, H, W, 3)
    err = np.abs(to_np(out).transpose(0, 3, 1, 2) - to_np(dec)).max()
    assert record("VAE (8x) decode 17x25 latents", err, "abs") < TOL


def test_text_to_image_200x136(sd8):
    _, ref, ours = sd8
    latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    expected = with_scheduler(ref, "euler-a")(
        PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=H, width=W,
        latents=latents, generator=torch.Generator().manual_seed(11), output_type="np",
    ).images
    got = ours.generate(PROMPT, negative_prompt="blurry", steps=4, cfg=7.5, height=H, width=W, scheduler="euler-a",
                        latents=latents.numpy(), noise=torch_noise(torch.Generator().manual_seed(11)),
                        return_array=True)
    assert expected.shape == (1, H, W, 3) and expected.std() > 0.05
    assert record("SD text-to-image at 200x136", psnr(np.array(got), expected), "dB") >= 40


@pytest.mark.parametrize("init_size", [(W, H), (203, 141)])  # 203x141: both round down to 200x136 and resize
def test_image_to_image_any_size(sd8, init_size):
    _, ref, ours = sd8
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*init_size[::-1], 3), dtype=np.uint8))
    expected = with_scheduler(ref, "dpmpp-2m", img2img=True)(
        PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images
    got = ours.generate(PROMPT, steps=5, cfg=5.0, scheduler="dpmpp-2m", init_image=init, strength=0.6,
                        noise=torch_noise(torch.Generator().manual_seed(5)), return_array=True)
    assert expected.shape == got.shape == (1, H, W, 3)
    assert record(f"SD image-to-image, {init_size[0]}x{init_size[1]} init", psnr(np.array(got), expected), "dB") >= 40


def test_cli_any_size(sd8, tmp_path, capsys):
    from ipadapter_mlx.cli import main

    folder = sd8[0]
    code = main(["generate", "--model", str(folder), "--prompt", "x", "--steps", "2", "--height", "136",
                 "--width", "200", "--output", str(tmp_path / "wide.png")])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "wide.png").size == (200, 136)
    Image.fromarray(np.full((141, 203, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    code = main(["generate", "--model", str(folder), "--prompt", "x", "--steps", "2", "--init-image",
                 str(tmp_path / "photo.png"), "--strength", "0.5", "--output", str(tmp_path / "edit.png")])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "edit.png").size == (200, 136)
