"""Pictures as people see them (EXIF orientation, 16-bit, transparency, CMYK), CLIP preprocessing of any aspect
ratio, and PNG output (umask, A1111 text). References: numpy formulas, PIL itself, CLIPImageProcessor."""

import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import psnr
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.images import clip_pixels, open_image, save_png, to_rgb

RNG = np.random.default_rng(0)
WHITE = 255.0


def png_bytes(arr: np.ndarray, color_type: int, bit_depth: int = 16, width: int | None = None,
              height: int | None = None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): big-endian samples, filter 0 on every row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = arr.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width or w, height or h, bit_depth, color_type, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)  # (w,) or (w, channels) per row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The 'over' operator on a white background; alpha in [0, 1]."""
    a = alpha[..., None]
    return rgb * a + WHITE * (1 - a)


# -- open_image / to_rgb ---------------------------------------------------------------------------


@pytest.mark.parametrize("orientation, display", [(1, lambda a: a), (2, np.fliplr), (3, lambda a: np.rot90(a, 2)),
                                                  (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(tmp_path, orientation, display, fmt):
    """A photo stored landscape with 'rotate 90' in its EXIF is shown (and read) portrait."""
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)  # a red band on the left of the stored pixels
    stored[:8] = (0, 0, 255)  # a blue band on top
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / f"p.{fmt.lower()}", fmt, exif=exif, quality=95)
    got = np.asarray(open_image(tmp_path / f"p.{fmt.lower()}"), np.float64)
    want = display(stored).astype(np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < (0.5 if fmt == "PNG" else 4)  # JPEG: compression noise only
    if fmt == "PNG":
        assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype, mode", [(np.uint16, "I;16"), (">u2", "I;16B"), (np.int32, "I")])
def test_sixteen_bit_grey_is_scaled_not_clipped(dtype, mode):
    values = RNG.integers(0, 65536, (24, 40)).astype(np.uint32)
    values[0, :3] = (0, 65535, 32896)
    im = Image.fromarray(values.astype(dtype))
    assert im.mode == mode
    want = np.round(values / 257.0)
    got = np.asarray(to_rgb(im), np.float64)
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=-1))


def test_sixteen_bit_png_files(tmp_path):
    """Greyscale, RGB and RGBA PNGs at 16 bits per sample, as cameras and editors write them."""
    grey = RNG.integers(0, 65536, (20, 30)).astype(np.uint16)
    (tmp_path / "g.png").write_bytes(png_bytes(grey, color_type=0))
    assert Image.open(tmp_path / "g.png").mode.startswith("I")  # the case PIL's convert("RGB") clips to white
    assert np.array_equal(np.asarray(open_image(tmp_path / "g.png"))[..., 0], np.round(grey / 257.0))

    rgb = RNG.integers(0, 65536, (20, 30, 3)).astype(np.uint16)
    (tmp_path / "rgb.png").write_bytes(png_bytes(rgb, color_type=2))
    got = np.asarray(open_image(tmp_path / "rgb.png"), np.float64)
    assert np.abs(got - rgb / 257.0).max() <= 1  # PIL keeps the high byte: within one level of value / 257

    rgba = RNG.integers(0, 65536, (20, 30, 4)).astype(np.uint16)
    (tmp_path / "rgba.png").write_bytes(png_bytes(rgba, color_type=6))
    got = np.asarray(open_image(tmp_path / "rgba.png"), np.float64)
    assert np.abs(got - over_white(rgba[..., :3] / 257.0, rgba[..., 3] / 65535.0)).max() <= 2


