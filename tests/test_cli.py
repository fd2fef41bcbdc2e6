"""The CLI end to end (Hub cache, offline), PNG metadata, and one clean line for every kind of bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter_mlx.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(hf_home: Path, repo: str, src: Path) -> None:
    """A Hugging Face cache holding `repo` as huggingface_hub lays it out (refs/main -> snapshots/<commit>)."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, root / "snapshots" / COMMIT)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "ipadapter_mlx", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_generate_from_hub_cache_offline(diffusers_dir, tmp_path):
    hub_cache(tmp_path / "hf", "tiny/sd15", diffusers_dir)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("IPADAPTER_MLX_CACHE", None)
    args = ["generate", "--model", "tiny/sd15", "--prompt", "a red fox", "--negative-prompt", "blurry",
            "--steps", "3", "--height", "32", "--width", "48", "--seed", "42", "--scheduler", "euler-a",
            "--verbose", "--output", str(tmp_path / "fox.png")]
    first = run_cli(args, env)
    assert first.returncode == 0, first.stderr
    assert "converting unet" in first.stdout
    image = Image.open(tmp_path / "fox.png")
    assert image.size == (48, 32)
    meta = json.loads(image.text["ipadapter_mlx"])
    assert meta["prompt"] == "a red fox" and meta["seed"] == 42 and meta["steps"] == 3
    assert image.text["parameters"].startswith("a red fox\nNegative prompt: blurry\n")
    assert "peak memory" in first.stderr and "sampling" in first.stderr
    assert list((tmp_path / "hf" / "ipadapter-mlx" / "converted").glob("tiny--sd15-*"))

    second = run_cli(args[:-1] + [str(tmp_path / "fox2.png")], env)  # cached: no conversion, same picture
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stdout
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fox2.png")), np.asarray(image))


@pytest.fixture
def run(mlx_dir, tmp_path, capsys):
    """Run the CLI in-process on the tiny converted model; return (exit code, stdout, stderr)."""

    def go(*extra, model=None):
        code = main(["generate", "--model", str(model or mlx_dir), "--prompt", "x", "--steps", "2",
                     "--height", "32", "--width", "32", "--output", str(tmp_path / "out.png"), *extra])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def test_generate_batch_and_latents(run, tmp_path):
    np.save(tmp_path / "lat.npy", np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32))
    code, out, err = run("--num-images", "2", "--latents", str(tmp_path / "lat.npy"), "--scheduler", "ddim")
    assert code == 0, err
    assert (tmp_path / "out_1.png").is_file() and (tmp_path / "out_2.png").is_file()


def test_image_to_image(run, tmp_path):
    Image.fromarray(np.full((40, 36, 3), 128, np.uint8)).save(tmp_path / "init.png")
    code, out, err = run("--init-image", str(tmp_path / "init.png"), "--strength", "0.5", "--height", "40",
                         "--width", "40")
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (40, 40)


def corrupt_copy(mlx_dir: Path, tmp_path: Path, how: str) -> Path:
    dst = tmp_path / f"model-{how}"
    shutil.copytree(mlx_dir, dst)
    if how == "truncated":
        f = dst / "unet" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    else:
        cfg = json.loads((dst / "unet" / "config.json").read_text())
        cfg["block_out_channels"] = [48, 64]
        (dst / "unet" / "config.json").write_text(json.dumps(cfg))
    return dst


