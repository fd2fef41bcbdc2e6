"""The CLI as a newcomer meets it: every mistake one `error:` line before any work, --help with the defaults,
honest PNG metadata, and runs that cannot fit refused before they allocate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ipadapter_mlx import cli
from ipadapter_mlx.cli import main


@pytest.fixture
def run(mlx_dir, tmp_path, capsys):
    """Run `generate` in-process on the tiny converted model; (exit code, stdout, stderr)."""

    def go(*extra, model=None, output=None):
        try:
            code = main(["generate", "--model", str(model or mlx_dir), "--prompt", "x", "--steps", "1",
                         "--height", "32", "--width", "32", "--output", str(output or tmp_path / "out.png"), *extra])
        except SystemExit as e:  # argparse's mistakes
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def one_error(code, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)


@pytest.mark.parametrize("flags, words", [
    (["--cfg", "nan"], ["--cfg", "finite"]),
    (["--cfg", "inf"], ["--cfg", "finite"]),
    (["--cfg", "-1"], ["--cfg", "0 or more"]),
    (["--steps", "abc"], ["--steps", "invalid int"]),
    (["--seed", "-1"], ["--seed", "2**64-1"]),
    (["--seed", str(2**64)], ["--seed", "2**64-1"]),
    (["--strength", "0.5"], ["--strength", "--init-image"]),
    (["--ip-adapter", "sd15", "--scale", "nan"], ["--scale", "finite"]),
    (["--ip-adapter", "sd15", "--image", "a.png", "--image-weight", "inf"], ["--image-weight", "finite"]),
    (["--no-such-flag"], ["unrecognized arguments"]),
])
def test_bad_flags_get_one_line(run, tmp_path, flags, words):
    code, out, err = run(*flags)
    one_error(code, err, *words)
    assert not (tmp_path / "out.png").exists()


def test_latents_files(run, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "lat.npz", rng.standard_normal((1, 4, 4, 4)))
    one_error(*run("--latents", str(tmp_path / "lat.npz"))[::2], ".npy")
    np.save(tmp_path / "int.npy", np.ones((1, 4, 4, 4), np.int64))
    one_error(*run("--latents", str(tmp_path / "int.npy"))[::2], "int64", "floats")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    one_error(*run("--latents", str(tmp_path / "obj.npy"))[::2], "cannot read --latents")
    np.save(tmp_path / "nan.npy", np.full((1, 4, 4, 4), np.nan, np.float32))
    one_error(*run("--latents", str(tmp_path / "nan.npy"))[::2], "NaN")
    np.save(tmp_path / "ok.npy", rng.standard_normal((1, 4, 16, 16)))  # float64 is fine
    code, _, err = run("--latents", str(tmp_path / "ok.npy"))
    assert code == 0, err


def test_seed_range_ends_work(run, tmp_path):
    """0 and 2**64-1 both run, give different pictures, and the seed is recorded exactly."""
    pics = []
    for s in (0, 2**64 - 1):
        code, _, err = run("--seed", str(s))
        assert code == 0, err
        image = Image.open(tmp_path / "out.png")
        assert json.loads(image.text["ipadapter_mlx"])["seed"] == s
        pics.append(np.asarray(image))
    assert not np.array_equal(*pics)


def test_unwritable_output_fails_before_loading(run, tmp_path, monkeypatch):
    """A folder, or a path under a file: refused before the model is loaded (loading would fail the test)."""
    from ipadapter_mlx import pipeline

    monkeypatch.setattr(pipeline.StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "dir.png").mkdir()
    one_error(*run(output=tmp_path / "dir.png")[::2], "is a folder")
    (tmp_path / "file").write_text("x")
    one_error(*run(output=tmp_path / "file" / "out.png")[::2], "is a file, not a folder")


def test_too_big_is_refused_before_sampling(run, tmp_path, monkeypatch):
    """Over the machine's budget: one line with the estimate in GiB, nothing sampled; --no-memory-check runs it
    with a warning."""
    from ipadapter_mlx import pipeline

    monkeypatch.setattr(cli, "memory_budget", lambda: (2**20, "this machine can give"))
    sampled = []
    real = pipeline.StableDiffusion.generate_latents
    monkeypatch.setattr(pipeline.StableDiffusion, "generate_latents",
                        lambda self, *a, **k: sampled.append(1) or real(self, *a, **k))
    code, _, err = run()
    one_error(code, err, "GiB", "32x32", "0.0 GiB this machine can give", "--no-memory-check")
    assert not sampled
    code, _, err = run("--no-memory-check")
    assert code == 0 and "warning:" in err and sampled


def test_absurd_size_is_refused_by_the_real_estimate(run):
    """100000 px wide: its UNet scores alone would need terabytes; refused with the estimate, not a crash."""
    code, _, err = run("--width", "100000", "--height", "64")
    one_error(code, err, "100000x64", "GiB")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 25,", "(default: dpmpp-2m-karras,", "(default: 0.8)", "(default: out.png)",
                    "default: random", "(default: 7.5,"):  # steps, sampler and cfg: "..., or the --fast preset's"
        assert default in text, default
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "exactly one" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "SDXL" in " ".join(capsys.readouterr().out.split())


def test_prequantized_folder_is_recorded_as_quantized(mlx_dir, diffusers_dir, tmp_path, capsys):
    from convert.__main__ import main as convert_main

    assert convert_main([str(diffusers_dir), str(tmp_path / "q8"), "--quantize", "8", "--group-size", "32"]) == 0
    assert main(["generate", "--model", str(tmp_path / "q8"), "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path / "q.png")]) == 0
    meta = json.loads(Image.open(tmp_path / "q.png").text["ipadapter_mlx"])
    assert meta["quantize"] == "8-bit, group 32 (stored)"


def test_console_script():
    """`pip install .` puts an `ipadapter-mlx` command on the PATH (pyproject's [project.scripts])."""
    exe = shutil.which("ipadapter-mlx")
    if exe is None:
        pytest.skip("the package is not installed as a distribution here")
    proc = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0 and "--ip-adapter" in proc.stdout


def test_argparse_mistake_in_a_fresh_process():
    """The whole stderr of a mistyped command is one line (no usage block)."""
    proc = subprocess.run([sys.executable, "-m", "ipadapter_mlx", "generate", "--steps"], capture_output=True,
                          text=True, timeout=60)
    one_error(proc.returncode, proc.stderr, "--steps", "expected one argument")
