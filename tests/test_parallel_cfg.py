"""`generate --parallel cfg`: the two halves of classifier-free guidance on two ranks of `mlx.launch`.

In one process: every UNet call of a generation with everything that reaches the UNet (two IP-Adapter images
with regional masks, a ControlNet, a T2I-Adapter, two pictures per prompt) gives, for each half of the CFG batch cut
by UNetInput.rows, the rows of the whole batch's output. Under `mlx.launch -n 2 --backend ring`: rank 0's picture
equals `generate` alone, with a random seed and an ancestral sampler (both ranks must agree on the seed and on
every noise draw), and rank 1 writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import psnr, record
from ipadapter_mlx.cli import main
from test_batch import BASE, ROOT, adapter, adapter_flags, free_ports, launcher, pixels, tiny  # noqa: F401,F811


class Halves:
    """A Denoiser whose every step also computes the UNet's output for each half of the CFG batch, as the two
    ranks of parallel cfg do (model_output with rows: the hooks see which rows are kept), and records how far
    the two halves put together are from the whole batch's output."""

    def __init__(self):
        from ipadapter_mlx.denoiser import Denoiser

        errors = self.errors = []

        class Checked(Denoiser):
            def model_output(self, x_in, i, sigma, rows=None):
                whole = super().model_output(x_in, i, sigma, rows)
                n = x_in.shape[0] // 2
                halves = [super(Checked, self).model_output(x_in, i, sigma, r) for r in (slice(0, n), slice(n, None))]
                errors.append(float(mx.abs(mx.concatenate(halves) - whole).max() / mx.abs(whole).max()))
                return whole

        self.denoiser = Checked


@pytest.mark.parametrize("guess", [False, True], ids=["controlnet", "guess-mode"])
def test_each_half_gives_the_rows_of_the_whole_batch(mlx_dir, torch_pipe, tmp_path, monkeypatch, guess):
    """Two masked IP-Adapter images, a ControlNet (each half runs it on its own rows; in guess mode the
    unconditional half not at all), a T2I-Adapter and two pictures per prompt."""
    from ip_fixtures import VARIANTS, make_adapter_repo
    from ipadapter_mlx import pipeline
    from ipadapter_mlx.controlnet import Control
    from ipadapter_mlx.models import ControlNetModel
    from ipadapter_mlx.pipeline import ImagePrompt, StableDiffusion
    from ipadapter_mlx.t2i_adapter import T2IControl
    from test_controlnet import control_image, make_controlnet
    from test_ip_adapter import reference_image
    from test_t2i_adapter import SD1_ADAPTER, make_adapter

    make_controlnet(torch_pipe.unet, 3).save_pretrained(tmp_path / "net")
    repo = make_adapter_repo(tmp_path / "h94", torch_pipe.unet, variants={"plus": VARIANTS["plus"]})
    make_adapter(tmp_path / "t2i", SD1_ADAPTER, 11, gain=3.0)
    check, net_rows = Halves(), []
    monkeypatch.setattr(pipeline, "Denoiser", check.denoiser)
    real = ControlNetModel.__call__
    monkeypatch.setattr(ControlNetModel, "__call__", lambda self, x, *a: net_rows.append(x.shape[0]) or real(self, x, *a))
    pipe = StableDiffusion(mlx_dir, mx.float32)
    pipe.load_controlnet(str(tmp_path / "net"))
    pipe.load_ip_adapter(str(repo / "models" / VARIANTS["plus"][0]), scale=0.7)
    t2i = pipe.load_t2i_adapter(str(tmp_path / "t2i"))
    left = np.zeros((32, 48), np.uint8)
    left[:, :24] = 255
    prompt = ImagePrompt(images=[reference_image(1), reference_image(2)],
                         masks=[Image.fromarray(left), Image.fromarray(255 - left)])
    pipe.generate("a cat", steps=3, cfg=5.0, height=32, width=48, seed=1, scheduler="euler", num_images=2,
                  image_prompts=[prompt], controls=[Control(control_image(1), scale=0.8, guess_mode=guess)],
                  t2i_adapters=[T2IControl(t2i, control_image(2), scale=0.7)])
    # a step: the whole batch (4 rows; guess mode: its 2 conditional ones), then each half's own rows
    assert net_rows == ([2, 2] if guess else [4, 2, 2]) * 3
    assert len(check.errors) == 3
    name = f"parallel cfg: halves vs the whole batch ({'guess mode' if guess else 'ControlNet'}, relative)"
    assert record(name, max(check.errors), "rel") < 1e-5


def test_sdxl_halves_cut_the_added_conditioning(monkeypatch, tmp_path_factory):
    """SDXL: the pooled text and size ids (one row per batch entry) are cut with the rest; a half given the whole
    batch's would not even add up in the time embedding."""
    pytest.importorskip("torch", reason="the tiny SDXL pipeline is written by diffusers")
    from conftest import write_tokenizer
    from ipadapter_mlx import pipeline
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
    from ipadapter_mlx.pipeline import StableDiffusion
    from test_sdxl import make_sdxl_pipeline
    from test_t2i_adapter import XL_UNET

    path = tmp_path_factory.mktemp("sdxl-halves")
    make_sdxl_pipeline(XL_UNET, write_tokenizer(tmp_path_factory.mktemp("tok"))).save_pretrained(path)
    folder = convert_diffusers_folder(path, tmp_path_factory.mktemp("mlx") / "xl")
    check = Halves()
    monkeypatch.setattr(pipeline, "Denoiser", check.denoiser)
    pipe = StableDiffusion(folder, mx.float32)
    assert pipe.is_sdxl
    pipe.generate("a house", negative_prompt="dull", steps=2, cfg=5.0, height=32, width=32, seed=2,
                  scheduler="euler", num_images=2)
    assert len(check.errors) == 2 and max(check.errors) < 1e-5, check.errors


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ)


