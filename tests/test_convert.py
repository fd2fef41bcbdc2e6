"""Converters: diffusers .bin folders, original single files (.safetensors / .ckpt), the restricted unpickler."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from conftest import make_torch_pipeline, to_np
from ipadapter_mlx.checkpoints import keymaps
from ipadapter_mlx.conditioning import StepConditioning
from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder, convert_single_file, infer_unet_config
from ipadapter_mlx.checkpoints.torch_pickle import load_torch_file
from ipadapter_mlx.config import UNetConfig, VAEConfig
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.loading import load_component


def read_component(folder: Path, name: str) -> dict:
    file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(folder / name / file)


def original_checkpoint(folder: Path) -> dict:
    """The diffusers folder's weights under original (LDM) names, as model sites distribute them."""
    cfg = {n: json.loads((folder / n / "config.json").read_text()) for n in ("unet", "vae")}
    unet_inv = keymaps.renamer([(d, o) for o, d in keymaps.unet_original_to_diffusers(UNetConfig.from_dict(cfg["unet"]))])
    vae_inv = keymaps.renamer([(d, o) for o, d in keymaps.vae_original_to_diffusers(VAEConfig.from_dict(cfg["vae"]))])
    ckpt = {}
    for k, v in read_component(folder, "unet").items():
        ckpt[keymaps.UNET_PREFIX + unet_inv(k)] = v
    for k, v in read_component(folder, "vae").items():
        if ".attentions." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # original VAE attention projections are 1x1 convs
        ckpt[keymaps.VAE_PREFIX + vae_inv(k)] = v
    for k, v in read_component(folder, "text_encoder").items():
        ckpt[keymaps.TEXT_PREFIX + keymaps.clip_text_key(k)] = v
    ckpt["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # training buffers real files carry
    ckpt["model_ema.decay"] = torch.tensor(0.999)
    return ckpt


@pytest.fixture(scope="module")
def original(diffusers_dir):
    ckpt = original_checkpoint(diffusers_dir)
    # The independent check that these are the original names: diffusers' own converters map them back.
    unet_cfg = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    for ref, ours in [
        (convert_ldm_unet_checkpoint(ckpt, unet_cfg), read_component(diffusers_dir, "unet")),
        (convert_ldm_vae_checkpoint(ckpt, vae_cfg), read_component(diffusers_dir, "vae")),
    ]:
        assert set(ref) == set(ours)
        assert all(torch.equal(ref[k].reshape(ours[k].shape), ours[k]) for k in ours)
    text = convert_ldm_clip_checkpoint(ckpt)
    assert {keymaps.clip_text_key(k) for k in read_component(diffusers_dir, "text_encoder")} == set(text)
    return ckpt


def assert_same_weights(folder_a: Path, folder_b: Path, components=("text_encoder", "unet", "vae")):
    for name in components:
        a, b = mx.load(str(folder_a / name / "model.safetensors")), mx.load(str(folder_b / name / "model.safetensors"))
        assert set(a) == set(b), name
        for k in a:
            assert mx.array_equal(a[k], b[k]), k


def test_infer_unet_config_from_shapes(original, diffusers_dir):
    w = {k[len(keymaps.UNET_PREFIX):]: mx.array(v.numpy()) for k, v in original.items()
         if k.startswith(keymaps.UNET_PREFIX)}
    inferred = infer_unet_config(w)
    real = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "up_block_types", "cross_attention_dim", "use_linear_projection"):
        assert list(np.atleast_1d(inferred[key])) == list(np.atleast_1d(real[key])), key


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_equals_diffusers_folder(original, diffusers_dir, mlx_dir, tmp_path, fmt):
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in original.items()}, path)
    else:
        torch.save({"state_dict": original, "global_step": 470000}, path)
    # A tiny model's head count and group count cannot be read from shapes: take them from its folder,
    # as diffusers' from_single_file(config=...) does.
    out = convert_single_file(path, tmp_path / "mlx", diffusers_dir / "tokenizer", config_dir=diffusers_dir)
    assert_same_weights(out, mlx_dir)
    unet = load_component(out, "unet", mx.float32)
    ref = make_torch_pipeline("sd1").unet.__class__.from_pretrained(diffusers_dir / "unet").eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x, torch.tensor([500.0]), ctx).sample
    got = unet(mx.array(x.permute(0, 2, 3, 1).numpy()), mx.array([500.0]), StepConditioning(mx.array(ctx.numpy())))
    assert np.abs(to_np(got).transpose(0, 3, 1, 2) - to_np(expected)).max() < 1e-4


