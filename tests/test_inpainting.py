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
H, W, STEPS = 32, 48, 4


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


def inpainting_torch_pipeline():
    """The session's tiny SD with a 9-channel (inpainting) UNet instead of its own."""
    pipe = make_torch_pipeline("sd1")
    torch.manual_seed(7)
    pipe.unet = perturb(diffusers.UNet2DConditionModel(**{**UNET_CONFIGS["sd1"], "in_channels": 9}), 8)
    return pipe


@pytest.fixture(scope="module")
def models(torch_pipe, mlx_dir, tmp_path_factory):
    """{channels: (diffusers components, our pipeline)}: the session's 4-channel model and a 9-channel one
    (the same model with an inpainting UNet), converted from its diffusers folder."""
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    src = tmp_path_factory.mktemp("sd-inpaint-tiny")
    inpainting_torch_pipeline().save_pretrained(src, safe_serialization=True)
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


@pytest.mark.parametrize("channels,scheduler", [(4, s) for s in REFERENCE] + [(9, "euler"), (9, "euler-a")])
def test_inpainting_matches_diffusers(models, channels, scheduler):
    """strength 1, noise drawn in diffusers' order (image, start noise, masked image, ancestral steps). The
    4-channel blend on every sampler (it relies on their elementwise updates); the 9-channel input does not
    depend on the sampler."""
    got, ref = run_both(models, channels, scheduler)
    assert record(f"inpainting {channels}-channel, {scheduler}", psnr(got, ref), "dB") >= 40


@pytest.mark.parametrize("channels,scheduler", [(9, "dpmpp-2m-karras"), (4, "euler")])
def test_strength_below_one(models, channels, scheduler):
    got, ref = run_both(models, channels, scheduler, strength=0.6, num_images=2)
    assert record(f"inpainting {channels}-channel, strength 0.6, {scheduler}, 2 images", psnr(got, ref), "dB") >= 40


@pytest.mark.parametrize("channels,scheduler,strength", [(9, "euler", 1.0), (4, "euler-a", 1.0), (9, "ddim", 0.7),
                                                         (4, "euler", 0.7)])
def test_given_latents(models, channels, scheduler, strength):
    """`latents=` as diffusers takes it: the start noise (also the noise the 4-channel blend re-uses), scaled
    by init_noise_sigma in its scheduler's own space even at strength < 1."""
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    got, ref = run_both(models, channels, scheduler, strength=strength, latents=latents)
    assert record(f"inpainting {channels}-channel, latents=, {scheduler}, strength {strength}",
                  psnr(got, ref), "dB") >= 40


def test_no_guidance_and_rgb_mask(models):
    """cfg 1 (no CFG batch: the hook's mask and image latents are not doubled) and an RGB mask."""
    got, ref = run_both(models, 4, "euler", cfg=1.0, mask=make_mask(mode="RGB"))
    assert record("inpainting 4-channel, cfg 1, RGB mask", psnr(got, ref), "dB") >= 40


@pytest.fixture(scope="module")
def adapter_repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)


@pytest.mark.parametrize("channels", [9, 4])
def test_with_ip_adapter(models, adapter_repo, channels):
    import copy

    components, _ = models[channels]
    # load_ip_adapter changes the UNet in place: give it a copy, the session's models stay plain
    ref_pipe = reference({**components, "unet": copy.deepcopy(components["unet"])}, "euler")
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


# -- around the mask: crop, blur, overlay --------------------------------------------------------


def big_photo(size=(120, 90)):
    return reference_image(12, size)


def small_mask(size=(120, 90), box=(70, 20, 86, 41)):
    return make_mask(size, box)


