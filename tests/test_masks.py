"""Regional masks against diffusers' `ip_adapter_masks` (two images on one adapter, two adapters with one mask
each), the mask downsampling against `IPAdapterMaskProcessor.downsample`, ComfyUI's embeds scaling against its
formulas written here from CrossAttentionPatch.py, and bad masks from the CLI."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import math
import re
import warnings

import diffusers
import mlx.core as mx
import numpy as np
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from conftest import psnr, record
from ip_fixtures import VARIANTS
from ipadapter_mlx import StableDiffusion, UserError
from ipadapter_mlx.conditioning import ImageAttention, downsample_mask
from ipadapter_mlx.ip_adapter import ImagePrompt
from ipadapter_mlx.models.attention import EMBEDS_SCALINGS, Attention, IPAttention
from test_ip_adapter import STEPS, adapter_repo, diffusers_pipe, reference_image  # noqa: F401 (fixture)
from test_ip_cli import cli, h94  # noqa: F401 (fixtures)

H, W = 32, 48  # not square: the masks' aspect ratio matters in the downsampling


def half(side: str, size=(W, H), soft=False) -> Image.Image:
    """A white left or right part (a little past the middle, so the regions overlap), in RGB as a file would be."""
    x = np.arange(size[0])[None, :].repeat(size[1], 0)
    white = x < 0.6 * size[0] if side == "left" else x >= 0.4 * size[0]
    return Image.fromarray((white * 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("mask_hw,queries", [((32, 48), 96), ((32, 48), 24), ((64, 40), 40), ((30, 30), 50),
                                              ((32, 48), 97)])
def test_downsample_matches_diffusers(mask_hw, queries):
    """Bicubic (torch's), the grid from the aspect ratio, and the cut or zero padding when shapes differ."""
    mask = (np.random.default_rng(queries).random(mask_hw) > 0.5).astype(np.float32)
    with warnings.catch_warnings():  # diffusers warns when it pads or cuts (the last two cases)
        warnings.simplefilter("ignore")
        want = IPAdapterMaskProcessor.downsample(torch.from_numpy(mask)[None], 1, queries, 1)[0, :, 0].numpy()
    assert np.abs(downsample_mask(mask, queries) - want).max() < 1e-5


def run_masked(diffusers_dir, mlx_dir, repo, variants, images, masks, scales):
    """The same masked generation through diffusers (masks from IPAdapterMaskProcessor().preprocess, given as
    cross_attention_kwargs) and through ours (PIL masks in ImagePrompt.masks)."""
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    processor = IPAdapterMaskProcessor()
    torch_masks = [processor.preprocess(m, height=H, width=W) for m in masks]
    torch_masks = [m.reshape(1, m.shape[0], m.shape[2], m.shape[3]) for m in torch_masks]
    ref = diffusers_pipe(diffusers_dir, repo, variants, scales)(
        "a cat", ip_adapter_image=images, num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W,
        latents=latents, output_type="np", cross_attention_kwargs={"ip_adapter_masks": torch_masks},
    ).images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    for v in variants:
        ours.load_ip_adapter(str(repo / "models" / VARIANTS[v][0]))

    def generate(with_masks=True):
        prompts = [ImagePrompt(images=im, scale=s, masks=m if with_masks else None)
                   for im, m, s in zip(images, masks, scales)]
        return np.array(ours.generate("a cat", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler",
                                      latents=latents.numpy(), image_prompts=prompts, return_array=True))

    return generate(), ref, generate(False)


def test_two_images_one_adapter_match_diffusers(diffusers_dir, mlx_dir, adapter_repo):  # noqa: F811
    images = [[reference_image(2), reference_image(3)]]
    masks = [[half("left"), half("right")]]
    got, ref, unmasked = run_masked(diffusers_dir, mlx_dir, adapter_repo, ["plus"], images, masks, [0.9])
    assert record("masks: plus, two images, left/right", psnr(got, ref), "dB") >= 40
    assert psnr(got, unmasked) < 40  # the masks really change the picture


def test_two_adapters_one_mask_each_match_diffusers(diffusers_dir, mlx_dir, adapter_repo):  # noqa: F811
    images = [[reference_image(4)], [reference_image(5, (200, 260))]]
    masks = [[half("left")], [half("right", (96, 64))]]  # the second at twice the size: resized to the picture
    got, ref, unmasked = run_masked(diffusers_dir, mlx_dir, adapter_repo, ["plus", "plus-face"], images, masks,
                                    [0.8, 1.2])
    assert record("masks: plus + plus-face, one region each", psnr(got, ref), "dB") >= 40
    assert psnr(got, unmasked) < 40


# ---------------------------------------------------------------------------------------------------
# Embeds scaling, one attention layer, against ComfyUI's CrossAttentionPatch written in numpy


def np_attention(q, k, v, heads):
    B, L, C = q.shape
    d = C // heads
    split = lambda t: t.reshape(B, t.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ split(v)).transpose(0, 2, 1, 3).reshape(B, L, C)


def comfy_out_ip(q, ip_k, ip_v, weight, mode, heads):
    """CrossAttentionPatch.__call__'s out_ip for one adapter, mode by mode."""
    if mode == "K+mean-V":  # 'K+mean(V) w/ C penalty'
        weight = weight * ip_k.shape[2] / 1280.0
        ip_k = ip_k * weight
        mean = ip_v.mean(axis=1, keepdims=True)
        return np_attention(q, ip_k, (ip_v - mean) + mean * weight, heads)
    if mode == "K+V-C-penalty":  # 'K+V w/ C penalty'
        weight = weight * ip_k.shape[2] / 1280.0
        return np_attention(q, ip_k * weight, ip_v * weight, heads)
    if mode == "K+V":
        return np_attention(q, ip_k * weight, ip_v * weight, heads)
    return np_attention(q, ip_k, ip_v, heads) * weight  # 'V only'


@pytest.mark.parametrize("mode", EMBEDS_SCALINGS)
@pytest.mark.parametrize("width", [64, 320])
def test_embeds_scaling_matches_comfyui(mode, width):
    heads, ctx, rng = 4, 16, np.random.default_rng(width)
    attn, ips = Attention(width, heads, width // heads, context_dim=ctx), [IPAttention(ctx, width) for _ in "ab"]
    x, text = rng.standard_normal((2, 12, width)), rng.standard_normal((2, 7, ctx))
    tokens = [rng.standard_normal((2, n, ctx)) for n in (4, 6)]
    mask = (rng.random((12, 1)) > 0.5)
    scales = [0.7, -1.3]
    f32 = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    image = [ImageAttention(ips[0], f32(tokens[0]), scales[0], None, mode),
             ImageAttention(ips[1], f32(tokens[1]), scales[1], f32(mask), mode)]
    got = np.array(attn(f32(x), f32(text), image))

    w = lambda layer: np.array(layer.weight, np.float64).T  # noqa: E731
    q = x @ w(attn.to_q)
    out = np_attention(q, text @ w(attn.to_k), text @ w(attn.to_v), heads)
    for ip, t, s, m in zip(ips, tokens, scales, [1.0, mask]):
        out = out + comfy_out_ip(q, t @ w(ip.to_k_ip), t @ w(ip.to_v_ip), s, mode, heads) * m
    want = out @ w(attn.to_out[0]) + np.array(attn.to_out[0].bias)
    assert np.abs(got - want).max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_masks_one_line_each(cli, h94, tmp_path, capsys):  # noqa: F811
    models = h94[0] / "models"
    plus = str(models / VARIANTS["plus"][0])
    ref, ref2 = str(tmp_path / "ref.png"), str(tmp_path / "ref2.png")
    half("left").save(tmp_path / "m.png")
    (tmp_path / "notes.png").write_text("not a picture")
    m = str(tmp_path / "m.png")
    cases = [
        (["--ip-adapter", plus, "--image", ref, "--mask", str(tmp_path / "missing.png")], r"image not found: .*missing"),
        (["--ip-adapter", plus, "--image", ref, "--mask", str(tmp_path / "notes.png")], r"cannot read image .*notes"),
        (["--ip-adapter", plus, "--image", ref, "--image", ref2, "--mask", m], r"1 --mask for 2 images"),
        (["--ip-adapter", plus, "--image", ref, "--mask", m, "--mask", m], r"2 --mask for 1 images"),
        (["--ip-adapter", plus, "--image", ref, "--mask", m, "--image", ref2, "--mask", m, "--combine", "average"],
         r"masks need --combine concat"),
        (["--ip-adapter", plus, "--image", ref, "--embeds-scaling", "K"], r"invalid choice: 'K'"),
    ]
    for args, message in cases:
        try:
            code, out, err = cli("generate", *args, "--output", str(tmp_path / "out.png"))
        except SystemExit as e:  # argparse refuses an unknown choice itself, in one line
            code, err = e.code, capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and re.search(message, lines[0]), (args, err)
        assert not (tmp_path / "out.png").exists()


def test_masks_and_scaling_from_the_cli(cli, h94, tmp_path):  # noqa: F811
    """Two adapters, one region each (one with K+V scaling), a third blending two images by max."""
    models = h94[0] / "models"
    half("left", (32, 32)).save(tmp_path / "l.png")
    half("right", (32, 32)).save(tmp_path / "r.png")
    code, _, err = cli("generate", "--ip-adapter", str(models / VARIANTS["plus"][0]), "--image",
                       str(tmp_path / "ref.png"), "--mask", str(tmp_path / "l.png"), "--embeds-scaling", "K+V",
                       "--ip-adapter", str(models / VARIANTS["base"][0]), "--image", str(tmp_path / "ref.png"),
                       "--mask", str(tmp_path / "r.png"), "--ip-adapter", str(models / VARIANTS["light"][0]),
                       "--image", str(tmp_path / "ref.png"), "--image", str(tmp_path / "ref2.png"), "--combine", "max",
                       "--output", str(tmp_path / "out.png"))
    assert code == 0 and (tmp_path / "out.png").exists(), err


# -- ComfyUI's IPAdapter Tiled (fit="tiles") -----------------------------------------------------------------


@pytest.mark.parametrize("size,resized,boxes", [
    # near-square: centre-cropped square (280), resized to 512: 2 x 2 tiles, no overlap
    ((300, 280), (512, 512), [(0, 0), (256, 0), (0, 256), (256, 256)]),
    ((600, 300), (512, 256), [(0, 0), (256, 0)]),  # 2:1: short side 256, two tiles
    ((450, 300), (384, 256), [(0, 0), (128, 0)]),  # 1.5:1: two tiles overlapping by 128 (ceil(384/256) = 2)
    ((1500, 300), (1024, 256), [(0, 0), (256, 0), (512, 0), (768, 0)]),  # 5:1: 1280 cut to 4 tiles
    ((300, 900), (256, 768), [(0, 0), (0, 256), (0, 512)]),  # tall 1:3
    ((283, 280), (512, 512), [(0, 0), (256, 0), (0, 256), (256, 256)]),  # crop from x = round(1.5) = 2
    ((650, 250), (665, 256), [(0, 0), (204, 0), (409, 0)]),  # overlap 51.5: starts int(204.5), int(409)
    ((400, 300), (341, 256), [(0, 0), (85, 0)]),  # h/w = 0.75 exactly: not near-square (the bound is strict)
    ((1024, 256), (1024, 256), [(0, 0), (256, 0), (512, 0), (768, 0)]),  # 4:1 exactly: no cut
    ((1100, 256), (1024, 256), [(0, 0), (256, 0), (512, 0), (768, 0)]),  # past 4:1: 1100 cut to 1024 from 38
])
def test_tiles_follow_comfyui(size, resized, boxes):
    """The tile grid of IPAdapterTiled (tile 256, overlap (n*256 - side) / (n - 1), at most 4), each tile the
    lanczos-resized reference's pixels in its box, each mask white on its box alone (the expected boxes worked
    out by hand from ComfyUI's formulas)."""
    from ipadapter_mlx.images import tile_reference

    ref = Image.fromarray(np.random.default_rng(7).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tiles, masks = tile_reference(ref)
    w, h = size

    def centre(image, cw, ch):  # torchvision's CenterCrop: int(round((size - crop) / 2.0))
        left, top = int(round((image.width - cw) / 2.0)), int(round((image.height - ch) / 2.0))
        return image.crop((left, top, left + cw, top + ch))

    if 0.75 < h / w < 1.33:
        whole = centre(ref, min(w, h), min(w, h)).resize(resized, Image.LANCZOS)
    else:  # short side 256, long side int(256 x ratio), then the centre that the tiles cover
        full = ref.resize((math.floor(256 * w / h), 256) if h < w else (256, math.floor(256 * h / w)), Image.LANCZOS)
        whole = centre(full, *resized)
    assert len(tiles) == len(masks) == len(boxes)
    for tile, mask, (x, y) in zip(tiles, masks, boxes):
        assert tile.size == (256, 256) and mask.size == resized
        assert np.array_equal(np.asarray(tile), np.asarray(whole.crop((x, y, x + 256, y + 256))))
        want = np.zeros(resized[::-1], bool)
        want[y : y + 256, x : x + 256] = True
        assert np.array_equal(np.asarray(mask) > 127, want)


def test_a_very_wide_reference_is_tiled_without_resizing_it_whole():
    """1 x 20000: the 4 tiles of its centre from a box resize (256 x 5 million pixels are never made), equal to the
    exact path's where that is affordable (a 5 x 300 strip, resized whole to 15360 x 256): 2 levels at most, PIL's
    float coefficients."""
    from ipadapter_mlx import images

    strip = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20000, 1, 3), dtype=np.uint8))
    tiles, masks = images.tile_reference(strip)
    assert [t.size for t in tiles] == [(256, 256)] * 4 and masks[0].size == (256, 1024)
    short = Image.fromarray(np.random.default_rng(4).integers(0, 256, (5, 300, 3), dtype=np.uint8))  # 15360 long
    exact, _ = images.tile_reference(short)
    images.MAX_EXACT_ASPECT, saved = 1, images.MAX_EXACT_ASPECT
    try:
        boxed, _ = images.tile_reference(short)
    finally:
        images.MAX_EXACT_ASPECT = saved
    assert max(np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(exact, boxed)) <= 2


