"""Several reference images blended (every combine mode, with weights) and the negative image, checked against
independent references: numpy formulas written from the documented semantics, and diffusers given the same
negative embeddings."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from conftest import psnr, record
from ip_fixtures import VARIANTS, make_adapter_repo
from ipadapter_mlx import StableDiffusion, UserError
from ipadapter_mlx.ip_adapter import COMBINE_MODES, Features, ImagePrompt, combine, image_tokens
from test_ip_adapter import H, STEPS, W, reference_image, start_noise

WEIGHTS = [1.0, 0.5, 2.0]


def expected_blend(x: np.ndarray, w: list[float], mode: str) -> np.ndarray:
    """The README's definitions, in float64: concat keeps each weighted image; average is the weighted mean;
    norm-average the weighted mean of unit directions, scaled to the weighted mean length; subtract the first
    (weighted) minus the weighted mean of the rest."""
    x = x.astype(np.float64)
    wb = np.array(w, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    if mode == "concat":
        return x * wb
    if mode == "average":
        return (x * wb).sum(0, keepdims=True) / sum(w)
    if mode == "norm-average":
        length = np.sqrt((x * x).sum(-1, keepdims=True))
        direction = (x / length * wb).sum(0, keepdims=True) / sum(w)
        return direction * (length * wb).sum(0, keepdims=True) / sum(w)
    if mode == "subtract":
        return x[:1] * w[0] - (x[1:] * wb[1:]).sum(0, keepdims=True) / sum(w[1:])
    # ComfyUI's IPAdapterCombineEmbeds (torch.sum / max / min over dim 0) of the weighted images
    if mode in ("add", "max", "min"):
        return {"add": np.sum, "max": np.max, "min": np.min}[mode](x * wb, axis=0, keepdims=True)
    raise AssertionError(mode)


@pytest.mark.parametrize("shape", [(3, 8), (3, 5, 8)], ids=["embeds", "hidden-states"])
@pytest.mark.parametrize("mode", COMBINE_MODES)
def test_combine_matches_its_formula(mode, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = np.array(combine(mx.array(x), WEIGHTS, mode))
    assert np.abs(got - expected_blend(x, WEIGHTS, mode)).max() < 1e-5


def test_blend_reaches_the_tokens(adapter_repo):
    """image_tokens projects the blend (cond) and keeps the null features (uncond), [uncond, cond] order."""
    from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter

    adapter = read_ip_adapter(adapter_repo / "models" / VARIANTS["base"][0])
    rng = np.random.default_rng(1)
    cond = rng.standard_normal((3, adapter.config.image_proj.input_dim)).astype(np.float32)
    uncond = rng.standard_normal((1, cond.shape[1])).astype(np.float32)
    feats = Features(mx.array(cond), mx.broadcast_to(mx.array(uncond), cond.shape), hidden_states=False)
    tokens = image_tokens(adapter, feats, ImagePrompt(weights=WEIGHTS, combine="average"), batch=1, guided=True)
    want_cond = adapter.image_proj(mx.array(expected_blend(cond, WEIGHTS, "average").astype(np.float32)))
    want_uncond = adapter.image_proj(mx.array(uncond))
    assert np.abs(np.array(tokens[1]) - np.array(want_cond[0])).max() < 1e-5
    assert np.abs(np.array(tokens[0]) - np.array(want_uncond[0])).max() < 1e-5


def test_zero_weight_sum_is_refused():
    with pytest.raises(UserError, match="add up to 0"):
        combine(mx.ones((2, 4)), [1.0, -1.0], "average")


@pytest.fixture(scope="module")
def adapter_repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_negative_image_matches_diffusers_negative_embeds(variant, diffusers_dir, mlx_dir, adapter_repo):
    """--negative-image: its features replace the null image's in the unconditional branch. diffusers takes the
    same thing as precomputed `ip_adapter_image_embeds` [negative, positive], encoded here by transformers."""
    file, folder, _ = VARIANTS[variant]
    encoder_dir = adapter_repo / folder / "image_encoder"
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(encoder_dir).eval()
    processor = transformers.CLIPImageProcessor()
    ref, negative = reference_image(1), reference_image(9, (240, 260))

    def embeds(image):
        with torch.no_grad():
            out = encoder(processor(images=[image], return_tensors="pt").pixel_values, output_hidden_states=True)
        return out.hidden_states[-2] if variant == "plus" else out.image_embeds  # (1, ...) for one image

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=file, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    both = torch.cat([embeds(negative), embeds(ref)])[:, None]  # (2, 1 image, ...): [negative, positive]
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W, output_type="np")
    expected = pipe("a cat", ip_adapter_image_embeds=[both], latents=start_noise(), **kw).images

    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(adapter_repo / "models" / file), image_encoder=str(encoder_dir), scale=0.8)
    run = dict(steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=start_noise().numpy(),
               return_array=True)
    got = np.array(ours.generate("a cat", image_prompts=[ImagePrompt(images=[ref], negative=negative)], **run))
    assert record(f"IP-Adapter {variant} with a negative image", psnr(got, expected), "dB") >= 40
    plain = np.array(ours.generate("a cat", image_prompts=[ImagePrompt(images=[ref])], **run))
    assert psnr(got, plain) < 40  # the negative image changed the picture: it was not ignored
