"""T2I-Adapter: per-module parity with diffusers' T2IAdapter, whole generations with an IP-Adapter against
StableDiffusionAdapterPipeline / StableDiffusionXLAdapterPipeline, float32, and one clean line per bad input."""

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
from ipadapter_mlx import ImagePrompt, StableDiffusion, T2IControl
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.loading import load_component
from ipadapter_mlx.t2i_adapter import resolve_t2i_adapter

STEPS = 4
# T2I-Adapters shaped for the tiny test models (VAE factor 2, so an SD 1.x adapter unshuffles by 2 and an SDXL one
# by 4): features where the UNets take them, as the real ones for SD 1.5 (x8) and SDXL (x16).
SD1_ADAPTER = dict(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=2, adapter_type="full_adapter")
SD1_GREY = dict(SD1_ADAPTER, in_channels=1, num_res_blocks=1)
XL_ADAPTER = dict(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=4,
                  adapter_type="full_adapter_xl")
# SDXL's layout in small: no attention in the first block, so its feature enters after the downsampling, and a
# fourth feature for the mid block.
XL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
               transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=80,
               cross_attention_dim=64, norm_num_groups=8)


def make_adapter(root: Path, config: dict, seed: int, safetensors: bool = True, gain: float = 2.0) -> Path:
    """A diffusers T2I-Adapter folder (config.json + weights), as save_pretrained writes it."""
    torch.manual_seed(seed)
    adapter = perturb(diffusers.T2IAdapter(**config), seed)
    with torch.no_grad():  # features as strong as the UNet's own (PyTorch's default init gives faint ones)
        for name, p in adapter.named_parameters():
            if name.endswith("weight"):
                p.mul_(gain)
    adapter.save_pretrained(root, safe_serialization=safetensors)
    return root


def control_image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth random shapes (an edge map or depth map stands in), not the picture's size: the resize matters."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 6 + 1, size[0] // 6 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR).convert(mode)


def reference_image(seed: int) -> Image.Image:
    from test_ip_adapter import reference_image as ref

    return ref(seed)


def same_weights(a, b) -> bool:
    from mlx.utils import tree_flatten

    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]) for k in pa)


def euler(pipe):
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


