"""IP-Adapter from the CLI: presets through the Hub cache, embeddings files, mismatches, unsafe files."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import os
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ip_fixtures import VARIANTS, make_adapter_repo
from ipadapter_mlx.cli import main
from test_cli import hub_cache
from test_ip_adapter import reference_image


@pytest.fixture(scope="module")
def h94(torch_pipe, tmp_path_factory):
    """A Hub cache holding the tiny h94/IP-Adapter, offline."""
    repo = make_adapter_repo(tmp_path_factory.mktemp("h94-src"), torch_pipe.unet)
    hf_home = tmp_path_factory.mktemp("hf")
    hub_cache(hf_home, "h94/IP-Adapter", repo)
    return repo, hf_home


@pytest.fixture
def cli(mlx_dir, tmp_path, capsys, monkeypatch, h94):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(h94[1] / "hub"))
    for name in ("ref.png", "ref2.png"):
        reference_image(len(name)).save(tmp_path / name)

    def go(command, *args, base=True):
        common = ["--model", str(mlx_dir), "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
                  "--seed", "3", "--scheduler", "euler"] if base else []
        code = main([command, *common, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def test_preset_from_hub_finds_the_encoder_its_shapes_need(cli, tmp_path):
    """sd15-vit-g sits in models/ but needs the encoder in sdxl_models/, as its shapes say."""
    code, out, err = cli("generate", "--ip-adapter", "sd15-vit-g", "--image", str(tmp_path / "ref.png"),
                         "--scale", "0.7", "--output", str(tmp_path / "out.png"))
    assert code == 0, err
    assert re.search(r"image encoder for sd15-vit-g: .*sdxl_models/image_encoder$", out, re.M)
    meta = Image.open(tmp_path / "out.png").text["ipadapter_mlx"]
    assert '"ip_adapter": "sd15-vit-g"' in meta and '"scale": 0.7' in meta


def test_embeds_file_gives_the_same_picture(cli, h94, tmp_path):
    adapter = str(h94[0] / "models" / VARIANTS["plus"][0])
    args = ["--ip-adapter", adapter, "--image", str(tmp_path / "ref.png"), "--image", str(tmp_path / "ref2.png")]
    code, _, err = cli("embed", *args, "--output", str(tmp_path / "ref.safetensors"), base=False)
    assert code == 0, err
    code, _, err = cli("generate", *args, "--output", str(tmp_path / "a.png"))
    assert code == 0, err
    code, _, err = cli("generate", "--ip-adapter", adapter, "--image-embeds", str(tmp_path / "ref.safetensors"),
                       "--image-encoder", "/nonexistent", "--output", str(tmp_path / "b.png"))  # never loaded
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_two_adapters_combine_modes_and_negative_image(cli, h94, tmp_path):
    models = h94[0] / "models"
    code, _, err = cli(
        "generate", "--ip-adapter", str(models / VARIANTS["plus"][0]), "--image", str(tmp_path / "ref.png"),
        "--image", str(tmp_path / "ref2.png"), "--image-weight", "1.0", "--image-weight", "0.5",
        "--combine", "norm-average", "--negative-image", str(tmp_path / "ref2.png"), "--scale", "0.6",
        "--ip-adapter", str(models / VARIANTS["full-face"][0]), "--image", str(tmp_path / "ref.png"),
        "--image-fit", "pad", "--output", str(tmp_path / "out.png"),
    )
    assert code == 0, err


def sdxl_like_adapter(path, torch_pipe):
    """An adapter whose layers read 48-d context (a different base model), 10 cross-attention layers."""
    g = torch.Generator().manual_seed(0)
    w = {"image_proj.proj.weight": torch.randn(4 * 48, 24, generator=g), "image_proj.proj.bias": torch.zeros(192),
         "image_proj.norm.weight": torch.ones(48), "image_proj.norm.bias": torch.zeros(48)}
    for i in range(1, 21, 2):
        w[f"ip_adapter.{i}.to_k_ip.weight"] = torch.randn(32, 48, generator=g)
        w[f"ip_adapter.{i}.to_v_ip.weight"] = torch.randn(32, 48, generator=g)
    save_file(w, path)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_errors_name_both_sides(cli, h94, tmp_path, torch_pipe):
    models = h94[0] / "models"
    sdxl_like_adapter(tmp_path / "other.safetensors", torch_pipe)
    Exploit.marker = tmp_path / "pwned"
    torch.save({"image_proj": {"proj.weight": torch.zeros(1)}, "ip_adapter": {"x": Exploit()}}, tmp_path / "evil.bin")
    ref = str(tmp_path / "ref.png")
    cases = [
        (["--ip-adapter", str(tmp_path / "other.safetensors"), "--image", ref],
         r"made for a UNet with 10 cross-attention layers of 48-d text context .* this UNet has 6 of 32-d"),
        (["--ip-adapter", str(models / VARIANTS["vit-g"][0]), "--image", ref,
          "--image-encoder", str(h94[0] / "models" / "image_encoder")],
         r"adapter expects a 20-d encoder, got 24-d"),
        (["--ip-adapter", "sd99-nope", "--image", ref], r"IP-Adapter not found: sd99-nope .* preset"),
        (["--ip-adapter", "sd15", "--image", str(tmp_path / "missing.png")], r"image not found"),
        (["--ip-adapter", "sd15"], r"give --image or --image-embeds"),
        (["--image", ref], r"--image needs an --ip-adapter"),
        (["--ip-adapter", str(tmp_path / "evil.bin"), "--image", ref], r"refusing to load '(posix|os)\.system'"),
        (["--ip-adapter", "sd15", "--image-embeds", str(tmp_path / "ref.png")], r"not a readable embeddings file"),
    ]
    for args, message in cases:
        code, out, err = cli("generate", *args, "--output", str(tmp_path / "out.png"))
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and re.search(message, lines[0]), (args, err)
        assert not (tmp_path / "out.png").exists()
    assert not (tmp_path / "pwned").exists()


def test_encoder_names_in_messages():
    from ipadapter_mlx.ip_adapter import encoder_name

    assert encoder_name(1280, hidden=False) == "1280-d ViT-bigG/14"
    assert encoder_name(1024, hidden=False) == "1024-d ViT-H/14"
    assert encoder_name(1664, hidden=True) == "1664-d ViT-bigG/14"