BAD_INPUTS = {
    "missing path": (["--model", "/nonexistent/model"], "model not found"),
    "missing repo": (["--model", "nobody/no-such-model"], "not in the local Hub cache"),
    "height": (["--height", "30"], "multiple of 8"),
    "steps": (["--steps", "0"], "at least 1"),
    "init image": (["--init-image", "{tmp}/broken.png"], "cannot read image"),
    "latents shape": (["--latents", "{tmp}/bad.npy"], r"latents have shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
    "latents file": (["--latents", "{tmp}/missing.npy"], "cannot read --latents"),
    "truncated weights": (["--model", "truncated"], "truncated or corrupt"),
    "weights vs config": (["--model", "mismatch"], "do not fit unet/config.json"),
    "strength": (["--init-image", "{tmp}/ok.png", "--strength", "1.5"], r"strength must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line(case, run, mlx_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 8, 8), np.float32))
    args, message = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    model = None
    if args[:2] in (["--model", "truncated"], ["--model", "mismatch"]):
        model, args = corrupt_copy(mlx_dir, tmp_path, args[1]), args[2:]
    code, out, err = run(*args, model=model)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out.png").exists()


def test_refuses_a_run_too_big_for_the_machine(run, monkeypatch):
    """The CPU budget is most of the RAM: a 1 MB machine refuses the run (before sampling) with the estimate."""
    from ipadapter_mlx import cli

    monkeypatch.setattr(cli, "physical_memory", lambda: 2**20)
    code, out, err = run()
    assert code == 2
    assert re.search(r"error: this run needs about [\d.]+ GiB at 32x32, more than the 0.0 GiB the machine has.*"
                     r"--low-memory", err)
    monkeypatch.setattr(cli, "physical_memory", lambda: 2**40)
    code, out, err = run()
    assert code == 0 and "warning" not in err and "error" not in err


def test_memory_budget_is_the_gpus_working_set_on_apple_silicon(monkeypatch):
    """On a Mac the warning compares with Metal's recommended working set, not the whole RAM."""
    import mlx.core as mx

    from ipadapter_mlx import cli

    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": 8 * 2**30,
                                                    "max_recommended_working_set_size": 5 * 2**30})
    assert cli.memory_budget() == (5 * 2**30, "the GPU may use")
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    monkeypatch.setattr(cli, "physical_memory", lambda: 100)
    assert cli.memory_budget() == (85, "the machine has")


def test_memory_estimate_follows_settings(mlx_dir):
    import mlx.core as mx

    from ipadapter_mlx import StableDiffusion

    full = StableDiffusion(mlx_dir, mx.float32).estimate_memory(64, 64)
    low = StableDiffusion(mlx_dir, mx.float32, low_memory=True).estimate_memory(64, 64)
    q4 = StableDiffusion(mlx_dir, mx.float32, quantize=(4, 32)).estimate_memory(64, 64)
    bigger = StableDiffusion(mlx_dir, mx.float32).estimate_memory(512, 512)
    assert low < full and q4 < full and bigger > full


def test_memory_estimate_covers_a_measured_generation(mlx_dir):
    """The estimate the CLI warns from is never below what a generation really takes (MLX's own count)."""
    import gc

    import mlx.core as mx

    from ipadapter_mlx import StableDiffusion

    for low in (False, True):
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        pipe = StableDiffusion(mlx_dir, mx.float32, low_memory=low)
        pipe.generate("a fox", steps=1, height=96, width=96, seed=0)
        used = mx.get_peak_memory() - before
        assert 0 < used <= pipe.estimate_memory(96, 96), low
        del pipe


def test_decoder_memory_model_matches_the_cpu():
    """The decoder's activation bytes per pixel (fitted at real SD shapes) hold for another VAE and size. On the
    CPU, GroupNorm, SiLU and attention run partly in numpy, whose buffers MLX's counters do not see: numpy reports
    them to tracemalloc, and the two peaks added bound the real one from above."""
    import tracemalloc

    import mlx.core as mx

    from ipadapter_mlx.bench_shapes import TINY
    from ipadapter_mlx.config import VAEConfig
    from ipadapter_mlx.models import AutoencoderKL
    from ipadapter_mlx.memory import decode_activation_bytes

    if mx.default_device() != mx.cpu:
        pytest.skip("the GPU coefficients were measured on CUDA; this checks the CPU's")
    vae = AutoencoderKL(VAEConfig.from_dict(TINY["vae"]))
    mx.eval(vae.parameters())
    z = mx.random.normal((1, 40, 24, 4))
    mx.eval(z)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    tracemalloc.start()
    try:
        mx.eval(vae.decode(z))
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    used = mx.get_peak_memory() - before + numpy_peak
    assert numpy_peak > 0  # the numpy kernels ran (and are counted)
    estimate = decode_activation_bytes(TINY["vae"]["block_out_channels"][0], 320 * 192)
    assert used <= estimate <= 1.3 * used + 2**26, (used, estimate)


def test_generate_quantized_and_low_memory(run, tmp_path):
    code, out, err = run("--quantize", "8", "--group-size", "32", "--low-memory")
    assert code == 0, err
    meta = json.loads(Image.open(tmp_path / "out.png").text["ipadapter_mlx"])
    assert meta["quantize"] == "8-bit, group 32"


def test_convert_cli_quantized(diffusers_dir, tmp_path, capsys):
    from convert.__main__ import main as convert_main

    assert convert_main([str(diffusers_dir), str(tmp_path / "q4"), "--quantize", "4", "--group-size", "32"]) == 0
    assert json.loads((tmp_path / "q4" / "unet" / "config.json").read_text())["quantization"]["bits"] == 4
