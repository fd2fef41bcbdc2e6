"""Steering against diffusers (float32): per-block dicts on SD 1.5 and SDXL, start/end against a scale switched in
callback_on_step_end, the expansion itself against diffusers' _maybe_expand_lora_scales, and ComfyUI's
style-transfer against diffusers' InstantStyle dict on an SDXL UNet of the real layout (11 transformers)."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

from conftest import psnr, record, write_tokenizer
from ip_fixtures import SDXL_VARIANTS, VARIANTS, make_adapter_repo
from ipadapter_mlx import ImagePrompt, StableDiffusion, steering
from ipadapter_mlx.errors import UserError
from test_ip_adapter import H, STEPS, W, adapter_repo, diffusers_pipe, reference_image, run_both, start_noise  # noqa: F401
from test_sdxl import make_sdxl_pipeline

SD15_DICTS = [{"down": {"block_0": [0.0, 1.0]}, "up": {"block_1": [0.5, 0.0, 1.2]}, "mid": 0.3},
              {"up": 0.7}, {"down": {"block_0": [0.9]}, "mid": [0.4]}]


@pytest.mark.parametrize("scale", SD15_DICTS)
def test_sd15_block_dict_matches_diffusers(scale, diffusers_dir, mlx_dir, adapter_repo):
    got, ref, _ = run_both(diffusers_dir, mlx_dir, adapter_repo, ["plus"], [reference_image(1)], [scale])
    assert record(f"per-block scale SD 1.5 {scale}", psnr(got, ref), "dB") >= 40


def test_set_ip_adapter_scale_takes_the_dict(diffusers_dir, mlx_dir, adapter_repo):
    scale = SD15_DICTS[0]
    ref = diffusers_pipe(diffusers_dir, adapter_repo, ["base"], [scale])(
        "a cat", ip_adapter_image=[reference_image(1)], num_inference_steps=STEPS, guidance_scale=6.0, height=H,
        width=W, latents=start_noise(), output_type="np").images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["base"][0]))
    ours.set_ip_adapter_scale(scale)
    got = ours.generate("a cat", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler",
                        latents=start_noise().numpy(), image_prompts=[ImagePrompt(images=[reference_image(1)])],
                        return_array=True)
    assert record("set_ip_adapter_scale(dict) SD 1.5", psnr(np.array(got), ref), "dB") >= 40
    with pytest.raises(UserError, match=r"^Expected 3 scales for up\.block_1, got 2\.$"):
        ours.set_ip_adapter_scale({"up": {"block_1": [1.0, 0.0]}})
    assert ours.adapters[0].scale == scale  # a refused dict leaves the old scale


@pytest.mark.parametrize("start,end,steps", [(0.25, 0.75, 4), (0.0, 0.5, 5), (0.4, 1.0, 5)])
def test_start_end_matches_a_scale_switched_in_the_callback(start, end, steps, diffusers_dir, mlx_dir,
                                                            adapter_repo):
    scale = 0.9
    on = lambda i: scale * (1.0 - float(i / steps < start or (i + 1) / steps > end))  # noqa: E731
    pipe = diffusers_pipe(diffusers_dir, adapter_repo, ["plus"], [on(0)])

    def callback(p, i, t, kwargs):  # after step i: the scale of step i + 1
        p.set_ip_adapter_scale(on(i + 1))
        return kwargs

    ref = pipe("a cat", ip_adapter_image=[reference_image(1)], num_inference_steps=steps, guidance_scale=6.0,
               height=H, width=W, latents=start_noise(), output_type="np", callback_on_step_end=callback).images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]))
    got = ours.generate("a cat", steps=steps, cfg=6.0, height=H, width=W, scheduler="euler",
                        latents=start_noise().numpy(), return_array=True,
                        image_prompts=[ImagePrompt(images=[reference_image(1)], scale=scale, start_at=start,
                                                   end_at=end)])
    assert record(f"start/end {start}-{end} of {steps} steps", psnr(np.array(got), ref), "dB") >= 40


class _Unet:  # what _maybe_expand_lora_scales reads: blocks, config, and the names in its state dict
    def __init__(self, sites, layers_per_block):
        class Block:
            pass

        self.down_blocks, self.up_blocks = [Block() for _ in range(4)], [Block() for _ in range(4)]
        names = {s.block for s in sites}
        for part, blocks in (("down", self.down_blocks), ("up", self.up_blocks)):
            for i, b in enumerate(blocks):
                if any(n.startswith(f"{part}_blocks.{i}.") for n in names):
                    b.attentions = True
        self.config = type("C", (), {"layers_per_block": layers_per_block})
        self.names = [s.name + ".to_q.weight" for s in sites]

    def state_dict(self):
        return dict.fromkeys(self.names)


@pytest.mark.parametrize("scale", [*SD15_DICTS, {"down": 0.2, "up": {"block_3": [1, 2, 3]}, "mid": 5},
                                   {"up": {"block_2": 0.5}}, 0.6])
def test_expansion_is_diffusers(scale):
    from test_steering import SD15, SDXL

    for sites in (SD15, SDXL):
        ref = _maybe_expand_lora_scales(_Unet(sites, 2), [scale], default_scale=0.0)[0]
        try:
            got = steering.block_scales(scale, sites)
        except UserError as e:  # a block without transformers there: diffusers ignores it, we say so
            assert sites is SDXL and str(e).startswith("Can't set IP-Adapter scale for layer ")
            continue
        for s in sites:  # diffusers' set_ip_adapter_scale: the last key that prefixes the processor's name
            want = ref if not isinstance(ref, dict) else [v for k, v in ref.items() if s.name.startswith(k)][-1]
            assert got[s.block] == want


def test_expansion_errors_are_diffusers_wording():
    from test_steering import SDXL

    for scale in ({"down": {"block_2": [0.0, 1.0, 0.5]}}, {"up": {"block_0": [0.0, 1.0]}}, {"mid": [1.0, 2.0]}):
        with pytest.raises(ValueError) as theirs:
            _maybe_expand_lora_scales(_Unet(SDXL, 2), [scale], default_scale=0.0)
        with pytest.raises(UserError) as ours:
            steering.block_scales(scale, SDXL)
        assert str(ours.value) == str(theirs.value)


# -- SDXL of the real layout: 3 levels, 2 down and 2 up blocks with transformers, 11 in all ---------------

XL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=8, transformer_layers_per_block=(1, 1, 2),
               projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8)


@pytest.fixture(scope="module")
def xl11(tmp_path_factory):
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    pipe = make_sdxl_pipeline(XL_UNET, write_tokenizer(tmp_path_factory.mktemp("tok")))
    path = tmp_path_factory.mktemp("sdxl11")
    pipe.save_pretrained(path)
    variants = {"sdxl": SDXL_VARIANTS["sdxl"]}
    repo = make_adapter_repo(tmp_path_factory.mktemp("h94-xl11"), pipe.unet, variants=variants, folder="sdxl_models")
    return path, convert_diffusers_folder(path, tmp_path_factory.mktemp("mlx") / "xl11"), repo


def xl_pair(xl11, diffusers_scale, prompt: ImagePrompt, steps=3):
    path, mlx_folder, repo = xl11
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    ref.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=SDXL_VARIANTS["sdxl"][0],
                        image_encoder_folder="sdxl_models/image_encoder")
    ref.set_ip_adapter_scale(diffusers_scale)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = ref("a fox", ip_adapter_image=reference_image(1), num_inference_steps=steps, guidance_scale=6.0,
                   height=32, width=32, latents=latents, output_type="np").images
    ours = StableDiffusion(mlx_folder, mx.float32)
    ours.load_ip_adapter(str(repo / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]))
    assert len({s.index for s in ours.adapters[0].layers}) == 11
    got = ours.generate("a fox", steps=steps, cfg=6.0, height=32, width=32, scheduler="euler",
                        latents=latents.numpy(), image_prompts=[prompt], return_array=True)
    return np.array(got), expected


def test_sdxl_block_dict_matches_diffusers(xl11):
    scale = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}
    got, expected = xl_pair(xl11, scale, ImagePrompt(images=[reference_image(1)], scale=scale))
    assert record("per-block scale SDXL (InstantStyle style+layout)", psnr(got, expected), "dB") >= 40


def test_style_transfer_is_instantstyle_on_sdxl(xl11):
    """ComfyUI's style-transfer ({6: w}) equals diffusers' {"up": {"block_0": [0, w, 0]}} end to end."""
    w = 1.3
    got, expected = xl_pair(xl11, {"up": {"block_0": [0.0, w, 0.0]}},
                            ImagePrompt(images=[reference_image(1)], scale=w, weight_type="style-transfer"))
    assert record("style-transfer = diffusers InstantStyle dict (SDXL)", psnr(got, expected), "dB") >= 40
    plain, _ = xl_pair(xl11, w, ImagePrompt(images=[reference_image(1)], scale=w))
    assert psnr(got, plain) < 40  # the other layers really were off
