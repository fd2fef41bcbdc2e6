"""IP-Adapter parity with diffusers' load_ip_adapter pipelines, every public variant, float32."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import psnr, record, to_np
from ip_fixtures import VARIANTS, make_adapter_repo
from ipadapter_mlx import StableDiffusion
from ipadapter_mlx.ip_adapter import ImagePrompt

H, W, STEPS = 32, 32, 4


@pytest.fixture(scope="module")
def adapter_repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)


def reference_image(seed, size=(300, 220)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)  # smooth, non-square: the crop matters


def diffusers_pipe(diffusers_dir, repo, variants, scales):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    files = [VARIANTS[v][0] for v in variants]
    pipe.load_ip_adapter(str(repo), subfolder="models", weight_name=files,
                         image_encoder_folder=f"{VARIANTS[variants[0]][1]}/image_encoder")
    pipe.set_ip_adapter_scale(scales)
    return pipe


def start_noise():
    return torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))


def run_both(diffusers_dir, mlx_dir, repo, variants, images, scales, prompt="a cat"):
    latents = start_noise()
    ref = diffusers_pipe(diffusers_dir, repo, variants, scales)(
        prompt, ip_adapter_image=images, num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W,
        latents=latents, output_type="np",
    ).images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    for v in variants:
        ours.load_ip_adapter(str(repo / "models" / VARIANTS[v][0]))
    prompts = [ImagePrompt(images=im if isinstance(im, list) else [im], scale=s) for im, s in zip(images, scales)]
    got = ours.generate(prompt, steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler",
                        latents=latents.numpy(), image_prompts=prompts, return_array=True)
    return np.array(got), ref, ours


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_diffusers(variant, diffusers_dir, mlx_dir, adapter_repo):
    got, ref, ours = run_both(diffusers_dir, mlx_dir, adapter_repo, [variant], [reference_image(1)], [0.8])
    assert record(f"IP-Adapter SD 1.5 {variant}", psnr(got, ref), "dB") >= 40
    # and the adapter really changes the picture (so the check above is not the base model twice)
    ours.unload_ip_adapter()
    plain = np.array(ours.generate("a cat", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler",
                                   latents=start_noise().numpy(), return_array=True))
    assert psnr(got, plain) < 40


def test_several_images_and_two_adapters(diffusers_dir, mlx_dir, adapter_repo):
    """plus with two references (tokens joined) + plus-face with one, each with its own scale."""
    images = [[reference_image(2), reference_image(3)], reference_image(4, (200, 260))]
    got, ref, _ = run_both(diffusers_dir, mlx_dir, adapter_repo, ["plus", "plus-face"], images, [0.6, 0.9])
    assert record("IP-Adapter plus (2 images) + plus-face", psnr(got, ref), "dB") >= 40


def test_scale_zero_is_the_base_model(diffusers_dir, mlx_dir, adapter_repo):
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    kw = dict(steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", return_array=True,
              latents=np.random.default_rng(0).standard_normal((1, 4, H // 2, W // 2)).astype(np.float32))
    base = ours.generate("a cat", **kw)
    ours.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]))
    zero = ours.generate("a cat", image_prompts=[ImagePrompt(images=[reference_image(1)], scale=0.0)], **kw)
    assert mx.array_equal(base, zero)


# -- per module ------------------------------------------------------------------------------------


def test_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    from ipadapter_mlx.images import clip_pixels

    images = [reference_image(5, (300, 220)), reference_image(6, (180, 333)), reference_image(7, (224, 224))]
    ref = CLIPImageProcessor()(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.abs(clip_pixels(images, 224) - ref).max() < 1e-5
    padded = clip_pixels([images[0]], 224, fit="pad")  # the whole picture is kept: mean-colour bands
    assert np.abs(padded[0, :20]).max() < 0.02 and np.abs(padded[0, 112]).max() > 0.1


def test_vision_tower_matches_transformers(adapter_repo):
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_mlx.cache import converted_encoder
    from ipadapter_mlx.loading import load_component

    for folder in ("models", "sdxl_models"):
        src = adapter_repo / folder / "image_encoder"
        ref_model = CLIPVisionModelWithProjection.from_pretrained(src).eval()
        ours = load_component(converted_encoder("local", src, None), "image_encoder", mx.float32)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = ref_model(x, output_hidden_states=True)
        px = mx.array(x.permute(0, 2, 3, 1).numpy())
        assert record(f"vision tower ({folder}): image_embeds", np.abs(to_np(ours.image_embeds(px)) - to_np(ref.image_embeds)).max(), "abs") < 1e-4
        assert record(f"vision tower ({folder}): hidden_states[-2]", np.abs(to_np(ours.penultimate(px)) - to_np(ref.hidden_states[-2])).max(), "abs") < 1e-4


@pytest.mark.parametrize("variant", ["base", "plus", "full-face", "vit-g"])
def test_projection_matches_diffusers(variant, diffusers_dir, adapter_repo):
    from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter

    pipe = diffusers_pipe(diffusers_dir, adapter_repo, [variant], [1.0])
    proj_ref = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    adapter = read_ip_adapter(adapter_repo / "models" / VARIANTS[variant][0])
    c = adapter.config.image_proj
    shape = (3, 257, c.input_dim) if c.reads_hidden_states else (3, c.input_dim)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = proj_ref(x)
    assert record(f"projection {variant}", np.abs(to_np(adapter.image_proj(mx.array(x.numpy()))) - to_np(ref)).max(), "abs") < 1e-4


def test_image_to_image_with_image_prompt(diffusers_dir, mlx_dir, adapter_repo):
    init = reference_image(9, (W, H))
    ref_pipe = diffusers_pipe(diffusers_dir, adapter_repo, ["plus"], [0.7])
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    ref = ref_pipe("a cat", image=init, strength=0.7, ip_adapter_image=reference_image(1),
                   num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator().manual_seed(2),
                   output_type="np").images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]), scale=0.7)
    g = torch.Generator().manual_seed(2)

    def noise(shape):
        b, h, w, c = shape
        return mx.array(torch.randn((b, c, h, w), generator=g).permute(0, 2, 3, 1).numpy())

    got = ours.generate("a cat", steps=STEPS, cfg=6.0, scheduler="euler", init_image=init, strength=0.7,
                        noise=noise, image_prompts=[ImagePrompt(images=[reference_image(1)])], return_array=True)
    assert record("IP-Adapter plus, image-to-image", psnr(np.array(got), ref), "dB") >= 40


def test_low_memory_mode_with_adapter(mlx_dir, adapter_repo):
    """Low-memory order (encoders first, then the UNet, adapters attached when it loads) gives the same picture."""
    kw = dict(steps=2, cfg=6.0, height=H, width=W, scheduler="euler", seed=4, return_array=True,
              image_prompts=[ImagePrompt(images=[reference_image(1)])])
    pictures = []
    for low in (False, True):
        pipe = StableDiffusion(mlx_dir, dtype=mx.float32, low_memory=low)
        pipe.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]), scale=0.8)
        pictures.append(pipe.generate("a cat", **kw))
    assert mx.array_equal(*pictures)


def test_memory_estimate_counts_the_image_encoder(mlx_dir, adapter_repo):
    """Once the encoder an adapter needs is known (the CLI finds it before it estimates), it is counted."""
    from mlx.utils import tree_flatten

    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]))
    before = pipe.estimate_memory(64, 64)
    pipe.image_encoder_folder(0)
    encoder = sum(v.nbytes for _, v in tree_flatten(pipe.image_encoder(0).parameters()))
    assert pipe.estimate_memory(64, 64) - before == encoder
