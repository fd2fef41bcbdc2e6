"""What an attacker's pass over the CLI found: configs that declare absurd sizes, --force on the wrong folder,
integer weights, stale cache keys, unbounded steps, lying .npy headers, late output failures, odd images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from ipadapter_mlx import StableDiffusion, UserError
from ipadapter_mlx.cli import main


def one_error(code, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)


@pytest.fixture
def generate(tmp_path, capsys):
    def go(model, *extra):
        code = main(["generate", "--model", str(model), "--steps", "1", "--height", "32", "--width", "32",
                     "--output", str(tmp_path / "out.png"), *extra])
        return code, capsys.readouterr().err
    return go


def edited_copy(mlx_dir: Path, tmp_path: Path, component: str, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(mlx_dir, folder)
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.mark.parametrize("component, changes, words", [
    ("unet", {"layers_per_block": 1_000_000_000}, ["layers_per_block", "0..256"]),
    ("unet", {"cross_attention_dim": "abc"}, ["UNetConfig", "invalid literal"]),
    ("unet", {"norm_eps": "x"}, ["norm_eps", "expected float"]),
    ("text_encoder", {"max_position_embeddings": 1e12}, ["max_position_embeddings", "expected int"]),
    ("vae", {"layers_per_block": "abc"}, ["layers_per_block"]),
])
def test_hostile_config_is_one_line(mlx_dir, tmp_path, generate, component, changes, words):
    """A number in config.json decides how many modules are built: bounded, checked, refused in one line
    (layers_per_block=1e9 built modules for minutes, growing past 9 GB)."""
    code, err = generate(edited_copy(mlx_dir, tmp_path, component, **changes))
    one_error(code, err, *words)


def test_integer_weights_are_refused(mlx_dir, tmp_path, generate):
    """int32 where the model has floats would load as zeros and give a wrong picture with exit 0."""
    folder = tmp_path / "ints"
    shutil.copytree(mlx_dir, folder)
    weights = mx.load(str(folder / "unet" / "model.safetensors"))
    weights["conv_in.weight"] = weights["conv_in.weight"].astype(mx.int32)
    mx.save_safetensors(str(folder / "unet" / "model.safetensors"), weights)
    code, err = generate(folder)
    one_error(code, err, "wrong dtype", "conv_in.weight")


def test_fit_weights_refuses_integer_tensors():
    import mlx.nn as nn

    from ipadapter_mlx.checkpoints.weights import fit_weights

    with pytest.raises(UserError, match="weight holds mlx.core.int32 values, the model needs mlx.core.float32"):
        fit_weights(nn.Linear(2, 3), {"weight": mx.zeros((3, 2), mx.int32), "bias": mx.zeros((3,))}, what="m")


def test_force_replaces_only_converted_folders(mlx_dir, tmp_path, capsys):
    from convert.__main__ import main as convert_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code = convert_main([str(mlx_dir / "unet"), str(mine), "--force"])
    one_error(code, capsys.readouterr().err, "not a converted MLX folder")
    assert (mine / "notes.txt").read_text() == "precious"
    for out in ("", ".", ".."):
        one_error(convert_main([str(mine), out, "--force"]), capsys.readouterr().err, "not a folder to write")
    src = tmp_path / "outer" / "src"
    src.mkdir(parents=True)
    one_error(convert_main([str(src), str(tmp_path / "outer"), "--force"]), capsys.readouterr().err,
              "holds the source")
    assert src.is_dir()


def test_cache_key_follows_config_and_resolved_path(tmp_path, monkeypatch):
    """A single file converted with another --config is another conversion; the same file named two ways is
    the same one."""
    from ipadapter_mlx.cache import _local_fingerprint

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _local_fingerprint(Path("m.safetensors")) == _local_fingerprint(f)
    assert _local_fingerprint(f, "config=a") != _local_fingerprint(f, "config=b")


def test_steps_bounded_by_the_schedule(mlx_pipe, mlx_dir, generate):
    with pytest.raises(UserError, match=r"steps must be in 1\.\.1000"):
        mlx_pipe.generate_latents("x", steps=1001, height=16, width=16)
    one_error(*generate(mlx_dir, "--steps", "1000000"), "steps must be in 1..1000")


def test_api_inputs_are_user_errors(mlx_pipe):
    for kw, words in (({"num_images": 0}, "num_images"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
                      ({"strength": 0.5}, "init_image")):
        with pytest.raises(UserError, match=words):
            mlx_pipe.generate_latents("x", steps=1, height=16, width=16, **kw)


def test_latents_header_lying_about_its_size(mlx_dir, tmp_path, generate):
    """A 200-byte .npy declaring petabytes: refused from the header, nothing allocated."""
    np.save(tmp_path / "ok.npy", np.ones((1, 4, 2, 2), np.float32))
    data = (tmp_path / "ok.npy").read_bytes().replace(b"(1, 4, 2, 2)", b"(100000, 4, 100000, 100000)")
    (tmp_path / "lie.npy").write_bytes(data)
    one_error(*generate(mlx_dir, "--latents", str(tmp_path / "lie.npy")), "cannot read --latents")


def test_every_output_name_checked_before_sampling(mlx_dir, tmp_path, generate):
    (tmp_path / "out_2.png").mkdir()
    one_error(*generate(mlx_dir, "--num-images", "2"), "out_2.png is a folder")
    assert not (tmp_path / "out_1.png").exists()


def test_image_encoder_given_a_file(tmp_path):
    from ipadapter_mlx.discovery import _parse_encoder_ref

    (tmp_path / "plain.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file; give its folder"):
        _parse_encoder_ref(str(tmp_path / "plain.jpg"))


def test_float_and_32_bit_images_keep_their_range(tmp_path):
    from ipadapter_mlx.images import open_image

    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(tmp_path / "f.tiff")
    assert abs(np.asarray(open_image(tmp_path / "f.tiff")).mean() - 127.5) <= 1  # not black
    ramp = np.linspace(0, 1_000_000, 64, dtype=np.int32).reshape(8, 8)
    Image.fromarray(ramp, mode="I").save(tmp_path / "i.tiff")
    got = np.asarray(open_image(tmp_path / "i.tiff"))[..., 0].astype(float)
    assert np.abs(got - ramp / 1_000_000 * 255).max() <= 1  # stretched, not white


def test_adapter_bin_recognised_by_content_not_name(tmp_path):
    """A tencent-format adapter renamed `mystyle.bin` is still converted as an adapter."""
    torch = pytest.importorskip("torch")
    from convert.__main__ import is_ip_adapter_file

    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}},
               tmp_path / "mystyle.bin")
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}}, tmp_path / "ip-adapter-model.bin")
    assert is_ip_adapter_file(tmp_path / "mystyle.bin")
    assert not is_ip_adapter_file(tmp_path / "ip-adapter-model.bin")


def test_name_sniffing_survives_broken_zips(tmp_path, capsys):
    """convert tells the kind of a file from the tensor names in its zip; a deflated member that does not inflate
    or a member flagged as encrypted is 'not this kind', and the converter that takes it says why in one line."""
    import zipfile

    from convert.__main__ import main as convert
    from ipadapter_mlx.loading import holds_tensors

    corrupt = tmp_path / "corrupt.pth"
    with zipfile.ZipFile(corrupt, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"input_hint_block." * 1000)
    data = bytearray(corrupt.read_bytes())
    start = data.find(b"archive/data.pkl") + len("archive/data.pkl")
    data[start + 5 : start + 40] = bytes(b ^ 0x5A for b in data[start + 5 : start + 40])
    corrupt.write_bytes(bytes(data))
    locked = tmp_path / "locked.pth"
    with zipfile.ZipFile(locked, "w") as z:
        z.writestr("archive/data.pkl", b"input_hint_block.")
    data = bytearray(locked.read_bytes())
    for header, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the 'encrypted' bit, local and central
        at = data.find(header)
        data[at + flags] |= 1
    locked.write_bytes(bytes(data))
    for path in (corrupt, locked):
        assert holds_tensors(path, "input_hint_block.") is False
        assert convert([str(path), str(tmp_path / f"out-{path.stem}")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_ip_adapter_safetensors_told_by_its_own_names(tmp_path):
    """An IP-Adapter .safetensors holding only `ip_adapter.*` tensors is still one (convert routes it there)."""
    from safetensors.numpy import save_file

    from convert.__main__ import is_ip_adapter_file

    save_file({"ip_adapter.1.to_k_ip.weight": np.zeros((2, 2), np.float32)}, tmp_path / "only.safetensors")
    save_file({"model.diffusion_model.x": np.zeros(2, np.float32)}, tmp_path / "model.safetensors")
    assert is_ip_adapter_file(tmp_path / "only.safetensors")
    assert not is_ip_adapter_file(tmp_path / "model.safetensors")


def test_wide_pictures_downsample_masks_without_dividing_by_zero():
    """A level of 32 positions for a 64:1 picture: at least one mask row (diffusers' rule would divide by 0)."""
    from ipadapter_mlx.conditioning import downsample_mask

    out = downsample_mask(np.ones((8, 512), np.float32), 32)
    assert out.size == 32 and np.all(out == 1)  # one weight per position of that level


def test_cpu_kernels_take_empty_arrays():
    from ipadapter_mlx.models import cpu

    assert cpu.silu(mx.zeros((0, 4))).shape == (0, 4) and cpu.gelu(mx.zeros((0,))).shape == (0,)