def test_single_file_strict(original, diffusers_dir, tmp_path):
    bad = dict(original)
    bad["model.diffusion_model.stray.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="stray.weight"):
        convert_single_file(tmp_path / "bad.safetensors", tmp_path / "out", diffusers_dir / "tokenizer",
                            config_dir=diffusers_dir)
    assert not (tmp_path / "out").exists()


def test_bin_folder_equals_safetensors(mlx_dir, tmp_path):
    pipe = make_torch_pipeline("sd1")  # same seed as the session's folder, so the same weights
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert list((tmp_path / "bin" / "unet").glob("*.bin"))
    assert_same_weights(convert_diffusers_folder(tmp_path / "bin", tmp_path / "mlx"), mlx_dir)


def test_missing_and_leftover_keys_are_named(diffusers_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(diffusers_dir, src)
    w = load_file(src / "unet" / "diffusion_pytorch_model.safetensors")
    w.pop("conv_in.weight")
    w["extra.weight"] = torch.zeros(2)
    save_file(w, src / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"missing from the file: conv_in\.weight.*fit no parameter: extra\.weight"):
        convert_diffusers_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_weights_that_do_not_fit_the_config(diffusers_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(diffusers_dir, src)
    cfg = json.loads((src / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 48
    (src / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"attn2\.to_k\.weight is \(\d+, 32\) in the file.*expects \(\d+, 48\)"):
        convert_diffusers_folder(src, tmp_path / "out")


def test_truncated_weights(diffusers_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(diffusers_dir, src)
    f = src / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        convert_diffusers_folder(src, tmp_path / "out")


# -- the restricted unpickler -----------------------------------------------------------------------


def test_torch_pickle_roundtrip(tmp_path):
    sd = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
          "view": torch.randn(4, 3).t(), "param": torch.nn.Parameter(torch.randn(2)), "i64": torch.arange(4)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "x.ckpt")
    got = load_torch_file(str(tmp_path / "x.ckpt"))
    assert got["epoch"] == 3
    for k, v in sd.items():
        assert got["state_dict"][k].shape == tuple(v.shape)
        assert np.array_equal(to_np(got["state_dict"][k]), v.detach().float().numpy()), k


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    torch.save({"weight": torch.zeros(2), "payload": Exploit()}, tmp_path / "evil.bin")
    with zipfile.ZipFile(tmp_path / "evil.bin") as z:  # make sure the file really carries the call
        assert b"system" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with pytest.raises(UserError, match="refusing to load '(posix|os|nt)\\.system'"):
        load_torch_file(str(tmp_path / "evil.bin"))
    assert not marker.exists()


def test_plain_pickle_and_garbage_are_refused(tmp_path):
    (tmp_path / "old.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="not a readable PyTorch zip"):
        load_torch_file(str(tmp_path / "old.bin"))


def test_convert_cli_ip_adapter(torch_pipe, tmp_path, capsys):
    from convert.__main__ import main
    from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter
    from ip_fixtures import VARIANTS, make_adapter_repo
    from ipadapter_mlx.ip_adapter import IPAdapter, IPAdapterConfig
    from ipadapter_mlx.loading import read_json

    repo = make_adapter_repo(tmp_path / "h94", torch_pipe.unet)
    for variant in ("plus", "vit-g"):
        out = tmp_path / f"{variant}-mlx"
        assert main([str(repo / "models" / VARIANTS[variant][0]), str(out)]) == 0
        adapter = IPAdapter(IPAdapterConfig.from_dict(read_json(out / "ip_adapter" / "config.json")))
        adapter.load_weights(str(out / "ip_adapter" / "model.safetensors"))  # strict: every parameter filled
        assert read_ip_adapter(out).config == read_ip_adapter(repo / "models" / VARIANTS[variant][0]).config
    assert main([str(repo / "models" / VARIANTS["plus"][0]), str(tmp_path / "plus-mlx")]) == 2
    assert "already exists" in capsys.readouterr().err