def test_transparency_is_composited_on_white(tmp_path):
    rgb = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (16, 24), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    cases = {"RGBA": (Image.fromarray(np.dstack([rgb, alpha])), rgb)}
    cases["LA"] = (Image.fromarray(np.dstack([rgb[..., 0], alpha])), np.repeat(rgb[..., :1], 3, axis=-1))
    for name, (im, colour) in cases.items():
        im.save(tmp_path / f"{name}.png")
        got = np.asarray(open_image(tmp_path / f"{name}.png"), np.float64)
        assert np.abs(got - over_white(colour.astype(np.float64), alpha / 255.0)).max() <= 1, name
        assert np.array_equal(got[0, 0], [255, 255, 255]), name  # fully transparent: the background

    # a palette with one transparent entry, and a greyscale PNG with a tRNS colour
    pal = Image.fromarray(np.arange(16 * 24, dtype=np.uint8).reshape(16, 24) % 4, "P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200])
    pal.save(tmp_path / "p.png", transparency=2)
    grey = Image.fromarray(np.arange(16 * 24, dtype=np.uint8).reshape(16, 24) % 3 * 40)
    grey.save(tmp_path / "l.png", transparency=40)
    for name, index, colours in (("p", np.asarray(pal), [(10, 20, 30), (200, 0, 0), (255, 255, 255), (0, 0, 200)]),
                                 ("l", np.asarray(grey) // 40, [(0,) * 3, (255,) * 3, (80,) * 3])):
        got = np.asarray(open_image(tmp_path / f"{name}.png"))
        assert np.array_equal(got, np.array(colours, np.uint8)[index]), name


def test_cmyk_bilevel_and_grey():
    cmyk = RNG.integers(0, 256, (8, 12, 4)).astype(np.float64)
    got = np.asarray(to_rgb(Image.fromarray(cmyk.astype(np.uint8), "CMYK")), np.float64)
    want = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255  # the standard naive CMYK -> RGB
    assert np.abs(got - want).max() <= 1
    bits = RNG.integers(0, 2, (8, 12)).astype(bool)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(bits))), np.repeat(bits[..., None] * 255, 3, -1))
    grey = RNG.integers(0, 256, (8, 12), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey))), np.repeat(grey[..., None], 3, -1))


def test_unreadable_images_are_one_line_errors(tmp_path):
    assert Image.MAX_IMAGE_PIXELS  # the decompression-bomb limit is on
    bomb = tmp_path / "bomb.png"  # 40 bytes that declare a 30000 x 30000 picture
    bomb.write_bytes(png_bytes(np.zeros((1, 1), np.uint16), color_type=0, width=30000, height=30000))
    with pytest.raises(UserError, match=r"cannot read image .*bomb\.png: .*exceeds limit"):
        open_image(bomb)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UserError, match="cannot read image"):
        open_image(tmp_path / "junk.png")
    with pytest.raises(UserError, match="image not found"):
        open_image(tmp_path / "none.png")


# -- CLIP preprocessing ----------------------------------------------------------------------------


