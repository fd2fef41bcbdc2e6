"""NaN and Inf never become a black PNG with exit 0; a too-small init image is an error; a prompt cut at 77
tokens is said so. The CLI (generate_latents, then decode) and the Python API (generate) alike."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import math
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from ip_fixtures import VARIANTS, make_adapter_repo
from ipadapter_mlx import StableDiffusion
from ipadapter_mlx.cli import main
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.ip_adapter import ImagePrompt


@pytest.fixture
def cli(mlx_dir, tmp_path, capsys):
    """Run `generate` in-process; assert one `error:` line matching `message`, exit 2 and no PNG."""
    Image.new("RGB", (32, 32), (90, 120, 150)).save(tmp_path / "ok.png")

    def fails(*extra, message: str, model: Path | None = None):
        try:
            code = main(["generate", "--model", str(model or mlx_dir), "--prompt", "x", "--steps", "2", "--height",
                         "32", "--width", "32", "--output", str(tmp_path / "out.png"), *extra])
        except SystemExit as e:  # the argument parser may refuse a value itself, with its own one line
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if not line.startswith("sampling")]  # tqdm's bar
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(message, lines[0]), lines[0]
        assert not (tmp_path / "out.png").exists()
        return lines[0]

    return fails


# the CLI may check some flags itself (its messages then differ): each must name the input
BAD_NUMBERS = {
    "cfg nan": (["--cfg", "nan"], r"cfg.* must be a finite number, got nan"),
    "cfg inf": (["--cfg", "inf"], r"cfg.* must be a finite number, got inf"),
    "strength nan": (["--init-image", "{tmp}/ok.png", "--strength", "nan"], r"strength.*(\(0, 1\]|finite).*got nan"),
    "latents nan": (["--latents", "{tmp}/nan.npy"], "latents.* (NaN|finite)"),
    "latents inf": (["--latents", "{tmp}/inf.npy"], "latents.* (Inf|finite)"),
    "latents int": (["--latents", "{tmp}/int.npy"], "latents.* int64"),
    "init 1x1": (["--init-image", "{tmp}/dot.png"], r"the init image is 1x1 pixels; it must be at least (\d)x\1"),
    "init 1x40": (["--init-image", "{tmp}/thin.png"], r"the init image is 1x40 pixels; it must be at least (\d)x\1"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_bad_numbers_are_refused(case, cli, tmp_path):
    good = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)  # 32x32, VAE factor 2
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = good.copy()
        bad[0, 1, 2, 3] = value
        np.save(tmp_path / f"{name}.npy", bad)
    np.save(tmp_path / "int.npy", np.zeros((1, 4, 16, 16), np.int64))
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (1, 40)).save(tmp_path / "thin.png")
    args, message = BAD_NUMBERS[case]
    cli(*[a.format(tmp=tmp_path) for a in args], message=message)


def test_guidance_and_strength_must_be_finite(mlx_pipe):
    """The API checks them itself, before any work (a NaN cfg turned guidance off; an infinite one gave black)."""
    for cfg in (math.nan, math.inf, -math.inf):
        with pytest.raises(UserError, match=f"cfg must be a finite number, got {cfg}"):
            mlx_pipe.generate_latents("x", steps=2, height=16, width=16, cfg=cfg)
    for strength in (math.nan, math.inf):
        with pytest.raises(UserError, match=rf"strength must be in \(0, 1\], got {strength}"):
            mlx_pipe.generate_latents("x", steps=2, init_image=Image.new("RGB", (16, 16)), strength=strength)


def test_tiny_init_image_is_not_ignored(mlx_pipe):
    """Without --height/--width the size came from the image: 1x1 gave 0, silently replaced by the default.
    The limit is the VAE's factor (8 for Stable Diffusion; 2 for the tiny test model)."""
    f = mlx_pipe.vae_scale_factor
    for size in ((1, 1), (f - 1, 64), (64, f - 1)):
        with pytest.raises(UserError, match=rf"init image is {size[0]}x{size[1]} pixels; it must be at least {f}x{f}"):
            mlx_pipe.generate_latents("x", steps=2, init_image=Image.new("RGB", size))
        with pytest.raises(UserError, match="init image"):  # with a size given too: nothing to start from
            mlx_pipe.output_size(16, 16, np.zeros((size[1], size[0], 3), np.uint8))
    assert mlx_pipe.output_size(None, None, Image.new("RGB", (f + 1, 3 * f))) == (3 * f, f)  # rounded down
    steps = mlx_pipe.generate_latents("x", steps=2, init_image=Image.new("RGB", (f, f)))  # the smallest that works
    assert list(steps)[-1].latents.shape == (1, 1, 1, 4)


def test_latents_given_as_arrays(mlx_pipe):
    good = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)  # 16x16, VAE factor 2
    kw = dict(steps=1, height=16, width=16, cfg=1.0)
    run = lambda latents: np.array(list(mlx_pipe.generate_latents("x", latents=latents, **kw))[-1].latents)  # noqa
    for given, values in ((mx.array(good), good), (mx.array(good).astype(mx.bfloat16), None),
                          (good.astype(np.float16), good.astype(np.float16).astype(np.float32))):
        values = np.array(given.astype(mx.float32)) if values is None else values  # what the given type holds
        assert np.abs(run(given) - run(values)).max() < 1e-5
    for given, message in ((mx.array(good.astype(np.int32)), "floating point, got int32"),
                           (mx.full((1, 4, 8, 8), math.inf), "NaN or Inf"),
                           (np.array([["a"]]), "floating point")):
        with pytest.raises(UserError, match=message):
            mlx_pipe.generate_latents("x", latents=given, **kw)


