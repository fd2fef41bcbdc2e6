"""SDXL: parity with diffusers' StableDiffusionXLPipeline (and its IP-Adapters) on a tiny random model."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import re
from pathlib import Path

import diffusers
import mlx.core as mx

from ipadapter_mlx.conditioning import StepConditioning
import numpy as np
import pytest
import torch
import transformers

from conftest import TEXT_CONFIG, VAE_CONFIG, perturb, psnr, record, to_np, write_tokenizer
from ip_fixtures import SDXL_VARIANTS, make_adapter_repo
from ipadapter_mlx import ImagePrompt, StableDiffusion
from test_ip_adapter import reference_image
from test_pipeline import torch_noise

SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "interpolation_type": "linear", "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
                  "use_karras_sigmas": False}
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=8)
H, W, STEPS = 32, 48, 4


def make_sdxl_pipeline(unet: dict, tokenizer_dir: Path):
    """A tiny StableDiffusionXLPipeline with this UNet layout: two text encoders, perturbed random weights."""
    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return diffusers.StableDiffusionXLPipeline(
        vae=perturb(diffusers.AutoencoderKL(**VAE_CONFIG, scaling_factor=0.13025), 1),
        text_encoder=perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)), 2),
        text_encoder_2=perturb(transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**TEXT_CONFIG, projection_dim=32)), 3),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=perturb(diffusers.UNet2DConditionModel(**unet), 4),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    pipe = make_sdxl_pipeline(UNET, write_tokenizer(tmp_path_factory.mktemp("tok")))
    path = tmp_path_factory.mktemp("sdxl-tiny")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def xl(xl_dir, tmp_path_factory):
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dir)
    return ref, StableDiffusion(convert_diffusers_folder(xl_dir, tmp_path_factory.mktemp("mlx") / "xl"), mx.float32)


def test_unet_and_second_text_encoder(xl):
    ref, ours = xl
    assert ours.is_sdxl
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 64, generator=g)
    pooled, ids = torch.randn(2, 32, generator=g), torch.tensor([[64.0, 96, 0, 0, 64, 96], [32, 32, 4, 8, 64, 64]])
    with torch.no_grad():
        expected = ref.unet(x, torch.tensor([900.0, 20.0]), ctx,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    added = {"text_embeds": mx.array(pooled.numpy()), "time_ids": mx.array(ids.numpy())}
    got = ours.unet(mx.array(x.permute(0, 2, 3, 1).numpy()), mx.array([900.0, 20.0]),
                    StepConditioning(mx.array(ctx.numpy()), added))
    assert record("SDXL UNet", np.abs(to_np(got).transpose(0, 3, 1, 2) - to_np(expected)).max(), "abs") < 1e-4
    tokens = ref.tokenizer_2(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        r = ref.text_encoder_2(tokens, output_hidden_states=True)
    o = ours.text_model("text_encoder_2")(mx.array(tokens.numpy()))
    assert record("SDXL text encoder 2: pooled", np.abs(to_np(o.pooler_output) - to_np(r.text_embeds)).max(), "abs") < 1e-4
    assert np.abs(to_np(o.hidden_states[-2]) - to_np(r.hidden_states[-2])).max() < 1e-4


@pytest.mark.parametrize("scheduler,negative", [("euler", None), ("dpmpp-2m-karras", "blurry"), ("euler-a", None)])
def test_text_to_image(xl, scheduler, negative):
    from test_samplers import REFERENCE

    ref, ours = xl
    cls, extra = REFERENCE[scheduler]
    ref.scheduler = cls.from_config(SDXL_SCHEDULER, **extra)
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    expected = ref("a fox", negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=6.0, height=H,
                   width=W, latents=latents, generator=torch.Generator().manual_seed(2), output_type="np").images
    got = ours.generate("a fox", negative_prompt=negative, steps=STEPS, cfg=6.0, height=H, width=W,
                        scheduler=scheduler, latents=latents.numpy(), noise=torch_noise(torch.Generator().manual_seed(2)),
                        return_array=True)
    assert expected.std() > 0.05
    assert record(f"SDXL text-to-image, {scheduler}", psnr(np.array(got), expected), "dB") >= 40


def test_micro_conditioning(xl):
    ref, ours = xl
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    expected = ref("a fox", num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W, latents=latents,
                   original_size=(1024, 768), crops_coords_top_left=(16, 8), target_size=(512, 512),
                   output_type="np").images
    got = ours.generate("a fox", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=latents.numpy(),
                        original_size=(1024, 768), crop_coords=(16, 8), target_size=(512, 512), return_array=True)
    assert record("SDXL micro-conditioning", psnr(np.array(got), expected), "dB") >= 40


def test_image_to_image(xl):
    ref, ours = xl
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
    init = reference_image(3, (W, H))
    expected = i2i("a fox", image=init, strength=0.6, num_inference_steps=STEPS, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(5), output_type="np").images
    got = ours.generate("a fox", steps=STEPS, cfg=6.0, scheduler="euler", init_image=init, strength=0.6,
                        noise=torch_noise(torch.Generator().manual_seed(5)), return_array=True)
    assert record("SDXL image-to-image", psnr(np.array(got), expected), "dB") >= 40


@pytest.fixture(scope="module")
def xl_adapters(xl, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94-xl"), xl[0].unet, variants=SDXL_VARIANTS,
                             folder="sdxl_models")


@pytest.mark.parametrize("variant", list(SDXL_VARIANTS))
def test_ip_adapter_matches_diffusers(xl_dir, xl, xl_adapters, variant):
    file, encoder, _ = SDXL_VARIANTS[variant]
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dir)
    ref.load_ip_adapter(str(xl_adapters), subfolder="sdxl_models", weight_name=file,
                        image_encoder_folder=f"{encoder}/image_encoder")
    ref.set_ip_adapter_scale(0.7)
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    image = reference_image(1)
    expected = ref("a fox", ip_adapter_image=image, num_inference_steps=STEPS, guidance_scale=6.0, height=H,
                   width=W, latents=latents, output_type="np").images
    ours = StableDiffusion(xl[1].folder, mx.float32)
    ours.load_ip_adapter(str(xl_adapters / "sdxl_models" / file), scale=0.7)
    got = ours.generate("a fox", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=latents.numpy(),
                        image_prompts=[ImagePrompt(images=[image])], return_array=True)
    assert record(f"IP-Adapter SDXL {variant}", psnr(np.array(got), expected), "dB") >= 40
    # the encoder was chosen by the adapter's shapes: the vit-h ones take models/, not their own folder
    assert ours.adapters[0].encoder_folder is not None


def test_sd15_adapter_on_sdxl_names_both_sides(xl, torch_pipe, tmp_path):
    from ip_fixtures import VARIANTS
    from ipadapter_mlx.errors import UserError

    repo = make_adapter_repo(tmp_path / "h94", torch_pipe.unet)
    with pytest.raises(UserError, match=r"made for a UNet with 6 cross-attention layers of 32-d .* this UNet has "
                                        r"\d+ of 64-d"):
        StableDiffusion(xl[1].folder, mx.float32).load_ip_adapter(str(repo / "models" / VARIANTS["base"][0]))


@pytest.mark.parametrize("variant", list(SDXL_VARIANTS))
def test_cli_sdxl_with_adapter(xl, xl_adapters, variant, tmp_path, capsys):
    """Each SDXL adapter from the command line, with the encoder its shapes call for (and said so)."""
    import json

    from PIL import Image

    from ipadapter_mlx.cli import main

    file, encoder_folder, _ = SDXL_VARIANTS[variant]
    reference_image(1).save(tmp_path / "ref.png")
    code = main(["generate", "--model", str(xl[1].folder), "--prompt", "a fox", "--steps", "2", "--height", "32",
                 "--width", "32", "--original-size", "512", "512", "--crop-coords", "0", "8",
                 "--ip-adapter", str(xl_adapters / "sdxl_models" / file),
                 "--image", str(tmp_path / "ref.png"), "--output", str(tmp_path / "xl.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    said = re.search(r"image encoder for .*: (.+)", out)
    assert said and said.group(1).endswith(f"{encoder_folder}/image_encoder"), out
    meta = json.loads(Image.open(tmp_path / "xl.png").text["ipadapter_mlx"])
    assert meta["original_size"] == [512, 512] and meta["crop_coords"] == [0, 8]


def original_sdxl_checkpoint(folder: Path) -> dict:
    """The SDXL folder under original names: conditioner.embedders.0 (CLIP) and .1 (OpenCLIP layout)."""
    from safetensors.torch import load_file

    from ipadapter_mlx.checkpoints import keymaps
    from test_convert import original_checkpoint

    sd1_style = original_checkpoint(folder)  # UNet, VAE and the first text encoder, SD-style names
    ckpt = {}
    for k, v in sd1_style.items():
        if k.startswith(keymaps.TEXT_PREFIX):
            k = keymaps.SDXL_TEXT_PREFIX + k[len(keymaps.TEXT_PREFIX):]
        ckpt[k] = v
    top = {v: k for k, v in keymaps.OPENCLIP_TOP.items()}
    layer = [(v, k) for k, v in keymaps.OPENCLIP_LAYER.items()]
    w = {keymaps.clip_text_key(k): v for k, v in load_file(folder / "text_encoder_2" / "model.safetensors").items()}
    p = keymaps.SDXL_TEXT2_PREFIX
    for k, v in w.items():
        if k in top:
            ckpt[p + top[k]] = v.T.contiguous() if k == "text_projection.weight" else v
        elif ".self_attn.q_proj." in k:
            i, kind = k.split(".")[3], k.rpartition(".")[2]
            qkv = [w[k.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")]
            ckpt[f"{p}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        elif k.startswith("text_model.encoder.layers."):
            i, rest = k.split(".")[3], k.split(".", 4)[4]
            ckpt[f"{p}transformer.resblocks.{i}.{keymaps.renamer(layer)(rest)}"] = v
    ckpt[p + "logit_scale"] = torch.tensor(4.6)
    return ckpt


def test_single_file_sdxl_equals_diffusers_folder(xl, xl_dir, tmp_path):
    import json

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file, save_file

    from ipadapter_mlx.checkpoints.stable_diffusion import convert_single_file, infer_unet_config
    from test_convert import assert_same_weights

    ckpt = original_sdxl_checkpoint(xl_dir)
    # independent check of the OpenCLIP names and layout: diffusers' own converter maps them back
    te2 = transformers.CLIPTextModelWithProjection.from_pretrained(xl_dir / "text_encoder_2")
    back = convert_open_clip_checkpoint(te2, ckpt, prefix="conditioner.embedders.1.model.")
    ours = {k: v for k, v in te2.state_dict().items() if "position_ids" not in k}
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_ref = load_file(xl_dir / "unet" / "diffusion_pytorch_model.safetensors")
    unet_back = convert_ldm_unet_checkpoint(ckpt, json.loads((xl_dir / "unet" / "config.json").read_text()))
    assert set(unet_back) == set(unet_ref) and all(torch.equal(unet_back[k], unet_ref[k]) for k in unet_ref)

    save_file({k: v.contiguous() for k, v in ckpt.items()}, tmp_path / "xl.safetensors")
    out = convert_single_file(tmp_path / "xl.safetensors", tmp_path / "mlx", config_dir=xl_dir)
    assert_same_weights(out, xl[1].folder, components=("text_encoder", "text_encoder_2", "unet", "vae"))
    unet_w = {k[len("model.diffusion_model."):]: mx.array(v.numpy()) for k, v in ckpt.items()
              if k.startswith("model.diffusion_model.")}
    inferred = infer_unet_config(unet_w, pooled_dim=32)
    real = json.loads((xl_dir / "unet" / "config.json").read_text())
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "block_out_channels", "down_block_types", "cross_attention_dim", "use_linear_projection"):
        assert list(np.atleast_1d(inferred[key])) == list(np.atleast_1d(real[key])), key
    assert list(inferred["transformer_layers_per_block"]) == [1, 2]


def test_sdxl_adapter_on_sd15_names_both_sides(xl_adapters, mlx_dir):
    from ipadapter_mlx.errors import UserError

    with pytest.raises(UserError, match=r"made for a UNet with \d+ cross-attention layers of 64-d .* this UNet has "
                                        r"6 of 32-d"):
        StableDiffusion(mlx_dir, mx.float32).load_ip_adapter(
            str(xl_adapters / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]))
