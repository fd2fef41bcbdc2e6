"""Whole-pipeline parity with diffusers' StableDiffusionPipeline / Img2ImgPipeline: same weights, same noise."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import psnr, record
from test_samplers import REFERENCE

PROMPT, NEGATIVE = "a watercolor fox", "blurry"
H, W, STEPS = 32, 48, 6


def torch_noise(generator: torch.Generator):
    """Our noise hook, fed from the same torch generator diffusers draws from, in diffusers' order."""

    def draw(shape):
        b, h, w, c = shape
        return mx.array(torch.randn((b, c, h, w), generator=generator).permute(0, 2, 3, 1).numpy())

    return draw


def with_scheduler(pipe, name, img2img=False):
    cls, extra = REFERENCE[name]
    parts = dict(pipe.components)
    parts["scheduler"] = cls.from_config(pipe.scheduler.config, **extra)
    kind = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    return kind(**parts)


@pytest.mark.parametrize("scheduler", list(REFERENCE))
def test_text_to_image(torch_pipe, mlx_pipe, scheduler):
    latents = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    ref = with_scheduler(torch_pipe, scheduler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=H, width=W,
        num_images_per_prompt=2, latents=latents, generator=torch.Generator().manual_seed(11), output_type="np",
    ).images
    ours = mlx_pipe.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg=7.5, height=H, width=W, num_images=2,
        scheduler=scheduler, latents=latents.numpy(), noise=torch_noise(torch.Generator().manual_seed(11)),
        return_array=True,
    )
    assert ref.std() > 0.05  # a picture, not a flat field
    assert record(f"SD text-to-image, {scheduler}", psnr(np.array(ours), ref), "dB") >= 40


@pytest.mark.parametrize("scheduler", list(REFERENCE))
def test_image_to_image(torch_pipe, mlx_pipe, scheduler):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    ref = with_scheduler(torch_pipe, scheduler, img2img=True)(
        PROMPT, image=init, strength=0.6, num_inference_steps=STEPS, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images
    ours = mlx_pipe.generate(
        PROMPT, steps=STEPS, cfg=5.0, scheduler=scheduler, init_image=init, strength=0.6,
        noise=torch_noise(torch.Generator().manual_seed(5)), return_array=True,
    )
    assert ours.shape == (1, H, W, 3)
    assert record(f"SD image-to-image, {scheduler}", psnr(np.array(ours), ref), "dB") >= 40


def test_no_guidance_and_steps_generator(torch_pipe, mlx_pipe):
    """cfg <= 1 runs the UNet once per step, like diffusers; the step generator yields every step."""
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(4))
    ref = with_scheduler(torch_pipe, "euler")(
        PROMPT, num_inference_steps=4, guidance_scale=1.0, height=H, width=W, latents=latents, output_type="np",
    ).images
    steps = list(mlx_pipe.generate_latents(PROMPT, steps=4, cfg=1.0, height=H, width=W, scheduler="euler",
                                           latents=latents.numpy()))
    assert [s.index for s in steps] == [0, 1, 2, 3] and steps[-1].total == 4
    assert psnr(np.array(mlx_pipe.decode(steps[-1].latents)), ref) >= 40