# -- the module ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,size", [
    (dict(in_channels=3, channels=[16, 24, 40, 40], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
     (72, 56)),  # odd feature sizes: 9x7 -> 5x4 -> 3x2 -> 2x1 through avg-pool's ceil mode
    (dict(in_channels=1, channels=[16, 24, 40, 40], num_res_blocks=2, downscale_factor=16,
          adapter_type="full_adapter_xl"), (80, 48)),
    (dict(in_channels=3, channels=[16, 24, 40], num_res_blocks=4, downscale_factor=8, adapter_type="light_adapter"),
     (88, 40)),
], ids=["full_adapter", "full_adapter_xl", "light_adapter"])
def test_adapter_matches_diffusers(config, size, tmp_path):
    """diffusers folder -> the converted cache -> our module: every feature map equal to diffusers'."""
    folder = make_adapter(tmp_path / "adapter", config, 3, gain=1.0)
    ref = diffusers.T2IAdapter.from_pretrained(folder).eval()
    ours = load_component(resolve_t2i_adapter(str(folder)), "t2i_adapter", mx.float32)
    x = torch.rand(2, config["in_channels"], size[1], size[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
    got = ours(mx.array(x.permute(0, 2, 3, 1).numpy()))
    assert len(got) == len(expected)
    assert [c for c, _ in ours.config.features()] == [e.shape[1] for e in expected]
    assert [s for _, s in ours.config.features()][-1] == ref.total_downscale_factor
    err = max(np.abs(to_np(g).transpose(0, 3, 1, 2) - to_np(e)).max() for g, e in zip(got, expected))
    assert record(f"T2I-Adapter {config['adapter_type']}", err, "abs") < 1e-5


def test_bin_folder_converts_to_the_same_weights(tmp_path):
    """An older repo's diffusion_pytorch_model.bin (read by the restricted unpickler) gives the same model."""
    a = load_component(resolve_t2i_adapter(str(make_adapter(tmp_path / "st", SD1_ADAPTER, 5))), "t2i_adapter")
    b = load_component(resolve_t2i_adapter(str(make_adapter(tmp_path / "bin", SD1_ADAPTER, 5, False))), "t2i_adapter")
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert same_weights(a, b)


# -- SD 1.5: StableDiffusionAdapterPipeline, with an IP-Adapter ------------------------------------------------


@pytest.fixture(scope="module")
def sd1_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-sd1")
    return make_adapter(root / "a", SD1_ADAPTER, 11, gain=3.0), make_adapter(root / "b", SD1_GREY, 12, gain=3.0)


@pytest.fixture(scope="module")
def ip_repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet, variants={"plus": VARIANTS["plus"]})


def sd1_reference(diffusers_dir, adapter, ip_repo=None, ip_image=None, factor=1.0, **kw):
    """diffusers' StableDiffusionAdapterPipeline. It has no IP-Adapter loader and no adapter_conditioning_factor
    (its XL sibling has both): the IP-Adapter's image embeds (computed by StableDiffusionPipeline) and the factor
    rule of StableDiffusionXLAdapterPipeline (residuals only while i < int(N * factor)) enter through its UNet call."""
    base = euler(diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None))
    if ip_repo is not None:
        base.load_ip_adapter(str(ip_repo), subfolder="models", weight_name=VARIANTS["plus"][0],
                             image_encoder_folder="models/image_encoder")
        base.set_ip_adapter_scale(0.6)
    pipe = diffusers.StableDiffusionAdapterPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, adapter=adapter,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    embeds = base.prepare_ip_adapter_image_embeds([ip_image], None, "cpu", 1, True) if ip_repo is not None else None
    forward, calls = pipe.unet.forward, []

    def unet_call(*args, **kwargs):
        if embeds is not None:
            kwargs["added_cond_kwargs"] = {"image_embeds": embeds}
        if len(calls) >= int(kw["num_inference_steps"] * factor):
            kwargs["down_intrablock_additional_residuals"] = None
        calls.append(1)
        return forward(*args, **kwargs)

    pipe.unet.forward = unet_call
    try:
        return pipe(output_type="np", **kw).images
    finally:
        pipe.unet.forward = forward


@pytest.mark.parametrize("scale,factor", [(0.7, 1.0), (0.8, 0.25)])
def test_sd15_with_ip_adapter_matches_diffusers(diffusers_dir, mlx_dir, sd1_adapters, ip_repo, scale, factor):
    H, W = 32, 48
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    control, ref_image = control_image(1, (70, 50)), reference_image(2)
    adapter = diffusers.T2IAdapter.from_pretrained(sd1_adapters[0])
    expected = sd1_reference(diffusers_dir, adapter, ip_repo, ref_image, factor, prompt="a cat", image=control,
                             num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W, latents=latents,
                             adapter_conditioning_scale=scale)
    ours = StableDiffusion(mlx_dir, mx.float32)
    ours.load_ip_adapter(str(ip_repo / "models" / VARIANTS["plus"][0]), scale=0.6)
    kw = dict(steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=latents.numpy(),
              image_prompts=[ImagePrompt(images=[ref_image])], return_array=True)
    index = ours.load_t2i_adapter(str(sd1_adapters[0]))
    got = np.array(ours.generate("a cat", t2i_adapters=[T2IControl(index, control, scale, factor)], **kw))
    assert expected.std() > 0.05
    assert record(f"T2I-Adapter SD 1.5 + IP-Adapter, scale {scale}, factor {factor}", psnr(got, expected), "dB") >= 40
    # the adapter really acts (the comparison above is not the IP-Adapter alone twice)
    without = np.array(ours.generate("a cat", **kw))
    assert psnr(got, without) < 40


