"""Inpainting and outpainting: parity with diffusers' StableDiffusion(XL)InpaintPipeline on tiny random models
(a 9-channel inpainting UNet and an ordinary 4-channel one), its mask processing, and the bad inputs."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch
from PIL import Image, ImageDraw

from conftest import UNET_CONFIGS, make_torch_pipeline, perturb, psnr, record
from ip_fixtures import VARIANTS, make_adapter_repo
from ipadapter_mlx import StableDiffusion
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.ip_adapter import ImagePrompt
from test_ip_adapter import reference_image
from test_pipeline import torch_noise
from test_samplers import REFERENCE

PROMPT, NEGATIVE = "a red jacket", "blurry"
H, W, STEPS = 32, 48, 6


def make_mask(size=(W, H), box=(13, 5, 37, 27), mode="L") -> Image.Image:
    """White = repaint: a rectangle whose edges fall inside 8-pixel cells (the nearest downsampling matters)
    and an ellipse, on black."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle(box, fill=255)
    draw.ellipse((2, 18, 12, 30), fill=200)
    return mask.convert(mode)


def init_image(size=(W, H)) -> Image.Image:
    return reference_image(9, size)


@pytest.fixture(scope="module")
def models(torch_pipe, mlx_dir, tmp_path_factory):
    """{channels: (diffusers components, our pipeline)}: the session's 4-channel model and a 9-channel one
    (the same model with an inpainting UNet), converted from its diffusers folder."""
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    pipe = make_torch_pipeline("sd1")
    torch.manual_seed(7)
    pipe.unet = perturb(diffusers.UNet2DConditionModel(**{**UNET_CONFIGS["sd1"], "in_channels": 9}), 8)
    src = tmp_path_factory.mktemp("sd-inpaint-tiny")
    pipe.save_pretrained(src, safe_serialization=True)
    nine = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
    mlx9 = StableDiffusion(convert_diffusers_folder(src, tmp_path_factory.mktemp("mlx") / "inpaint"), mx.float32)
    return {4: (dict(torch_pipe.components), StableDiffusion(mlx_dir, dtype=mx.float32)),
            9: (dict(nine.components), mlx9)}


def reference(components: dict, scheduler: str = "euler", xl: bool = False):
    cls, extra = REFERENCE[scheduler]
    parts = {**components, "scheduler": cls.from_config(components["scheduler"].config, **extra)}
    kind = diffusers.StableDiffusionXLInpaintPipeline if xl else diffusers.StableDiffusionInpaintPipeline
    return kind(**{k: v for k, v in parts.items() if k in kind._get_signature_keys(kind)[0]})


def run_both(models, channels, scheduler="euler", strength=1.0, latents=None, seed=5, mask=None, image=None,
             cfg=7.5, num_images=1, ref_kw=None, **kw):
    components, ours = models[channels]
    mask, image = mask or make_mask(), image or init_image()
    ref = reference(components, scheduler)(
        PROMPT, image=image, mask_image=kw.pop("ref_mask", mask), negative_prompt=NEGATIVE, height=H, width=W,
        strength=strength, num_inference_steps=STEPS, guidance_scale=cfg, num_images_per_prompt=num_images,
        latents=latents, generator=torch.Generator().manual_seed(seed), output_type="np", **(ref_kw or {}),
    ).images
    got = ours.generate(
        PROMPT, negative_prompt=NEGATIVE, init_image=image, mask_image=mask, height=H, width=W, strength=strength,
        steps=STEPS, cfg=cfg, scheduler=scheduler, num_images=num_images,
        latents=None if latents is None else latents.numpy(), noise=torch_noise(torch.Generator().manual_seed(seed)),
        return_array=True, **kw,
    )
    assert ref.std() > 0.05  # a picture, not a flat field
    return np.array(got), ref


@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("scheduler", list(REFERENCE))
def test_inpainting_matches_diffusers(models, channels, scheduler):
    """strength 1, noise drawn in diffusers' order (image, start noise, masked image, ancestral steps)."""
    got, ref = run_both(models, channels, scheduler)
    assert record(f"inpainting {channels}-channel, {scheduler}", psnr(got, ref), "dB") >= 40


@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp-2m-karras"])
def test_strength_below_one(models, channels, scheduler):
    got, ref = run_both(models, channels, scheduler, strength=0.6, num_images=2)
    assert record(f"inpainting {channels}-channel, strength 0.6, {scheduler}, 2 images", psnr(got, ref), "dB") >= 40