def poisoned_copy(mlx_dir: Path, tmp_path: Path, component: str, key: str) -> Path:
    """The converted model with one weight tensor's first value set to NaN, as a damaged file holds it."""
    dst = tmp_path / f"model-{component}"
    shutil.copytree(mlx_dir, dst)
    path = dst / component / "model.safetensors"
    arrays = mx.load(str(path))
    w = np.array(arrays[key])
    w.flat[0] = np.nan
    arrays[key] = mx.array(w)
    mx.save_safetensors(str(path), arrays)
    return dst


POISON = {
    "unet": ("conv_in.weight", r"sampling produced NaN/Inf at step 1 of 2: the UNet weights hold NaN/Inf "
                               r"\(conv_in\.weight\)"),
    "vae": ("decoder.conv_in.weight", r"the VAE decoder produced NaN/Inf: the VAE weights hold NaN/Inf "
                                      r"\(decoder\.conv_in\.weight\)"),
    "text_encoder": ("text_model.final_layer_norm.weight",
                     r"the text embeddings hold NaN/Inf: the text encoder weights hold NaN/Inf "
                     r"\(text_model\.final_layer_norm\.weight\)"),
}


@pytest.mark.parametrize("component", list(POISON))
def test_nan_weights_name_the_component(component, cli, mlx_dir, tmp_path):
    key, message = POISON[component]
    model = poisoned_copy(mlx_dir, tmp_path, component, key)
    cli(message=message, model=model)  # the CLI: generate_latents, then decode
    with pytest.raises(UserError, match=message):  # the API
        StableDiffusion(model, dtype=mx.float32).generate("x", steps=2, height=32, width=32)


def test_half_precision_overflow_is_named(mlx_dir):
    """Finite inputs that overflow float16 inside the UNet: the message says so and suggests float32."""
    pipe = StableDiffusion(mlx_dir, dtype=mx.float16)
    huge = np.full((1, 4, 16, 16), 1e6, np.float32)
    with pytest.raises(UserError, match=r"sampling produced NaN/Inf at step 1 of 3: float16 overflowed; try float32"):
        pipe.generate("x", steps=3, height=32, width=32, latents=huge)
    assert pipe.generate("x", steps=3, height=32, width=32, seed=0, return_array=True).shape == (1, 32, 32, 3)


@pytest.fixture(scope="module")
def adapter_file(torch_pipe, tmp_path_factory) -> Path:
    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet) / "models" / VARIANTS["base"][0]


def test_adapter_scales_and_weights_must_be_finite(mlx_dir, adapter_file, cli, tmp_path):
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    with pytest.raises(UserError, match="IP-Adapter scale must be a finite number, got nan"):
        pipe.load_ip_adapter(str(adapter_file), scale=math.nan)
    assert len(pipe.adapters) == 0
    pipe.load_ip_adapter(str(adapter_file))
    with pytest.raises(UserError, match="IP-Adapter scale for .* must be a finite number, got inf"):
        pipe.set_ip_adapter_scale(math.inf)
    assert pipe.adapters[0].scale == 1.0
    ref = Image.new("RGB", (40, 30), (200, 10, 10))
    for prompt, message in ((ImagePrompt(images=[ref], scale=-math.inf), "image prompt scale .* got -inf"),
                            (ImagePrompt(images=[ref, ref], weights=[1.0, math.nan]), "image weight .* got nan")):
        with pytest.raises(UserError, match=message):
            pipe.generate_latents("x", steps=1, height=16, width=16, image_prompts=[prompt])
    # embeddings that hold NaN (a damaged `embed` file): caught before the first step
    from ipadapter_mlx.ip_adapter import Features

    bad = mx.full((1, pipe.adapters[0].adapter.config.image_proj.input_dim), math.nan)
    with pytest.raises(UserError, match="the image-prompt tokens hold NaN/Inf: the inputs"):
        pipe.generate_latents("x", steps=1, height=16, width=16,
                              image_prompts=[ImagePrompt(features=Features(bad, mx.zeros_like(bad), False))])
    cli("--ip-adapter", str(adapter_file), "--image", str(tmp_path / "ok.png"), "--scale", "nan",
        message="scale.* must be a finite number, got nan")


# -- prompts longer than CLIP reads ----------------------------------------------------------------


def test_prompt_cut_at_77_tokens_warns_once(mlx_pipe, mlx_dir, capsys):
    from transformers import CLIPTokenizer

    from ipadapter_mlx.argparsing import show_log

    show_log()  # the library logs the warning; the commands show it as one `warning:` line on stderr

    tokenizer = CLIPTokenizer.from_pretrained(str(mlx_dir / "tokenizer"))  # the reference count
    letters = "".join(np.random.default_rng(0).choice(list("abcdefghij"), 120))
    prompt, negative = letters[:100], letters[:76]  # one letter, one token here (a byte-level vocabulary)
    n = len(tokenizer(prompt)["input_ids"])
    assert n == 102 and len(tokenizer(negative)["input_ids"]) == 78
    mlx_pipe.generate_latents(prompt, negative_prompt=negative, num_images=2, steps=1, height=16, width=16)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f'warning: the prompt is {n} tokens long; only 77 are read, the last {n - 77} are dropped: "{prompt[75:]}"',
        f'warning: the negative prompt is 78 tokens long; only 77 are read, the last 1 are dropped: "{negative[75:]}"',
    ]
    mlx_pipe.generate_latents(letters[:75], negative_prompt="", steps=1, height=16, width=16)  # 77 with start, end
    assert capsys.readouterr().err == ""
