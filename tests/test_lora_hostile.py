"""Hostile LoRA / FaceID files: each gets one UserError line naming what is wrong, in bounded time."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from ipadapter_mlx import StableDiffusion, UserError
from ipadapter_mlx.faceid import lora_of, read_face_embeds
from ipadapter_mlx.lora import read_lora

PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
K = "lora_unet_" + PATH.replace(".", "_")  # kohya's name of the same layer


@pytest.fixture(scope="module")
def pipe(mlx_dir):
    return StableDiffusion(mlx_dir, dtype=mx.float32)


@pytest.fixture(scope="module")
def models(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def to_k_shape(pipe) -> tuple[int, int]:
    return tuple(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.shape)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\x1b" not in message
    return message


def write(tmp_path, tensors: dict, metadata: dict | None = None, name="bad.safetensors") -> str:
    mx.save_safetensors(str(tmp_path / name), {k: mx.array(v) for k, v in tensors.items()}, metadata=metadata)
    return str(tmp_path / name)


def peft(pipe, rank=4) -> dict:
    out, width = to_k_shape(pipe)
    return {f"unet.{PATH}.lora_A.weight": np.ones((rank, width), np.float32),
            f"unet.{PATH}.lora_B.weight": np.ones((out, rank), np.float32)}


# -- diffusers' lora_adapter_metadata: JSON object, finite positive alphas, patterns as plain module suffixes ----

@pytest.mark.parametrize("raw,expected", [
    ("[1,2]", "lora_adapter_metadata is a JSON list, expected an object"),
    ("[" * 100000 + "]" * 100000, "lora_adapter_metadata is not JSON"),  # json.loads' RecursionError
    ("{", "lora_adapter_metadata is not JSON"),
    (json.dumps({"unet.lora_alpha": "abc"}), "unet.lora_alpha must be a finite positive number, got 'abc'"),
    (json.dumps({"unet.lora_alpha": [1]}), r"unet.lora_alpha must be a finite positive number, got \[1\]"),
    (json.dumps({"unet.lora_alpha": True}), "unet.lora_alpha must be a finite positive number, got True"),
    (json.dumps({"unet.lora_alpha": -2}), "unet.lora_alpha must be a finite positive number, got -2"),
    ('{"unet.lora_alpha": NaN}', "unet.lora_alpha must be a finite positive number, got nan"),
    ('{"unet.lora_alpha": 1' + "0" * 400 + "}", "unet.lora_alpha must be a finite positive number"),  # float() overflows
    (json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": [1]}), "unet.alpha_pattern is a JSON list"),
    (json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_k": "x"}}),
     r"unet.alpha_pattern\[to_k\] must be a finite positive number, got 'x'"),
])
def test_bad_metadata(pipe, models, tmp_path, raw, expected):
    with pytest.raises(UserError, match=expected) as e:
        read_lora(write(tmp_path, peft(pipe), {"lora_adapter_metadata": raw}), models)
    one_line(e)


@pytest.mark.parametrize("pattern,alpha", [
    ({"attn2.to_k": 2}, 2.0),  # a module-path suffix at a '.' boundary
    ({PATH: 3}, 3.0),  # the whole path
    ({"n2.to_k": 2}, 4.0),  # not at a '.' boundary
    ({"to_.": 2}, 4.0),  # a regex would match; keys are literal
    ({"(": 2}, 4.0),  # not a valid regex: simply matches nothing
    ({"(a+)+b|" + "(.*)*" * 8 + "z": 2}, 4.0),  # catastrophic backtracking as a regex: never run as one
])
def test_alpha_pattern_is_literal(pipe, models, tmp_path, pattern, alpha):
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": pattern})}
    lora = read_lora(write(tmp_path, peft(pipe), meta, "ok.safetensors"), models)
    assert lora.layers["unet"][PATH].alpha == alpha


# -- weights: 2-d (Linear) or 4-d (conv), floating point, checked before any shape is read; names escaped ---------

@pytest.mark.parametrize("down,up,expected", [
    (np.array(1, np.float32), None, rf"{K}.lora_down.weight is \(\), expected 2-d or 4-d"),
    (np.ones(7, np.float32), None, rf"{K}.lora_down.weight is \(7,\), expected 2-d or 4-d"),
    (None, np.array(1, np.float32), rf"{K}.lora_up.weight is \(\), expected 2-d or 4-d"),
    ("int8", "int8", rf"{K}.lora_down.weight weights are int8; a LoRA's are floating point"),
    ("bool", "bool", rf"{K}.lora_down.weight weights are bool; a LoRA's are floating point"),
])
def test_bad_weights(pipe, models, tmp_path, down, up, expected):
    out, width = to_k_shape(pipe)
    good = {"down": np.ones((4, width), np.float32), "up": np.ones((out, 4), np.float32)}
    down = good["down"].astype(down) if isinstance(down, str) else good["down"] if down is None else down
    up = good["up"].astype(up) if isinstance(up, str) else good["up"] if up is None else up
    with pytest.raises(UserError, match=expected) as e:
        read_lora(write(tmp_path, {f"{K}.lora_down.weight": down, f"{K}.lora_up.weight": up}), models)
    one_line(e)


def test_key_names_escaped(pipe, models, tmp_path):
    out, width = to_k_shape(pipe)
    name = "lora_unet_foo\nerror: fake\x1b[31m"
    tensors = {f"{name}.lora_down.weight": np.ones((4, width), np.float32),
               f"{name}.lora_up.weight": np.ones((out, 4), np.float32)}
    with pytest.raises(UserError, match=r"name no layer of this model: 'unet:foo\\nerror: fake\\x1b\[31m'") as e:
        read_lora(write(tmp_path, tensors), models)
    one_line(e)


def test_torch_alpha_as_a_number(pipe, models, tmp_path):
    """kohya-era .pt files may hold alpha as a Python float: used (scale alpha / rank), or refused by name."""
    torch = pytest.importorskip("torch")
    out, width = to_k_shape(pipe)
    sd = {f"{K}.lora_down.weight": torch.ones(4, width), f"{K}.lora_up.weight": torch.ones(out, 4), f"{K}.alpha": 2.0}
    torch.save(sd, tmp_path / "a.pt")
    layer = read_lora(tmp_path / "a.pt", models).layers["unet"][PATH]
    assert layer.alpha == 2.0 and layer.scale == 0.5
    for bad in ("x", float("inf"), 10**400, True):
        torch.save({**sd, f"{K}.alpha": bad}, tmp_path / "b.pt")
        with pytest.raises(UserError, match=rf"{K}.alpha is .*, expected a number") as e:
            read_lora(tmp_path / "b.pt", models)
        one_line(e)


# -- FaceID: the adapter file's LoRA (Linear layers only) and embeddings files ----------------------------------

@pytest.mark.parametrize("down,expected", [
    (np.array(1, np.float32), r"ip_adapter.1.to_k_lora.down.weight is \(\), expected 2-d"),
    ("4d", r"ip_adapter.1.to_k_lora.down.weight is \(4, \d+, 1, 1\), expected 2-d"),
    ("int8", "ip_adapter.1.to_k_lora.down.weight weights are int8; a LoRA's are floating point"),
])
def test_faceid_lora_weights(pipe, down, expected):
    out, width = to_k_shape(pipe)
    ok = np.ones((4, width), np.float32)
    down = {"4d": ok[:, :, None, None], "int8": ok.astype(np.int8)}.get(down, down) if isinstance(down, str) else down
    adapter = SimpleNamespace(_lora={"ip_adapter.1.to_k_lora.down.weight": mx.array(down),
                                     "ip_adapter.1.to_k_lora.up.weight": mx.ones((out, 4))})
    with pytest.raises(UserError, match=expected) as e:
        lora_of(adapter, pipe.unet, "FaceID LoRA of x.bin")
    one_line(e)


def test_face_embeds_files(tmp_path):
    np.save(tmp_path / "td.npy", np.ones((1, 512), "timedelta64[s]"))
    np.save(tmp_path / "i.npy", np.ones((1, 512), np.int32))
    for name, dtype in (("td.npy", "timedelta64"), ("i.npy", "int32")):
        with pytest.raises(UserError, match=rf"face embeddings hold {dtype}\S* values; expected floats") as e:
            read_face_embeds(str(tmp_path / name))
        one_line(e)
    crops = np.zeros((1, 16, 16, 3), np.uint8)
    for embeds, c, shapes in [(np.array(1, np.float32), crops, r"\(1, 16, 16, 3\) .* beside face_embeds \(\)"),
                              (np.ones((1, 512), np.float32), crops[:, :0, :0], r"\(1, 0, 0, 3\) .* \(1, 512\)"),
                              (np.ones((1, 512), np.float32), crops[:, :4], r"\(1, 4, 16, 3\) .* \(1, 512\)"),
                              (np.ones((2, 512), np.float32), crops, r"\(1, 16, 16, 3\) .* \(2, 512\)")]:
        path = write(tmp_path, {"face_embeds": embeds, "face_crops": c}, name="f.safetensors")
        with pytest.raises(UserError, match=f"face_crops is {shapes}; expected .* at least 8x8") as e:
            read_face_embeds(path)
        one_line(e)
    path = write(tmp_path, {"face_embeds": np.ones((1, 512), np.float32), "face_crops": crops}, name="g.safetensors")
    embeds, images = read_face_embeds(path)
    assert embeds.shape == (1, 512) and [im.size for im in images] == [(16, 16)]