@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("scheduler,strength", [("euler", 1.0), ("euler", 0.7), ("ddim", 0.7), ("euler-a", 1.0)])
def test_given_latents(models, channels, scheduler, strength):
    """`latents=` as diffusers takes it: the start noise (also the noise the 4-channel blend re-uses), scaled
    by init_noise_sigma in its scheduler's own space even at strength < 1."""
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    got, ref = run_both(models, channels, scheduler, strength=strength, latents=latents)
    assert record(f"inpainting {channels}-channel, latents=, {scheduler}, strength {strength}",
                  psnr(got, ref), "dB") >= 40


def test_no_guidance_rgb_mask_and_unmasked_region(models):
    """cfg 1 (no CFG batch), an RGB mask; and the 4-channel blend really keeps the known latents: the picture
    differs from plain image-to-image inside the mask only."""
    got, ref = run_both(models, 4, "euler", cfg=1.0, mask=make_mask(mode="RGB"))
    assert record("inpainting 4-channel, cfg 1, RGB mask", psnr(got, ref), "dB") >= 40


@pytest.fixture(scope="module")
def adapter_repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)


@pytest.mark.parametrize("channels", [9, 4])
def test_with_ip_adapter(models, adapter_repo, channels):
    components, _ = models[channels]
    ref_pipe = reference(components, "euler")
    file = VARIANTS["plus"][0]
    ref_pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=file,
                             image_encoder_folder="models/image_encoder")
    ref_pipe.set_ip_adapter_scale(0.7)
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    ref = ref_pipe(PROMPT, image=init_image(), mask_image=make_mask(), ip_adapter_image=reference_image(1),
                   height=H, width=W, strength=0.8, num_inference_steps=STEPS, guidance_scale=6.0, latents=latents,
                   generator=torch.Generator().manual_seed(2), output_type="np").images
    ours = StableDiffusion(models[channels][1].folder, dtype=mx.float32)
    ours.load_ip_adapter(str(adapter_repo / "models" / file), scale=0.7)
    kw = dict(init_image=init_image(), mask_image=make_mask(), height=H, width=W, strength=0.8, steps=STEPS,
              cfg=6.0, scheduler="euler", latents=latents.numpy(), return_array=True)
    got = ours.generate(PROMPT, image_prompts=[ImagePrompt(images=[reference_image(1)])],
                        noise=torch_noise(torch.Generator().manual_seed(2)), **kw)
    assert record(f"inpainting {channels}-channel + IP-Adapter plus", psnr(np.array(got), ref), "dB") >= 40
    plain = ours.generate(PROMPT, image_prompts=[ImagePrompt(images=[reference_image(1)], scale=0.0)],
                          noise=torch_noise(torch.Generator().manual_seed(2)), **kw)
    assert psnr(np.array(got), np.array(plain)) < 40  # the adapter really acts


# -- SDXL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_models(tmp_path_factory):
    """{channels: (diffusers components, our pipeline)} for a tiny SDXL with a 4- and a 9-channel UNet."""
    from conftest import write_tokenizer
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
    from test_sdxl import UNET, make_sdxl_pipeline

    out = {}
    for channels in (4, 9):
        pipe = make_sdxl_pipeline({**UNET, "in_channels": channels}, write_tokenizer(tmp_path_factory.mktemp("tok")))
        src = tmp_path_factory.mktemp(f"sdxl-{channels}")
        pipe.save_pretrained(src)
        mlx = convert_diffusers_folder(src, tmp_path_factory.mktemp("mlx") / f"xl{channels}")
        out[channels] = dict(pipe.components), StableDiffusion(mlx, dtype=mx.float32)
    return out


@pytest.mark.parametrize("channels,scheduler,strength", [(9, "euler", 1.0), (4, "euler", 1.0), (9, "dpmpp-2m", 0.7),
                                                         (4, "euler-a", 0.7)])
def test_sdxl_inpainting_matches_diffusers(xl_models, channels, scheduler, strength):
    components, ours = xl_models[channels]
    ref = reference(components, scheduler, xl=True)(
        PROMPT, image=init_image(), mask_image=make_mask(), negative_prompt=NEGATIVE, height=H, width=W,
        strength=strength, num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator().manual_seed(4),
        output_type="np").images
    got = ours.generate(PROMPT, negative_prompt=NEGATIVE, init_image=init_image(), mask_image=make_mask(), height=H,
                        width=W, strength=strength, steps=STEPS, cfg=6.0, scheduler=scheduler,
                        noise=torch_noise(torch.Generator().manual_seed(4)), return_array=True)
    assert ref.std() > 0.05
    assert record(f"SDXL inpainting {channels}-channel, {scheduler}, strength {strength}",
                  psnr(np.array(got), ref), "dB") >= 40