def test_tiles_keep_within_the_given_mask():
    """An attention mask for a tiled reference: each tile's mask is its box within it (a tile outside is empty)."""
    from ipadapter_mlx.images import tile_reference

    left = np.zeros((300, 600), np.uint8)
    left[:, :300] = 255  # the reference's left half
    _, masks = tile_reference(Image.new("RGB", (600, 300)), Image.fromarray(left))
    first, second = (np.asarray(m) > 127 for m in masks)
    assert first.sum() == 256 * 256 and not second.any()


def test_tiles_are_their_images_and_masks(mlx_dir, adapter_repo):  # noqa: F811
    """fit="tiles" generates exactly what the same tiles give as images with their masks (the masked-image path
    is diffusers' ip_adapter_masks, tested above), with the image weight on every tile; not what one crop gives."""
    from ipadapter_mlx.images import tile_reference

    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_ip_adapter(str(adapter_repo / "models" / VARIANTS["plus"][0]))
    wide = reference_image(6, (180, 60))
    tiles, masks = tile_reference(wide)
    kw = dict(steps=2, cfg=5.0, height=H, width=W, seed=4, scheduler="euler", return_array=True)
    got = np.array(pipe.generate("a cat", image_prompts=[ImagePrompt(images=[wide], fit="tiles", weights=[0.8])], **kw))
    by_hand = np.array(pipe.generate("a cat", image_prompts=[ImagePrompt(images=tiles, masks=masks,
                                                                         weights=[0.8] * len(tiles))], **kw))
    cropped = np.array(pipe.generate("a cat", image_prompts=[ImagePrompt(images=[wide], weights=[0.8])], **kw))
    assert len(tiles) == 3 and np.array_equal(got, by_hand)
    assert psnr(got, cropped) < 40
    average = np.array(pipe.generate("a cat", image_prompts=[ImagePrompt(images=[wide], fit="tiles", weights=[0.8],
                                                                         combine="average")], **kw))
    assert np.array_equal(average, got)  # one image: nothing to blend, the tiles attended one by one as always
    for prompt, message in [(ImagePrompt(images=[wide], fit="tiles", weights=[1, 2]), r"2 image weights for the one tiled image"),
                            (ImagePrompt(images=[wide], fit="tiles", masks=[wide, wide]), r"2 masks for the one tiled image"),
                            (ImagePrompt(images=[wide, wide], fit="tiles"), r"tiles take one reference image, got 2"),
                            (ImagePrompt(images=[wide], fit="tiles", composition_images=[wide]),
                             r"tiles take no composition image")]:
        with pytest.raises(UserError, match=message):
            pipe.generate("a cat", image_prompts=[prompt], **kw)


def test_tiles_from_the_cli(cli, h94, tmp_path):  # noqa: F811
    plus = str(h94[0] / "models" / VARIANTS["plus"][0])
    reference_image(8, (120, 40)).save(tmp_path / "wide.png")
    code, _, err = cli("generate", "--ip-adapter", plus, "--image", str(tmp_path / "wide.png"), "--image-fit", "tiles",
                       "--output", str(tmp_path / "out.png"))
    assert code == 0 and (tmp_path / "out.png").exists(), err
    code, _, err = cli("embed", "--ip-adapter", plus, "--image", str(tmp_path / "wide.png"), "--image-fit", "tiles",
                       "--output", str(tmp_path / "e.safetensors"), base=False)
    assert code == 2 and "--image-fit tiles gives each tile a mask" in err and not (tmp_path / "e.safetensors").exists()
