"""Every script in examples/ runs (on the tiny model and adapters), so they cannot rot."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

from ip_fixtures import VARIANTS, make_adapter_repo
from test_ip_adapter import reference_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94-ex"), torch_pipe.unet)


@pytest.mark.parametrize("script,args", [
    ("image_variation.py", ["--num-images", "2"]),
    ("text_and_image.py", ["--prompt", "a lighthouse"]),
    ("blend_references.py", ["--image", "{ref2}", "--weight", "1", "--weight", "0.5"]),
    ("image_to_image.py", ["--init", "{ref2}"]),
    # the tiny UNet has 6 transformers: style-transfer's tables are for 16 (SD 1.x) and 11 (SDXL)
    ("style_transfer.py", ["--prompt", "a cat", "--weight-type", "ease-out", "--start-at", "0.5"]),
    ("two_regions.py", ["--image", "{ref2}"]),
    ("wide_reference.py", ["--prompt", "a street"]),
])
def test_example_runs(script, args, repo, mlx_dir, tmp_path, monkeypatch):
    reference_image(1).save(tmp_path / "ref.png")
    reference_image(2, (32, 32)).save(tmp_path / "ref2.png")
    adapter = "plus" if script in ("text_and_image.py", "blend_references.py", "style_transfer.py",
                                   "two_regions.py", "wide_reference.py") else "base"
    argv = [script, "--model", str(mlx_dir), "--ip-adapter", str(repo / "models" / VARIANTS[adapter][0]),
            "--image", str(tmp_path / "ref.png"), "--steps", "2", "--output", str(tmp_path / "out.png")]
    argv += [a.format(ref2=tmp_path / "ref2.png") for a in args]
    if script != "image_to_image.py":
        argv += ["--size", "32"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert Image.open(tmp_path / "out.png").size[1] == 32