@pytest.mark.parametrize("channels,pad,size", [(9, 8, (120, 90)), (4, 4, (120, 90)), (9, 30, (70, 100))])
def test_padding_mask_crop_matches_diffusers(models, channels, pad, size):
    """Repaint a crop around a small mask at full resolution, paste it back (diffusers returns PIL here)."""
    components, ours = models[channels]
    photo, mask = big_photo(size), small_mask(size, (40, 20, 56, 41))
    ref = reference(components, "euler")(
        PROMPT, image=photo, mask_image=mask, height=H, width=W, padding_mask_crop=pad, num_inference_steps=STEPS,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(6)).images[0]
    got = ours.generate(PROMPT, init_image=photo, mask_image=mask, height=H, width=W, padding_mask_crop=pad,
                        steps=STEPS, cfg=7.5, scheduler="euler", strength=1.0,
                        noise=torch_noise(torch.Generator().manual_seed(6)))[0]
    assert got.size == ref.size == photo.size
    a, b = np.asarray(got) / 255.0, np.asarray(ref) / 255.0
    assert record(f"padding_mask_crop {pad}, {channels}-channel, {size}", psnr(a, b), "dB") >= 40
    outside = np.asarray(mask) == 0
    assert (np.asarray(got)[outside] == np.asarray(photo)[outside]).all()


def test_crop_region_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    from ipadapter_mlx.inpainting import crop_region

    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(16, 200, 2)
        x1, y1 = rng.integers(0, w - 1), rng.integers(0, h - 1)
        x2, y2 = rng.integers(x1, w), rng.integers(y1, h)
        mask = Image.new("L", (int(w), int(h)), 0)
        ImageDraw.Draw(mask).rectangle((int(x1), int(y1), int(x2), int(y2)), fill=int(rng.integers(1, 256)))
        ow, oh, pad = 8 * rng.integers(2, 20), 8 * rng.integers(2, 20), int(rng.integers(0, 40))
        assert crop_region(mask, ow, oh, pad) == VaeImageProcessor.get_crop_region(mask, ow, oh, pad=pad)


def test_mask_blur_matches_diffusers(models):
    """--mask-blur is diffusers' mask_processor.blur applied to the mask before everything else."""
    from diffusers.image_processor import VaeImageProcessor

    blurred = VaeImageProcessor.blur(make_mask(), blur_factor=3)
    got, ref = run_both(models, 4, "euler", mask_blur=3, ref_mask=blurred)
    assert record("inpainting with mask blur 3", psnr(got, ref), "dB") >= 40
    # and the blur changes the binarised mask (the ellipse, grey 200, shrinks), so this is not the plain mask twice
    plain, _ = run_both(models, 4, "euler")
    assert psnr(got, plain) < 40


def test_keep_unmasked_is_bit_identical_outside(models):
    """Pixels under a black mask are the input's, exactly; also when the picture is not a multiple of 8 (the
    result is the input's size) and the mask has another size (resized to the picture's)."""
    _, ours = models[4]
    photo = reference_image(3, (W + 5, H + 3))
    mask = make_mask((W + 5, H + 3))
    for m in (mask, mask.resize((2 * W, 2 * H), Image.NEAREST)):
        got = ours.generate(PROMPT, init_image=photo, mask_image=m, steps=2, cfg=5.0, scheduler="euler", seed=1,
                            strength=1.0, keep_unmasked=True)[0]
        assert got.size == photo.size
        outside = np.asarray(m.resize(photo.size, Image.LANCZOS)) == 0  # the mask at the picture's size
        assert outside.mean() > 0.5 and (np.asarray(got)[outside] == np.asarray(photo)[outside]).all()
        assert not (np.asarray(got)[~outside] == np.asarray(photo)[~outside]).all()  # the mask was repainted


def test_apply_overlay_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    from ipadapter_mlx.inpainting import apply_overlay

    photo, image = reference_image(1, (120, 90)), reference_image(2, (48, 32))
    mask = VaeImageProcessor.blur(small_mask(), 4)
    for crop in (None, (30, 10, 90, 50), (0, 0, 120, 80)):
        img = image if crop else image.resize(photo.size)
        ref = VaeImageProcessor().apply_overlay(mask, photo, img, crop)
        assert np.array_equal(np.asarray(apply_overlay(mask, photo, img, crop)), np.asarray(ref))