def test_two_ranks_make_generates_picture(tiny, tmp_path, launcher):  # noqa: F811
    flags = ["--model", str(tiny / "model"), *BASE[:-2], "--scheduler", "euler-a", "--prompt", "a fox",
             "--cfg", "4", *adapter_flags(adapter(tiny, 0))]
    launched = run(["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--",
                    sys.executable, "-m", "ipadapter_mlx", "generate", *flags, "--parallel", "cfg",
                    "--output", str(tmp_path / "two.png")])
    assert launched.returncode == 0, launched.stderr
    said = launched.stdout + launched.stderr  # mlx.launch passes each rank's streams on as they come
    assert said.count(str(tmp_path / "two.png")) == 1, said  # rank 0 alone prints the path, and logs
    assert said.count("image encoder for") == 1, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.png"]
    params = json.loads(Image.open(tmp_path / "two.png").text["ipadapter_mlx"])
    alone = run([sys.executable, "-m", "ipadapter_mlx", "generate", *flags, "--seed", str(params["seed"]),
                 "--output", str(tmp_path / "one.png")])
    assert alone.returncode == 0, alone.stderr
    # each rank's UNet runs one row where generate runs two: sums in another order, hence not bit-equal
    db = psnr(pixels(tmp_path / "two.png") / 255, pixels(tmp_path / "one.png") / 255)
    assert record("parallel cfg: 2 ranks vs generate (random seed, euler-a)", db, "dB") >= 40


@pytest.mark.parametrize("extra,message", [
    (["--parallel", "cfg"], r"--parallel cfg needs exactly 2 ranks: run it under `mlx.launch -n 2`"),
    (["--parallel", "cfg", "--cfg", "1"], r"with --cfg 1.0 \(<= 1\) there is only one: give --cfg above 1, or leave"),
    (["--parallel", "cfg", "--fast", "lcm"], r"with --fast lcm's --cfg 1.0 \(<= 1\) there is only one"),
])
def test_bad_requests_are_one_line(tiny, tmp_path, capsys, extra, message):  # noqa: F811
    code = main(["generate", "--model", str(tiny / "model"), *BASE, "--output", str(tmp_path / "x.png"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "x.png").exists()


def test_batch_refuses_parallel_cfg(tiny, tmp_path, capsys):  # noqa: F811
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"parallel": "cfg"}) + "\n")
    base = ["batch", str(tmp_path / "jobs.jsonl"), "--model", str(tiny / "model"), *BASE]
    assert main([*base, "--output-dir", str(tmp_path / "a"), "--parallel", "cfg"]) == 2
    assert "batch spreads whole jobs over the ranks" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "b")]) == 1  # the job asking for it fails alone
    err = capsys.readouterr().err
    assert "line 2: --parallel cfg is for one generate" in err, err
    assert [json.loads(line)["status"] for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()] \
        == ["done", "failed"]


API = """
import sys, numpy as np, mlx.core as mx
from ipadapter_mlx import StableDiffusion
group = mx.distributed.init()
pipe = StableDiffusion(sys.argv[1], mx.float32)
out = pipe.generate("a fox", steps=2, cfg=4.0, height=64, width=64, scheduler="euler-a", num_images=2,
                    return_array=True, parallel_cfg=group)
np.save(f"{sys.argv[2]}/rank{group.rank()}.npy", np.array(out))
"""


def test_api_ranks_agree_without_a_seed(tiny, tmp_path, launcher):  # noqa: F811
    """pipe.generate(..., parallel_cfg=group) on both ranks, no seed, two pictures: both ranks end with the same
    pictures (each rank's own random seed would give another picture on each)."""
    launched = run(["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--",
                    sys.executable, "-c", API, str(tiny / "model"), str(tmp_path)])  # -c: this checkout's package
    assert (tmp_path / "rank0.npy").is_file() and (tmp_path / "rank1.npy").is_file(), launched.stdout
    a, b = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert a.shape == (2, 64, 64, 3) and np.array_equal(a, b)


def test_a_failing_rank_leaves_no_picture(tiny, tmp_path, launcher):  # noqa: F811
    """Rank 1 cannot read its reference image (each machine reads its own): it says so in one line, mlx.launch
    stops rank 0 (waiting to agree on the seed), and no picture is written."""
    import shutil

    shutil.copy(tiny / "ref0.png", tmp_path / "ref-0.png")  # rank 1 looks for ref-1.png: not there
    group = {**adapter(tiny, 0), "image": [str(tmp_path / "ref-$MLX_RANK.png")]}
    command = " ".join(["exec", sys.executable, "-m", "ipadapter_mlx", "generate", "--model", str(tiny / "model"),
                        *BASE, "--cfg", "4", *adapter_flags(group), "--parallel", "cfg",
                        "--output", str(tmp_path / "x.png")])
    launched = run(["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--",
                    "sh", "-c", command])
    assert not (tmp_path / "x.png").exists()
    said = launched.stdout + launched.stderr  # mlx.launch passes each rank's streams on as they come
    assert said.count(f"error: rank 1: image not found: {tmp_path / 'ref-1.png'}") == 1, said
