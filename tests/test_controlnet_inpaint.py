"""ControlNet with inpainting: parity with diffusers' StableDiffusionControlNetInpaintPipeline (tiny random models:
the 4-channel UNet with an IP-Adapter, the 9-channel inpainting UNet), the control image made as diffusers' docs
make it for control_v11p_sd15_inpaint, and the CLI."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import copy

import diffusers
import mlx.core as mx
import numpy as np
import torch
from PIL import Image

from conftest import psnr, record
from ip_fixtures import VARIANTS
from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.controlnet import Control, preprocess
from test_controlnet import sd_nets  # noqa: F401  (fixture: ControlNets built from the 4-channel UNet's layout)
from test_inpainting import H, PROMPT, NEGATIVE, W, adapter_repo, init_image, make_mask, models  # noqa: F401
from test_ip_adapter import reference_image
from test_pipeline import torch_noise

STEPS = 4


def make_inpaint_condition(image: Image.Image, image_mask: Image.Image) -> torch.Tensor:
    """diffusers' docs for control_v11p_sd15_inpaint, verbatim: RGB in [0, 1], masked pixels -1. The pipeline's
    control_image_processor (VaeImageProcessor, do_normalize=False) passes such a tensor through unclipped and
    unnormalised (a tensor of the output size: its nearest resize is the identity), so the net sees the -1s."""
    image = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    image_mask = np.array(image_mask.convert("L")).astype(np.float32) / 255.0
    image[image_mask > 0.5] = -1.0  # set as masked pixel
    image = np.expand_dims(image, 0).transpose(0, 3, 1, 2)
    return torch.from_numpy(image)


def reference(components: dict, net: str, sd_nets, adapter_repo=None):
    """StableDiffusionControlNetInpaintPipeline on the session's parts, euler, optionally with IP-Adapter plus."""
    kind = diffusers.StableDiffusionControlNetInpaintPipeline
    parts = {**components, "unet": copy.deepcopy(components["unet"]),  # load_ip_adapter changes the UNet in place
             "controlnet": diffusers.ControlNetModel.from_pretrained(sd_nets / net),
             "scheduler": diffusers.EulerDiscreteScheduler.from_config(components["scheduler"].config)}
    pipe = kind(**{k: v for k, v in parts.items() if k in kind._get_signature_keys(kind)[0]})
    if adapter_repo is not None:
        pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=VARIANTS["plus"][0],
                             image_encoder_folder="models/image_encoder")
        pipe.set_ip_adapter_scale(0.7)
    return pipe


@pytest.mark.parametrize("channels,strength,adapter", [(4, 1.0, True), (9, 0.7, False)])
def test_matches_diffusers(models, sd_nets, adapter_repo, channels, strength, adapter):  # noqa: F811
    """Noise drawn in diffusers' order (image latents, start noise, masked image, as test_inpainting.py); the
    ControlNet reads the 4-channel latents, after the 4-channel blend and before the 9-channel concatenation."""
    components, pipe = models[channels]
    mask, image = make_mask(), init_image()
    ip = dict(ip_adapter_image=reference_image(1)) if adapter else {}
    ref = reference(components, "net0", sd_nets, adapter_repo if adapter else None)(
        PROMPT, image=image, mask_image=mask, control_image=make_inpaint_condition(image, mask),
        negative_prompt=NEGATIVE, controlnet_conditioning_scale=0.8, height=H, width=W, strength=strength,
        num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="np",
        **ip).images
    ours = StableDiffusion(pipe.folder, dtype=mx.float32)
    ours.load_controlnet(str(sd_nets / "net0"))
    if adapter:
        ours.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]), scale=0.7)
    control = preprocess(image, "inpaint", (W, H), mask=mask)
    assert np.array_equal(control, make_inpaint_condition(image, mask)[0].permute(1, 2, 0).numpy())
    seen = reference(components, "net0", sd_nets).control_image_processor.preprocess(  # what the net is given
        make_inpaint_condition(image, mask), height=H, width=W)
    assert seen.min() == -1 and np.array_equal(seen[0].permute(1, 2, 0).numpy(), control)
    kw = dict(negative_prompt=NEGATIVE, init_image=image, mask_image=mask, height=H, width=W, strength=strength,
              steps=STEPS, cfg=6.0, scheduler="euler", return_array=True,
              image_prompts=[ImagePrompt(images=[reference_image(1)])] if adapter else None)
    got = np.array(ours.generate(PROMPT, controls=[Control(control, scale=0.8)],
                                 noise=torch_noise(torch.Generator().manual_seed(3)), **kw))
    assert ref.std() > 0.05
    name = f"ControlNet inpaint, {channels}-channel UNet, strength {strength}{' + IP-Adapter plus' * adapter}"
    assert record(name, psnr(got, ref), "dB") >= 40
    plain = np.array(ours.generate(PROMPT, noise=torch_noise(torch.Generator().manual_seed(3)), **kw))
    assert psnr(got, plain) < 40  # the ControlNet really acts


def test_cli_equals_the_api(models, sd_nets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """generate --init-image --mask-image --controlnet inpaint --control-image X --control-preprocess inpaint
    --control-mask M: the inpaint preset (here a Hub cache holding net0, offline) gives the API's picture."""
    from huggingface_hub import constants

    from ipadapter_mlx.cli import main
    from ipadapter_mlx.images import open_image
    from test_cli import hub_cache

    hub_cache(tmp_path / "hf", "lllyasviel/control_v11p_sd15_inpaint", sd_nets / "net0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    init_image().save(tmp_path / "photo.png")
    make_mask().save(tmp_path / "mask.png")
    folder = models[9][1].folder
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--steps", "2", "--scheduler", "euler",
                 "--seed", "3", "--init-image", str(tmp_path / "photo.png"), "--mask-image", str(tmp_path / "mask.png"),
                 "--controlnet", "inpaint", "--control-image", str(tmp_path / "photo.png"), "--control-preprocess",
                 "inpaint", "--control-mask", str(tmp_path / "mask.png"), "--control-scale", "0.8",
                 "--output", str(tmp_path / "out.png")])
    assert code == 0, capsys.readouterr().err
    ours = StableDiffusion(folder, dtype=mx.float32)
    ours.load_controlnet(str(sd_nets / "net0"))
    control = preprocess(open_image(tmp_path / "photo.png"), "inpaint", (W, H), mask=open_image(tmp_path / "mask.png"))
    want = ours.generate(PROMPT, init_image=open_image(tmp_path / "photo.png"), mask_image=make_mask(), steps=2,
                         scheduler="euler", seed=3, strength=1.0, controls=[Control(control, scale=0.8)])[0]
    got = Image.open(tmp_path / "out.png")
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    plain = ours.generate(PROMPT, init_image=open_image(tmp_path / "photo.png"), mask_image=make_mask(), steps=2,
                          scheduler="euler", seed=3, strength=1.0)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))  # the control was used


def test_net_of_an_inpainting_unet_refused_by_an_ordinary_one(models, tmp_path):  # noqa: F811
    """A net copied from a 9-channel UNet reads 9 channels: an ordinary (4-channel) model cannot feed it."""
    from ipadapter_mlx.errors import UserError
    from test_controlnet import make_controlnet

    make_controlnet(models[9][0]["unet"], 30).save_pretrained(tmp_path / "net9")
    with pytest.raises(UserError, match=r"does not fit this UNet: .* with 9 input channels, the UNet's .* with 4$"):
        StableDiffusion(models[4][1].folder, dtype=mx.float32).load_controlnet(str(tmp_path / "net9"))