def test_mask_processing_matches_diffusers():
    """Our mask pixels and latent mask equal VaeImageProcessor's (mask config) + F.interpolate, for several
    modes, sizes and crops."""
    from diffusers.image_processor import VaeImageProcessor

    from ipadapter_mlx.inpainting import fit, mask_pixels, nearest

    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    images = VaeImageProcessor(vae_scale_factor=8)
    photo = reference_image(4, (75, 53))
    for mode in ("L", "RGB", "1", "RGBA"):
        mask = make_mask((75, 53), (20, 9, 51, 40), mode)
        for crop, fill in ((None, "default"), ((10, 5, 60, 45), "fill"), ((3, 0, 70, 20), "fill")):
            for w, h in ((48, 32), (80, 56), (32, 64)):
                ref = proc.preprocess(mask, height=h, width=w, resize_mode=fill, crops_coords=crop)
                ours = mask_pixels(mask, w, h, crop)
                assert np.array_equal(ours, ref[0, 0].numpy())
                lat = torch.nn.functional.interpolate(ref, size=(h // 8, w // 8))[0, 0].numpy()
                assert np.array_equal(nearest(ours, (h // 8, w // 8)), lat)
                px = images.preprocess(photo, height=h, width=w, resize_mode=fill, crops_coords=crop)
                ours_px = np.asarray(fit(photo, w, h, crop), np.float32) / 127.5 - 1
                assert np.abs(ours_px - px[0].permute(1, 2, 0).numpy()).max() < 1e-6


# -- the CLI, outpainting and bad inputs ---------------------------------------------------------


@pytest.fixture
def cli(models, tmp_path, capsys):
    """Run `generate` in-process on a tiny model (4 or 9 channels); (exit code, stderr)."""
    from ipadapter_mlx.cli import main

    photo = reference_image(5, (W, H))
    photo.save(tmp_path / "photo.png")
    make_mask().save(tmp_path / "mask.png")

    def go(*extra, channels=4):
        code = main(["generate", "--model", str(models[channels][1].folder), "--prompt", "x", "--steps", "2",
                     "--scheduler", "euler", "--seed", "3", "--output", str(tmp_path / "out.png"), *extra])
        return code, capsys.readouterr().err

    return go


def test_cli_inpaint_equals_python_api(cli, models, tmp_path):
    """--mask-image (default strength 1, as diffusers' inpainting) and --keep-unmasked give the Python API's
    picture, and the PNG records the inpainting parameters."""
    import json

    code, err = cli("--init-image", str(tmp_path / "photo.png"), "--mask-image", str(tmp_path / "mask.png"),
                    "--keep-unmasked", "--mask-blur", "1", channels=9)
    assert code == 0, err
    saved = Image.open(tmp_path / "out.png")
    meta = json.loads(saved.text["ipadapter_mlx"])
    assert meta["mask_image"].endswith("mask.png") and meta["keep_unmasked"] and meta["strength"] == 1.0
    want = models[9][1].generate("x", init_image=Image.open(tmp_path / "photo.png").convert("RGB"),
                                 mask_image=make_mask(), mask_blur=1, keep_unmasked=True, steps=2, scheduler="euler",
                                 seed=3, strength=1.0)[0]
    assert np.array_equal(np.asarray(saved), np.asarray(want))


def test_outpaint_canvas():
    from ipadapter_mlx.inpainting import outpaint_canvas

    photo = reference_image(6, (40, 24))
    for fill in ("edge", "noise", "grey"):
        canvas, mask = outpaint_canvas(photo, (8, 0, 16, 8), fill)
        assert canvas.size == mask.size == (64, 32)
        m = np.asarray(mask)
        assert (m[:24, 8:48] == 0).all() and (m[24:] == 255).all() and (m[:, :8] == 255).all()
        assert np.array_equal(np.asarray(canvas)[:24, 8:48], np.asarray(photo))  # the picture itself is intact
    edge = np.asarray(outpaint_canvas(photo, (8, 0, 16, 8))[0])
    assert np.array_equal(edge[:24, :8], np.repeat(np.asarray(photo)[:, :1], 8, axis=1))  # numpy's edge padding


def test_cli_outpaint(cli, tmp_path):
    code, err = cli("--init-image", str(tmp_path / "photo.png"), "--outpaint", "8", "0", "16", "8",
                    "--keep-unmasked")
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (H + 8, W + 24, 3)
    assert np.array_equal(out[:H, 8 : 8 + W], np.asarray(Image.open(tmp_path / "photo.png").convert("RGB")))


def test_mask_of_another_size_is_resized_as_diffusers(models):
    """A mask of another size than the picture is resized to the output size (lanczos), as diffusers does."""
    got, ref = run_both(models, 9, "euler", mask=make_mask().resize((W * 3, H * 2), Image.BILINEAR))
    assert record("inpainting, mask of another size", psnr(got, ref), "dB") >= 40


BAD = {
    "mask missing": (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/nope.png"], "mask image not found"),
    "mask unreadable": (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/broken.png"],
                        "cannot read mask image"),
    "mask without init": (["--mask-image", "{tmp}/mask.png"], "--mask-image needs an --init-image"),
    "inpainting model without mask": (["--channels9"], "this is an inpainting model"),
    "inpainting model, img2img": (["--channels9", "--init-image", "{tmp}/photo.png"], "this is an inpainting model"),
    "keep-unmasked alone": (["--keep-unmasked"], "--keep-unmasked is for inpainting"),
    "blur alone": (["--init-image", "{tmp}/photo.png", "--mask-blur", "2"], "--mask-blur is for inpainting"),
    "negative blur": (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/mask.png", "--mask-blur", "-1"],
                      "mask blur must be"),
    "negative crop": (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/mask.png",
                       "--padding-mask-crop", "-4"], "--padding-mask-crop must be >= 0"),
    "crop of a black mask": (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/black.png",
                              "--padding-mask-crop", "4"], "the mask is all black"),
    "outpaint not x8": (["--init-image", "{tmp}/photo.png", "--outpaint", "4", "0", "0", "0"], "multiples of 8"),
    "outpaint zero": (["--init-image", "{tmp}/photo.png", "--outpaint", "0", "0", "0", "0"], "nothing to add"),
    "outpaint and mask": (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/mask.png",
                           "--outpaint", "8", "0", "0", "0"], "does not combine with --mask-image"),
    "outpaint without init": (["--outpaint", "8", "0", "0", "0"], "--outpaint needs an --init-image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line(case, cli, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("L", (W, H)).save(tmp_path / "black.png")
    args, message = BAD[case]
    channels = 9 if "--channels9" in args else 4
    code, err = cli(*[a.format(tmp=tmp_path) for a in args if a != "--channels9"], channels=channels)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message in err, err


def test_python_api_bad_inputs(models):
    _, ours = models[4]
    kw = dict(steps=1, height=H, width=W)
    with pytest.raises(UserError, match="a mask needs an init image"):
        ours.generate_latents("x", mask_image=make_mask(), **kw)
    with pytest.raises(UserError, match="keep_unmasked is for inpainting"):
        ours.generate("x", keep_unmasked=True, **kw)
    with pytest.raises(UserError, match="give a mask_image too"):
        ours.generate_latents("x", init_image=init_image(), padding_mask_crop=8, strength=1.0, **kw)
    with pytest.raises(UserError, match=r"mask array has shape \(2, 3, 4, 5\)"):
        ours.generate_latents("x", init_image=init_image(), mask_image=np.zeros((2, 3, 4, 5)), strength=1.0, **kw)


def test_single_file_inpainting_model(models, diffusers_dir, tmp_path):
    """An original-layout inpainting file: 9 input channels read from its conv_in, also when the configs come
    from the base model's folder (`--config` of the 4-channel model, as sd-v1-5-inpainting.ckpt is used)."""
    from safetensors.torch import save_file

    from ipadapter_mlx.checkpoints import keymaps
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_single_file, infer_unet_config
    from test_convert import assert_same_weights, original_checkpoint

    folder = tmp_path / "d9"
    inpainting_torch_pipeline().save_pretrained(folder, safe_serialization=True)  # the weights of models[9]
    ckpt = original_checkpoint(folder)
    unet = {k[len(keymaps.UNET_PREFIX):]: mx.array(v.numpy()) for k, v in ckpt.items()
            if k.startswith(keymaps.UNET_PREFIX)}
    assert infer_unet_config(unet)["in_channels"] == 9
    save_file({k: v.contiguous() for k, v in ckpt.items()}, tmp_path / "inpaint.safetensors")
    out = convert_single_file(tmp_path / "inpaint.safetensors", tmp_path / "mlx", diffusers_dir / "tokenizer",
                              config_dir=diffusers_dir)
    assert_same_weights(out, models[9][1].folder)


def test_edge_fill_is_the_least_seamed():
    """The measurement behind the default outpaint fill (README): cut a 16-pixel border off smooth pictures,
    with and without grain, fill it back each way and compare with what was cut. "edge" is the closest to
    the truth, has no jump at the seam, and keeps the picture's own change along the edge; noise and grey jump."""
    from ipadapter_mlx.inpainting import outpaint_canvas

    B, scores = 16, {}
    for fill in ("edge", "noise", "grey"):
        rmse, seam = [], []
        for seed in range(12):
            rng = np.random.default_rng(seed)
            base = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            full = np.asarray(Image.fromarray(base).resize((128, 96), Image.BICUBIC), np.float64)
            full = np.clip(full + rng.standard_normal(full.shape) * 8 * (seed % 2), 0, 255).round()
            inner = Image.fromarray(full[B:-B, B:-B].astype(np.uint8))
            canvas = np.asarray(outpaint_canvas(inner, (B, B, B, B), fill, seed=seed)[0], np.float64)
            border = np.ones(full.shape[:2], bool)
            border[B:-B, B:-B] = False
            rmse.append(np.sqrt(((canvas - full)[border] ** 2).mean()))
            natural = np.abs(np.diff(full[B:-B, B:-B], axis=1)).mean()
            seam.append(np.abs(canvas[B:-B, B - 1] - canvas[B:-B, B]).mean() / natural)
        scores[fill] = np.mean(rmse), np.mean(seam)
    assert scores["edge"][0] < 0.6 * min(scores["noise"][0], scores["grey"][0])
    assert scores["edge"][1] == 0 and min(scores["noise"][1], scores["grey"][1]) > 3


@pytest.mark.parametrize("script,args", [
    ("inpaint_with_reference.py", ["--init", "{photo}", "--mask", "{mask}", "--padding-mask-crop", "8"]),
    ("outpaint_in_style.py", ["--init", "{photo}", "--border", "8", "0", "16", "0"]),
])
def test_example_runs(script, args, models, adapter_repo, tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    init_image().save(tmp_path / "photo.png")
    make_mask().save(tmp_path / "mask.png")
    reference_image(1).save(tmp_path / "ref.png")
    argv = [script, "--model", str(models[9][1].folder),
            "--ip-adapter", str(adapter_repo / "models" / VARIANTS["plus"][0]),
            "--image", str(tmp_path / "ref.png"), "--steps", "2", "--output", str(tmp_path / "out.png")]
    argv += [a.format(photo=tmp_path / "photo.png", mask=tmp_path / "mask.png") for a in args] + ["--mask-blur", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / script), run_name="__main__")
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == ((H, W, 3) if script.startswith("inpaint") else (H, W + 24, 3))
    photo = np.asarray(init_image())
    from ipadapter_mlx.inpainting import outpaint_canvas, read_mask

    mask = make_mask() if script.startswith("inpaint") else outpaint_canvas(photo, (8, 0, 16, 0))[1]
    keep = np.asarray(read_mask(mask, 1)) == 0  # outside the blurred mask: the input's pixels exactly
    canvas = photo if script.startswith("inpaint") else np.pad(photo, ((0, 0), (8, 16), (0, 0)))
    assert keep.mean() > 0.25 and (out[keep] == canvas[keep]).all()


def test_cli_latents_with_a_mask(cli, models, tmp_path):
    """--latents combines with --init-image when there is a mask (diffusers' latents= of the inpaint pipeline)."""
    latents = np.random.default_rng(0).standard_normal((1, 4, H // 2, W // 2)).astype(np.float32)
    np.save(tmp_path / "lat.npy", latents)
    code, err = cli("--init-image", str(tmp_path / "photo.png"), "--mask-image", str(tmp_path / "mask.png"),
                    "--latents", str(tmp_path / "lat.npy"))
    assert code == 0, err
    want = models[4][1].generate("x", init_image=Image.open(tmp_path / "photo.png").convert("RGB"),
                                 mask_image=make_mask(), latents=latents, steps=2, scheduler="euler", seed=3,
                                 strength=1.0)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(want))