def smooth_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(size[1] // 8, 2), max(size[0] // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


@pytest.mark.parametrize("size", [(12, 2400), (2400, 12), (3, 700)])
def test_extreme_aspect_ratio_matches_clip_image_processor(size):
    """Beyond 1:64 only the cropped part is resampled: still CLIPImageProcessor's picture, to 8-bit rounding."""
    from transformers import CLIPImageProcessor

    im = smooth_image(size, 1)
    ref = CLIPImageProcessor()(images=[im], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = clip_pixels([im], 224)
    levels = np.abs(got - ref) * np.array([0.26862954, 0.26130258, 0.27577711]) * 255  # back to 8-bit levels
    assert levels.max() <= 2.01 and levels.mean() < 0.25


def test_clip_preprocessing_memory_is_bounded(monkeypatch):
    """A 1x4000 reference: no resized picture larger than a few times size x size (it was 224 x 896000)."""
    sizes = []
    resize = Image.Image.resize

    def spy(self, size, *a, **kw):
        sizes.append(size)
        return resize(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    for fit in ("crop", "pad"):
        for shape in ((1, 4000), (4000, 1), (5, 100000)):
            out = clip_pixels([Image.new("RGB", shape, (200, 100, 50))], 224, fit)
            assert out.shape == (1, 224, 224, 3) and np.isfinite(out).all()
    assert sizes and max(w * h for w, h in sizes) <= 224 * 224
    # a flat colour stays that colour, bands aside
    want = (np.array([200, 100, 50]) / 255 - [0.48145466, 0.4578275, 0.40821073]) / [0.26862954, 0.26130258,
                                                                                      0.27577711]
    monkeypatch.undo()
    assert np.abs(clip_pixels([Image.new("RGB", (1, 4000), (200, 100, 50))], 224)[0] - want).max() < 1e-5


@pytest.mark.parametrize("size", [(300, 220), (220, 300), (640, 360)])
def test_pad_keeps_the_whole_picture(size):
    """fit="pad": the picture, long side at 224, centred on CLIP-mean bands (which normalise to ~0); the same
    picture as padding the full-size one first, then resizing (the costly way), but for the seam's blend."""
    im = smooth_image(size, 2)
    got = clip_pixels([im], 224, fit="pad")[0]
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    side, (w, h) = max(size), size
    canvas = Image.new("RGB", (side, side), tuple(int(round(c * 255)) for c in mean))
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    ref = np.asarray(canvas.resize((224, 224), Image.BICUBIC)) / 255.0
    band = int(224 * (1 - min(size) / side) / 2) - 1  # rows (or columns) of pure band colour on each side
    edges = got[:band] if w > h else got[:, :band]
    assert np.abs(edges).max() < 0.01 and band > 20
    assert psnr(got * [0.26862954, 0.26130258, 0.27577711] + mean, ref) >= 45


# -- PNG output ------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_png_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "out.png", {"prompt": "x"})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert os.listdir(tmp_path / "sub") == ["out.png"]  # no temp file left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_embeddings_file_honours_the_umask(tmp_path, umask):
    """`embed --output` goes through the same atomic writer: umask mode, no temp file left, readable back."""
    import mlx.core as mx

    from ipadapter_mlx.ip_adapter import Features, load_features, save_features

    feats = Features(mx.ones((1, 4)), mx.zeros((1, 4)), hidden_states=False)
    old = os.umask(umask)
    try:
        save_features(str(tmp_path / "e.safetensors"), feats)
    finally:
        os.umask(old)
    assert ((tmp_path / "e.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["e.safetensors"]
    assert np.array_equal(np.array(load_features(str(tmp_path / "e.safetensors")).cond), np.ones((1, 4)))


def test_png_to_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(UserError, match=r"cannot write .*out\.png"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png", {"prompt": "x"})
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # nothing half-written beside it


# A1111's own parser of the parameters line (modules/infotext_utils.py: re_param, unquote): the reference.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in RE_PARAM.findall(line)}


def test_png_text_is_a1111_without_python_reprs(tmp_path):
    params = {"prompt": "a fox, at dusk", "negative_prompt": "blurry", "steps": 3, "sampler": "euler",
              "cfg_scale": 7.5, "seed": 42, "size": "48x32", "model": "tiny/sd15", "dtype": "float32",
              "original_size": [32, 48], "crop_coords": [0, 0], "init_image": "C:\\photos\\in.png", "latents": None,
              "ip_adapters": [{"ip_adapter": "sd15", "image": ["a.png", "b.png"], "image_weight": [1.0, 0.5],
                               "scale": 0.6},
                              {"ip_adapter": "h94/IP-Adapter:models/x.bin", "image_embeds": ["e.safetensors"],
                               "combine": "average", "scale": 1.0}]}
    image = Image.open(save_png(Image.new("RGB", (48, 32)), tmp_path / "out.png", params))
    assert json.loads(image.text["ipadapter_mlx"]) == params  # the JSON chunk: every value exact
    prompt, negative, line = image.text["parameters"].split("\n")
    assert (prompt, negative) == ("a fox, at dusk", "Negative prompt: blurry")
    assert not re.search(r"[\[\]{}']|None", line), line  # no Python repr left
    got = a1111_parse(line)
    assert got == {
        "Steps": "3", "Sampler": "euler", "CFG scale": "7.5", "Seed": "42", "Size": "48x32", "Model": "tiny/sd15",
        "Dtype": "float32", "Original size": "32, 48", "Crop coords": "0, 0", "Init image": "C:\\photos\\in.png",
        "IP-Adapter 1": "sd15", "IP-Adapter 1 image": "a.png, b.png", "IP-Adapter 1 image weight": "1.0, 0.5",
        "IP-Adapter 1 scale": "0.6", "IP-Adapter 2": "h94/IP-Adapter:models/x.bin",
        "IP-Adapter 2 image embeds": "e.safetensors", "IP-Adapter 2 combine": "average", "IP-Adapter 2 scale": "1.0",
    }