def test_two_adapters_match_multiadapter(diffusers_dir, mlx_dir, sd1_adapters):
    """An RGB and a grey adapter at once: diffusers' MultiAdapter with adapter_weights = the two scales."""
    H, W = 32, 32
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    images = [control_image(4, (40, 40)), control_image(5, (32, 48), "L")]
    multi = diffusers.MultiAdapter([diffusers.T2IAdapter.from_pretrained(p) for p in sd1_adapters])
    expected = sd1_reference(diffusers_dir, multi, prompt="a dog", image=images, num_inference_steps=STEPS,
                             guidance_scale=5.0, height=H, width=W, latents=latents,
                             adapter_conditioning_scale=[0.6, 0.9])
    ours = StableDiffusion(mlx_dir, mx.float32)
    controls = [T2IControl(ours.load_t2i_adapter(str(p)), im, s) for p, im, s in zip(sd1_adapters, images, [0.6, 0.9])]
    got = np.array(ours.generate("a dog", steps=STEPS, cfg=5.0, height=H, width=W, scheduler="euler",
                                 latents=latents.numpy(), t2i_adapters=controls, return_array=True))
    assert record("T2I-Adapter SD 1.5, two adapters (MultiAdapter)", psnr(got, expected), "dB") >= 40


def test_several_images_per_prompt(diffusers_dir, mlx_dir, sd1_adapters):
    """num_images_per_prompt=2: the one control image's features serve every image (diffusers repeats them)."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    control = control_image(6, (32, 32), "L")
    expected = sd1_reference(diffusers_dir, diffusers.T2IAdapter.from_pretrained(sd1_adapters[1]), prompt="a boat",
                             image=control, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
                             num_images_per_prompt=2, adapter_conditioning_scale=0.9)
    ours = StableDiffusion(mlx_dir, mx.float32)
    got = np.array(ours.generate("a boat", steps=STEPS, cfg=5.0, scheduler="euler", num_images=2,
                                 latents=latents.numpy(), return_array=True,
                                 t2i_adapters=[T2IControl(ours.load_t2i_adapter(str(sd1_adapters[1])), control, 0.9)]))
    assert got.shape == expected.shape == (2, 32, 32, 3)
    assert record("T2I-Adapter SD 1.5, 2 images per prompt", psnr(got, expected), "dB") >= 40


# -- SDXL: StableDiffusionXLAdapterPipeline, with an IP-Adapter ------------------------------------------------


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
    from test_sdxl import make_sdxl_pipeline

    path = tmp_path_factory.mktemp("sdxl-t2i")
    make_sdxl_pipeline(XL_UNET, write_tokenizer(tmp_path_factory.mktemp("tok"))).save_pretrained(path)
    ours = convert_diffusers_folder(path, tmp_path_factory.mktemp("mlx") / "xl")
    ip = make_adapter_repo(tmp_path_factory.mktemp("h94-xl"), diffusers.UNet2DConditionModel.from_pretrained(
        path, subfolder="unet"), variants={"sdxl": SDXL_VARIANTS["sdxl"]}, folder="sdxl_models")
    return path, ours, ip, make_adapter(tmp_path_factory.mktemp("t2i-xl"), XL_ADAPTER, 21)


def test_sdxl_with_ip_adapter_matches_diffusers(xl):
    """Scale and factor < 1, a grey control image, and the size taken from it (none given), as diffusers does."""
    path, mlx_dir, ip, adapter_dir = xl
    from test_sdxl import SDXL_SCHEDULER

    base = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    pipe = diffusers.StableDiffusionXLAdapterPipeline(
        **{k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")},
        adapter=diffusers.T2IAdapter.from_pretrained(adapter_dir))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe.load_ip_adapter(str(ip), subfolder="sdxl_models", weight_name=SDXL_VARIANTS["sdxl"][0],
                         image_encoder_folder="sdxl_models/image_encoder")
    pipe.set_ip_adapter_scale(0.7)
    control, ref_image = control_image(7, (66, 35), "L"), reference_image(8)  # -> 64x32 (multiples of 4)
    latents = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(1))
    expected = pipe("a fox", image=control, ip_adapter_image=ref_image, num_inference_steps=STEPS, guidance_scale=6.0,
                    latents=latents, adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.25,
                    output_type="np").images
    ours = StableDiffusion(mlx_dir, mx.float32)
    ours.load_ip_adapter(str(ip / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]), scale=0.7)
    index = ours.load_t2i_adapter(str(adapter_dir))
    kw = dict(steps=STEPS, cfg=6.0, scheduler="euler", latents=latents.numpy(), return_array=True,
              image_prompts=[ImagePrompt(images=[ref_image])])
    got = np.array(ours.generate("a fox", t2i_adapters=[T2IControl(index, control, 0.8, 0.25)], **kw))
    assert got.shape[1:3] == expected.shape[1:3] == (32, 64)
    assert record("T2I-Adapter SDXL + IP-Adapter, scale 0.8, factor 0.25", psnr(got, expected), "dB") >= 40
    # the factor matters both ways: off (factor 0) is another picture, on in every step a slightly other one
    off, full = (np.array(ours.generate("a fox", t2i_adapters=[T2IControl(index, control, 0.8, f)], **kw))
                 for f in (0.0, 1.0))
    assert psnr(got, off) < 40 and psnr(got, full) < 60


def test_factor_rule_is_diffusers(mlx_dir, sd1_adapters):
    """At step i of N the features are added exactly when StableDiffusionXLAdapterPipeline adds them:
    `if i < int(num_inference_steps * adapter_conditioning_factor)`, for step counts and factors that round."""
    from ipadapter_mlx.denoiser import UNetInput

    pipe = StableDiffusion(mlx_dir, mx.float32)
    index = pipe.load_t2i_adapter(str(sd1_adapters[0]))
    x = mx.zeros((2, 16, 16, 4))
    for n in (1, 3, 4, 7, 25, 30):
        for factor in (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 1.0):
            (hook,) = pipe.t2i_adapters.hooks([T2IControl(index, control_image(1, (32, 32)), 1.0, factor)], 1, True,
                                              (32, 32), n)
            on = [hook(UNetInput(x, mx.zeros(2), None), i, 1.0).residuals is not None for i in range(n)]
            assert on == [i < int(n * factor) for i in range(n)], (n, factor)


# -- bad input ---------------------------------------------------------------------------------------------


def test_wrong_family_names_both_sides(xl, mlx_pipe, sd1_adapters):
    with pytest.raises(UserError, match=r"made for SD 1.x/2.x \(features 32ch at 1/2, 64ch at 1/4 .*this model is SDXL "
                                        r"\(its down blocks take 32ch at 1/4"):
        StableDiffusion(xl[1], mx.float32).load_t2i_adapter(str(sd1_adapters[0]))
    with pytest.raises(UserError, match=r"made for SDXL .* this model is SD 1.x/2.x"):
        mlx_pipe.load_t2i_adapter(str(xl[3]))
    assert len(mlx_pipe.t2i_adapters) == 0


def test_published_shapes_fit_their_family_only():
    """The published configs: SD 1.5's UNet takes the SD 1.x adapters (full and light), SDXL's the XL one."""
    from ipadapter_mlx.config import UNetConfig
    from ipadapter_mlx.models.t2i_adapter import T2IAdapterConfig
    from ipadapter_mlx.t2i_adapter import check_fits

    sd15 = UNetConfig.from_dict(dict(block_out_channels=[320, 640, 1280, 1280], up_block_types=[], down_block_types=[
        "CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    sdxl = UNetConfig.from_dict(dict(block_out_channels=[320, 640, 1280], up_block_types=[], down_block_types=[
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]))
    full = T2IAdapterConfig.from_dict({"_class_name": "T2IAdapter", "in_channels": 1})  # diffusers' defaults
    light = T2IAdapterConfig.from_dict(dict(channels=[320, 640, 1280], num_res_blocks=4, adapter_type="light_adapter"))
    xl = T2IAdapterConfig.from_dict(dict(downscale_factor=16, adapter_type="full_adapter_xl"))
    for adapter, fits, other in [(full, (sd15, False), (sdxl, True)), (light, (sd15, False), (sdxl, True)),
                                 (xl, (sdxl, True), (sd15, False))]:
        check_fits(adapter, "a", *fits[:1], 8, fits[1])
        with pytest.raises(UserError, match="does not fit this model"):
            check_fits(adapter, "a", other[0], 8, other[1])


def test_bad_references_and_requests(mlx_dir, diffusers_dir, sd1_adapters, tmp_path):
    pipe = StableDiffusion(mlx_dir, mx.float32)
    cases = [
        ("nowhere/at-all:x/y", r"nowhere/at-all: not in the local Hub cache"),  # offline in the tests
        ("not a ref?", r"T2I-Adapter not found: not a ref\? is not a folder, a file, a Hub repo id, REPO:FOLDER, "
                       r"REPO:PATH or a preset"),
        (str(tmp_path / "missing"), r"T2I-Adapter not found"),
        (str(sd1_adapters[0] / "config.json"), r"config.json: unknown weights format \(expected one of"),
        (str(diffusers_dir / "unet"), r"describes a UNet2DConditionModel, not a T2IAdapter"),
        (str(mlx_dir), r"is a converted folder but not a T2I-Adapter"),
    ]
    for ref, message in cases:
        with pytest.raises(UserError, match=message):
            pipe.load_t2i_adapter(ref)
    index = pipe.load_t2i_adapter(str(sd1_adapters[0]))
    kw = dict(steps=1, height=32, width=32, scheduler="euler")
    image = control_image(1, (32, 32))
    for control, message in [
        (T2IControl(index + 1, image), r"no T2I-Adapter at index 1 \(1 loaded"),
        (T2IControl(index, image, factor=1.5), r"factor must be a fraction in \[0, 1\]"),
        (T2IControl(index, image, scale=float("nan")), r"scale must be a finite number"),
        (T2IControl(index, "control.png"), r"must be a PIL image or a uint8 array, got str"),
        (T2IControl(index, np.zeros((32, 32, 3), np.float32)), r"must be uint8 \(H, W\) or \(H, W, 1/3/4\)"),
    ]:
        with pytest.raises(UserError, match=message):
            pipe.generate("x", t2i_adapters=[control], **kw)
        with pytest.raises(UserError, match=message):  # the size taken from the control image
            pipe.generate("x", t2i_adapters=[control], steps=1)
    with pytest.raises(UserError, match=r"the control image is 1x1 pixels; .* needs at least 2x2"):
        pipe.generate("x", t2i_adapters=[T2IControl(index, np.zeros((1, 1), np.uint8))], steps=1)
    array = np.asarray(control_image(2, (36, 28)))  # a uint8 array is a picture too
    assert next(iter(pipe.generate_latents("x", steps=1, t2i_adapters=[T2IControl(index, array)]))).latents.shape == \
        (1, 14, 18, 4)


@pytest.mark.parametrize("change,message", [
    ({"adapter_type": "huge_adapter"}, r"unsupported T2I-Adapter adapter_type 'huge_adapter'"),
    ({"num_res_blocks": 100000}, r"num_res_blocks must be in 1..64"),
    ({"in_channels": 4}, r"in_channels=4; control images have 1 \(grey\) or 3 \(RGB\) channels"),
    ({"downscale_factor": 0}, r"downscale_factor must be in 1..64"),
    ({"channels": []}, r"channels must be positive whole numbers"),
    ({"channels": [32, 48]}, r"does not fit this SD 1.x/2.x model: its features 32ch at 1/2, 48ch at 1/4 of the "
                             r"picture \(pixel unshuffle 2, widths \[32, 48\]\); this model's down blocks take "
                             r"32ch at 1/2, 64ch at 1/4"),  # before the weights
    ({"num_res_blocks": 1}, r"weights do not fit the config; .* tensors in the file fit no parameter"),
])
def test_hostile_or_mismatched_config(mlx_dir, sd1_adapters, tmp_path, change, message):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(sd1_adapters[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        StableDiffusion(mlx_dir, mx.float32).load_t2i_adapter(str(folder))


def test_size_not_divisible_by_the_unshuffle_is_refused(xl):
    pipe = StableDiffusion(xl[1], mx.float32)
    index = pipe.load_t2i_adapter(str(xl[3]))
    with pytest.raises(UserError, match=r"needs a height and width divisible by 4 \(its pixel unshuffle\); got 32x34"):
        pipe.generate("x", steps=1, height=34, width=32, t2i_adapters=[T2IControl(index, control_image(1, (32, 32)))])
    # without a size, the control image's is rounded down, as diffusers does: 39x21 -> 36x20
    steps = pipe.generate_latents("x", steps=1, t2i_adapters=[T2IControl(index, control_image(1, (39, 21)))])
    assert next(iter(steps)).latents.shape[1:3] == (10, 18)


# -- the command line, convert, memory ------------------------------------------------------------------------


def test_cli_equals_the_api(mlx_dir, sd1_adapters, tmp_path, capsys):
    from ipadapter_mlx.cli import main

    control_image(9, (48, 32)).save(tmp_path / "edges.png")
    code = main(["generate", "--model", str(mlx_dir), "--prompt", "a cat", "--steps", "2", "--seed", "3",
                 "--scheduler", "euler", "--t2i-adapter", str(sd1_adapters[0]),
                 "--t2i-image", str(tmp_path / "edges.png"),
                 "--adapter-conditioning-scale", "0.7", "--adapter-conditioning-factor", "0.5",
                 "--output", str(tmp_path / "cat.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    png = Image.open(tmp_path / "cat.png")
    assert png.size == (48, 32)  # the control image's size
    meta = json.loads(png.text["ipadapter_mlx"])
    assert meta["t2i_adapters"] == [{"t2i_adapter": str(sd1_adapters[0]), "image": str(tmp_path / "edges.png"),
                                     "scale": 0.7, "factor": 0.5}]
    assert "T2I-Adapter 1 scale: 0.7, T2I-Adapter 1 factor: 0.5" in png.text["parameters"]  # A1111-style text
    pipe = StableDiffusion(mlx_dir, mx.float32)
    control = T2IControl(pipe.load_t2i_adapter(str(sd1_adapters[0])), Image.open(tmp_path / "edges.png"), 0.7, 0.5)
    api = pipe.generate("a cat", steps=2, seed=3, scheduler="euler", t2i_adapters=[control])[0]
    assert np.array_equal(np.asarray(api), np.asarray(png.convert("RGB")))


@pytest.mark.parametrize("extra,message", [
    (["--t2i-image", "{img}"], r"1 --t2i-image for 0 --t2i-adapter"),
    (["--t2i-adapter", "{a}"], r"0 --t2i-image for 1 --t2i-adapter"),
    (["--t2i-adapter", "{a}", "--t2i-image", "{tmp}/none.png"], r"image not found: .*none.png"),
    (["--t2i-adapter", "{a}", "--t2i-image", "{tmp}/broken.png"], r"cannot read image .*broken.png"),
    (["--t2i-adapter", "{a}", "--t2i-image", "{img}", "--adapter-conditioning-scale", "1",
      "--adapter-conditioning-scale", "2", "--t2i-adapter", "{a}", "--t2i-image", "{img}", "--t2i-adapter", "{a}",
      "--t2i-image", "{img}"],
     r"2 --adapter-conditioning-scale for 3 --t2i-adapter"),
    (["--adapter-conditioning-factor", "0.5"], r"need a --t2i-adapter"),
    (["--t2i-adapter", "{xl}", "--t2i-image", "{img}"], r"made for SDXL .* this model is SD 1.x/2.x"),
    (["--t2i-adapter", "{a}", "--t2i-image", "{img}", "--height", "40", "--width", "40"], None),
])
def test_cli_bad_input_is_one_line(mlx_dir, sd1_adapters, xl, tmp_path, capsys, extra, message):
    from ipadapter_mlx.cli import main

    control_image(9, (48, 32)).save(tmp_path / "edges.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fill = {"img": str(tmp_path / "edges.png"), "a": str(sd1_adapters[0]), "xl": str(xl[3]), "tmp": str(tmp_path)}
    code = main(["generate", "--model", str(mlx_dir), "--steps", "1", "--output", str(tmp_path / "o.png"),
                 *(e.format(**fill) for e in extra)])
    _, err = capsys.readouterr()
    if message is None:  # 40 is a multiple of the VAE's 2 and the adapter's 2: it runs
        assert code == 0, err
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err


def test_convert_writes_a_folder_the_pipeline_loads(mlx_dir, sd1_adapters, tmp_path, capsys):
    from convert.__main__ import main

    assert main([str(sd1_adapters[0]), str(tmp_path / "t2i")]) == 0, capsys.readouterr().err
    assert (tmp_path / "t2i" / "t2i_adapter" / "model.safetensors").is_file()
    pipe = StableDiffusion(mlx_dir, mx.float32)
    a, b = pipe.load_t2i_adapter(str(tmp_path / "t2i")), pipe.load_t2i_adapter(str(sd1_adapters[0]))
    assert same_weights(pipe.t2i_adapters[a].model, pipe.t2i_adapters[b].model)


def test_hub_repo_and_sub_folder_offline(mlx_dir, sd1_adapters, tmp_path, monkeypatch, capsys):
    """A repo with only diffusion_pytorch_model.bin (as TencentARC/t2iadapter_canny_sd15v2) and REPO:FOLDER, from
    the Hugging Face cache (the tests run offline); converted once into the cache, then reused."""
    import shutil

    from huggingface_hub import constants

    from convert.__main__ import main as convert
    from test_cli import hub_cache

    make_adapter(tmp_path / "bin-repo", SD1_ADAPTER, 11, safetensors=False, gain=3.0)  # sd1_adapters[0]'s weights
    shutil.copytree(sd1_adapters[0], tmp_path / "multi" / "canny")
    hub_cache(tmp_path / "hf", "tiny/t2i-bin", tmp_path / "bin-repo")
    hub_cache(tmp_path / "hf", "tiny/t2i-multi", tmp_path / "multi")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    pipe = StableDiffusion(mlx_dir, mx.float32)
    a, b, c = (pipe.load_t2i_adapter(r) for r in ("tiny/t2i-bin", "tiny/t2i-multi:canny", str(sd1_adapters[0])))
    for i in (a, b):
        assert same_weights(pipe.t2i_adapters[i].model, pipe.t2i_adapters[c].model)
    assert pipe.t2i_adapters[a].folder == resolve_t2i_adapter("tiny/t2i-bin")  # cached
    with pytest.raises(UserError, match=r"tiny/t2i-multi has no config.json: not a diffusers T2I-Adapter"):
        pipe.load_t2i_adapter("tiny/t2i-multi")
    for i, ref in enumerate(["tiny/t2i-multi:canny", "tiny/t2i-bin"]):  # a repo id: told from a pipeline repo
        assert convert([ref, str(tmp_path / f"out{i}")]) == 0, capsys.readouterr().err
        assert (tmp_path / f"out{i}" / "t2i_adapter" / "model.safetensors").is_file()


def test_memory_estimate_counts_the_adapter(mlx_dir, sd1_adapters):
    pipe = StableDiffusion(mlx_dir, mx.float32)
    before = pipe.estimate_memory(64, 64)
    pipe.load_t2i_adapter(str(sd1_adapters[0]))
    weights = sum(p.numel() for p in diffusers.T2IAdapter.from_pretrained(sd1_adapters[0]).parameters()) * 4
    held = 2 * 4 * (32 * 32 * 32 + 64 * 16 * 16)  # its two feature maps at 64x64, CFG batch, float32
    assert pipe.estimate_memory(64, 64) - before == weights + held


def test_example_runs(mlx_dir, ip_repo, sd1_adapters, tmp_path, monkeypatch):
    import runpy
    import sys

    control_image(9, (48, 32), "L").save(tmp_path / "edges.png")
    reference_image(1).save(tmp_path / "ref.png")
    monkeypatch.setattr(sys, "argv", [
        "structure_and_style.py", "--model", str(mlx_dir), "--t2i-adapter", str(sd1_adapters[0]), "--ip-adapter",
        str(ip_repo / "models" / VARIANTS["plus"][0]), "--control", str(tmp_path / "edges.png"), "--image",
        str(tmp_path / "ref.png"), "--prompt", "a house", "--steps", "2", "--output", str(tmp_path / "out.png")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "structure_and_style.py"),
                   run_name="__main__")
    assert Image.open(tmp_path / "out.png").size == (48, 32)
