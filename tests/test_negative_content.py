"""InstantStyle's content subtraction (its ip_adapter.py: `clip_image_embeds - neg_content_scale * pooled`, the
pooled embedding from text_encoder_2 with its projection; the null image's tokens stay those of zero embeds):
the image tokens against the formula computed with transformers' CLIPTextModelWithProjection and
CLIPVisionModelWithProjection, a generation against diffusers given those embeds, and one line per bad input."""

from unittest import mock

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch

import ip_fixtures
from conftest import psnr, record, write_tokenizer
from ip_fixtures import SDXL_VARIANTS, make_adapter_repo
from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.errors import UserError
from test_ip_adapter import reference_image
from test_sdxl import UNET, make_sdxl_pipeline

S, TEXT = 0.7, "a red fox in the snow"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny SDXL pipeline (text projection 32-d) and an ip-adapter_sdxl whose ViT-bigG stand-in projects to 32
    too, as the real pair (1280 and 1280)."""
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    pipe = make_sdxl_pipeline(UNET, write_tokenizer(tmp_path_factory.mktemp("tok")))
    path = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(path)
    wide = ip_fixtures.ENCODERS["sdxl_models"] | {"projection_dim": 32}
    with mock.patch.dict(ip_fixtures.ENCODERS, {"sdxl_models": wide}):
        repo = make_adapter_repo(tmp_path_factory.mktemp("h94"), pipe.unet, variants=SDXL_VARIANTS,
                                 folder="sdxl_models")
    ours = StableDiffusion(convert_diffusers_folder(path, tmp_path_factory.mktemp("mlx") / "xl"), mx.float32)
    return path, ours, repo


def reference(path, repo):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    ref.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=SDXL_VARIANTS["sdxl"][0],
                        image_encoder_folder="sdxl_models/image_encoder")
    ids = ref.tokenizer_2(TEXT, padding="max_length", max_length=ref.tokenizer_2.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = ref.text_encoder_2(ids).text_embeds  # CLIPTextModelWithProjection
        pixels = ref.feature_extractor(images=reference_image(1), return_tensors="pt").pixel_values
        embeds = ref.image_encoder(pixels).image_embeds  # CLIPVisionModelWithProjection
    return ref, embeds - S * pooled


def test_tokens_are_the_formula(setup):
    path, ours, repo = setup
    ref, embeds = reference(path, repo)
    with torch.no_grad():
        want = ref.unet.encoder_hid_proj.image_projection_layers[0](torch.cat([torch.zeros_like(embeds), embeds]))
    ours.load_ip_adapter(str(repo / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]))
    try:
        prompt = ImagePrompt(images=[reference_image(1)], negative_content=TEXT, negative_content_scale=S)
        content = lambda t: ours.encode_prompt([t])[1]  # noqa: E731
        got = np.array(ours.adapters.conditions([prompt], 1, True, pooled_text=content)[0].tokens)
        err = np.abs(got - want.numpy()).max()
        assert record("negative content: image tokens (SDXL)", err, "abs") < 1e-4
        plain = np.array(ours.adapters.conditions([ImagePrompt(images=[reference_image(1)])], 1, True)[0].tokens)
        assert np.abs(plain[1] - got[1]).max() > 100 * err  # the subtraction really acts
        assert np.abs(plain[0] - got[0]).max() == 0  # the null image's tokens stay
    finally:
        ours.unload_ip_adapter()


def test_generation_matches_diffusers_given_the_embeds(setup):
    path, ours, repo = setup
    ref, embeds = reference(path, repo)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = ref("a fox", ip_adapter_image_embeds=[torch.stack([torch.zeros_like(embeds), embeds])],
                   num_inference_steps=3, guidance_scale=6.0, height=32, width=32, latents=latents,
                   output_type="np").images
    ours.load_ip_adapter(str(repo / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]))
    try:
        prompt = ImagePrompt(images=[reference_image(1)], negative_content=TEXT, negative_content_scale=S)
        got = ours.generate("a fox", steps=3, cfg=6.0, height=32, width=32, scheduler="euler",
                            latents=latents.numpy(), image_prompts=[prompt], return_array=True)
        assert record("negative content prompt (SDXL) vs diffusers", psnr(np.array(got), expected), "dB") >= 40
    finally:
        ours.unload_ip_adapter()


@pytest.mark.parametrize("variant,message", [
    ("sdxl-vit-h", "negative content: the text projection is 32-d, adapter {ref}'s image embeds are 24-d; they "
                   "must match"),
    ("plus-sdxl-vit-h", "a negative content prompt needs an adapter reading image embeds (InstantStyle's "
                        "subtraction); {ref} reads hidden states"),
])
def test_mismatches_one_line(setup, variant, message):
    _, ours, repo = setup
    ref = str(repo / "sdxl_models" / SDXL_VARIANTS[variant][0])
    ours.load_ip_adapter(ref)
    try:
        with pytest.raises(UserError) as e:
            ours.generate("a fox", steps=1, height=32, width=32, image_prompts=[
                ImagePrompt(images=[reference_image(1)], negative_content=TEXT)])
        assert str(e.value).startswith(message.format(ref=ref)) and "\n" not in str(e.value)
    finally:
        ours.unload_ip_adapter()
