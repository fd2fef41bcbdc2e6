"""LoRAs: kohya/A1111 and diffusers/PEFT files on tiny SD 1.x and SDXL pipelines against diffusers with the same
deltas fused into its modules; exact unload; quantized models; one line for each bad input."""

from dataclasses import replace

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from mlx.utils import tree_flatten
from safetensors.torch import save_file

from conftest import psnr, record, write_tokenizer
from ipadapter_mlx import StableDiffusion, UserError
from ipadapter_mlx.lora import Lora, LoraLayer
from lora_fixtures import (CONV_BLOCKS, TEXT_BLOCKS, TRANSFORMER, fuse_into, kohya_file, kohya_targets, peft_layers,
                           random_layer)
from test_pipeline import torch_noise
from test_sdxl import SDXL_SCHEDULER, UNET as SDXL_UNET, make_sdxl_pipeline

H = W = 32
STEPS = 4


def make_layers(pipe, component: str, classes, conv: bool, rank: int, alpha, seed: int):
    g = torch.Generator().manual_seed(seed)
    model = getattr(pipe, component)
    return [random_layer(component, path, m, rank, alpha, g) for path, m in kohya_targets(model, classes, conv)]


def diffusers_modules(file, unet_config=None) -> set[str]:
    """Which modules diffusers' own reader (lora_state_dict, then its PEFT key conversion) finds in a file: the
    file is in the layout diffusers knows."""
    sd, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(file), unet_config=unet_config)
    out = set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(component) + 1:]: v for k, v in sd.items() if k.startswith(component + ".")}
        if not part:
            continue
        part = (convert_unet_state_dict_to_peft(part) if component == "unet"
                else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))
        out |= {f"{component}:{k.rsplit('.lora_A', 1)[0].removeprefix('text_model.')}" for k in part
                if ".lora_A" in k}
    return out


def truth_modules(layers) -> set[str]:
    return {f"{la.component}:{la.path.removeprefix('text_model.')}" for la in layers}


def latents() -> torch.Tensor:
    return torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))


def run_ours(ours) -> np.ndarray:
    return np.array(ours.generate("a fox", negative_prompt="blurry", steps=STEPS, cfg=6.0, height=H, width=W,
                                  scheduler="euler", latents=latents().numpy(),
                                  noise=torch_noise(torch.Generator().manual_seed(2)), return_array=True))


def run_both(ref, ours, sdxl: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The same generation (euler, CFG with a negative prompt: both text branches) by diffusers and by us."""
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER if sdxl else ref.scheduler.config)
    expected = ref("a fox", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=6.0, height=H,
                   width=W, latents=latents(), generator=torch.Generator().manual_seed(2), output_type="np").images
    return run_ours(ours), expected


def weights(pipe) -> dict[str, np.ndarray]:
    models = {"unet": pipe.unet, **{n: pipe.text_model(n) for n in pipe.text_encoder_names}}
    return {f"{c}.{k}": np.array(v) for c, m in models.items() for k, v in tree_flatten(m.parameters())}


# -- SD 1.x ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15(diffusers_dir, mlx_dir):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    style = (make_layers(ref, "unet", TRANSFORMER, False, 4, 2.0, 10)
             + make_layers(ref, "text_encoder", TEXT_BLOCKS, False, 4, 8.0, 11))
    locon = make_layers(ref, "unet", TRANSFORMER + CONV_BLOCKS, True, 3, 1.5, 12)
    return ref, style, locon


def test_kohya_sd15_two_loras_and_locon(sd15, diffusers_dir, mlx_dir, tmp_path):
    _, style, locon = sd15
    save_file(kohya_file(style), tmp_path / "style.safetensors")
    torch.save(kohya_file(locon), tmp_path / "locon.pt")  # a torch pickle, through the restricted unpickler
    assert diffusers_modules(tmp_path / "style.safetensors") == truth_modules(style)
    assert any(la.down.shape[2:] == (3, 3) for la in locon)  # 3x3 convolutions: a real LoCon

    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    base = run_ours(ours)
    fuse_into(ref, style, 0.8)
    fuse_into(ref, locon, -0.6)
    assert ours.load_lora(str(tmp_path / "style.safetensors"), 0.8) == 0
    assert ours.load_lora(str(tmp_path / "locon.pt"), scale=-0.6) == 1
    got, expected = run_both(ref, ours)
    assert psnr(base, expected) < 30  # the LoRAs change the picture
    assert record("LoRA SD 1.5 kohya + LoCon (.pt), scales 0.8 / -0.6", psnr(got, expected), "dB") >= 40


def test_peft_sd15_with_alpha_pattern(sd15, diffusers_dir, mlx_dir, tmp_path):
    _, style, _ = sd15
    # diffusers' own writer, with the LoraConfig it stores: lora_alpha 6 (r 4), attn2.to_k at alpha 2
    style = [replace(la, alpha=2.0 if la.path.endswith("attn2.to_k") else 6.0 if la.component == "unet" else 4.0)
             for la in style]
    layers = peft_layers(style)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 6, "alpha_pattern": {"attn2.to_k": 2}},
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 4}, safe_serialization=True)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert diffusers_modules(file) == truth_modules(style)

    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    fuse_into(ref, style, 0.7)
    ours.load_lora(str(file), 0.7)
    got, expected = run_both(ref, ours)
    assert record("LoRA SD 1.5 PEFT (diffusers' save, alpha pattern), scale 0.7", psnr(got, expected), "dB") >= 40


# -- SDXL --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    path = tmp_path_factory.mktemp("sdxl-lora")
    make_sdxl_pipeline(SDXL_UNET, write_tokenizer(tmp_path_factory.mktemp("tok"))).save_pretrained(path)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    layers = (make_layers(ref, "unet", TRANSFORMER + CONV_BLOCKS, True, 4, 3.0, 20)
              + make_layers(ref, "text_encoder", TEXT_BLOCKS, False, 4, 2.0, 21)
              + make_layers(ref, "text_encoder_2", TEXT_BLOCKS, False, 2, 1.0, 22))
    return path, convert_diffusers_folder(path, tmp_path_factory.mktemp("mlx") / "xl"), layers


def test_kohya_and_peft_sdxl(sdxl, tmp_path):
    path, mlx_path, layers = sdxl
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    # kohya names SDXL's UNet in the original layout (input_blocks...): diffusers maps it back the same way
    save_file(kohya_file(layers, sdxl=True, unet_config=ref.unet.config), tmp_path / "xl_kohya.safetensors")
    assert diffusers_modules(tmp_path / "xl_kohya.safetensors", ref.unet.config) == truth_modules(layers)
    second = [replace(la, alpha=None) for la in layers if "attn" in la.path]  # no metadata: alpha = r
    peft = peft_layers(second)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=peft["unet"], text_encoder_lora_layers=peft["text_encoder"],
        text_encoder_2_lora_layers=peft["text_encoder_2"], safe_serialization=True)

    ours = StableDiffusion(mlx_path, dtype=mx.float32)
    base = run_ours(ours)
    fuse_into(ref, layers, 0.9)
    fuse_into(ref, second, 0.4)
    ours.load_lora(str(tmp_path / "xl_kohya.safetensors"), 0.9)
    ours.load_lora(str(tmp_path / "pytorch_lora_weights.safetensors"), 0.4)
    got, expected = run_both(ref, ours, sdxl=True)
    assert psnr(base, expected) < 30
    assert record("LoRA SDXL kohya (te1, te2, LoCon) + PEFT, scales 0.9 / 0.4", psnr(got, expected), "dB") >= 40


# -- unload, scales, quantized, low memory ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(sd15, tmp_path_factory):
    _, style, locon = sd15
    folder = tmp_path_factory.mktemp("loras")
    save_file(kohya_file(style), folder / "style.safetensors")
    save_file(kohya_file(locon), folder / "locon.safetensors")
    return folder / "style.safetensors", folder / "locon.safetensors"


@pytest.fixture(scope="module")
def stored_q8(diffusers_dir, tmp_path_factory):
    """A folder converted with --quantize 8: the quantized arrays are in its files."""
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    return convert_diffusers_folder(diffusers_dir, tmp_path_factory.mktemp("q8") / "sd", quantize=(8, 32))


@pytest.mark.parametrize("dtype,quantize", [(mx.float16, None), (mx.float32, (8, 32)), (mx.float16, (4, 32)),
                                            (mx.float16, "stored")])
def test_unload_restores_every_bit(request, mlx_dir, files, dtype, quantize):
    """Originals are rebuilt from the weights file as loading made them: cast, quantized on load or stored so."""
    if quantize == "stored":
        pipe = StableDiffusion(request.getfixturevalue("stored_q8"), dtype=dtype)
        assert "scales" in pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    else:
        pipe = StableDiffusion(mlx_dir, dtype=dtype, quantize=quantize)
    before = weights(pipe)
    pipe.load_lora(str(files[0]), 0.8)
    pipe.load_lora(str(files[1]), -1.3)
    changed = weights(pipe)
    assert sum(not np.array_equal(before[k], changed[k]) for k in before) > 50
    pipe.set_lora_scale(0.3, 2.0)
    pipe.unload_lora(0)
    pipe.unload_lora(str(files[1]))  # by the ref it was loaded with
    after = weights(pipe)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_kept_originals_without_a_file():
    """A model with no weights file (built in code): the fused layers' originals are kept, and come back."""
    from ipadapter_mlx.lora import LoraSet

    import mlx.nn as nn

    model = nn.Sequential(nn.Linear(64, 48), nn.Conv2d(8, 6, 3))
    model.set_dtype(mx.float16)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    loras = LoraSet()
    loras.add(Lora("a", {"unet": {"layers.0": LoraLayer(mx.random.normal((4, 64)), mx.random.normal((48, 4)), 2.0),
                                  "layers.1": LoraLayer(mx.random.normal((2, 3, 3, 8)), mx.random.normal((6, 2)))}}),
              0.7)
    loras.apply("unet", model)
    assert not np.array_equal(np.array(model.layers[1].weight), before["layers.1.weight"])
    loras.set_scales(-0.2)
    loras.apply("unet", model)
    loras.remove(0)
    loras.apply("unet", model)
    assert all(np.array_equal(np.array(v), before[k]) for k, v in tree_flatten(model.parameters()))


def test_scale_change_equals_fresh_load(mlx_dir, files):
    a = StableDiffusion(mlx_dir, dtype=mx.float32)
    a.load_lora(str(files[0]), 1.0)
    a.load_lora(str(files[1]), 1.0)
    a.set_lora_scale(0.25, -0.5)
    b = StableDiffusion(mlx_dir, dtype=mx.float32)
    b.load_lora(str(files[0]), 0.25)
    b.load_lora(str(files[1]), -0.5)
    wa, wb = weights(a), weights(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_low_memory_reloads_fused_encoders(mlx_dir, files):
    """Low-memory mode frees the text encoder after each prompt and loads the UNet late: both get the LoRA."""
    normal = StableDiffusion(mlx_dir, dtype=mx.float32)
    low = StableDiffusion(mlx_dir, dtype=mx.float32, low_memory=True)
    for pipe in (normal, low):
        pipe.load_lora(str(files[0]), 0.8)
    kw = dict(steps=2, cfg=5.0, height=H, width=W, seed=3, return_array=True)
    a = [np.array(normal.generate("a fox", **kw)) for _ in range(2)]
    b = [np.array(low.generate("a fox", **kw)) for _ in range(2)]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_quantized_model_error(mlx_dir, files):
    """Dequantize, fuse, quantize again: measured against the float model with the same LoRA."""
    kw = dict(steps=STEPS, cfg=6.0, height=H, width=W, seed=5, return_array=True)
    results = {}
    for q in (None, (8, 32)):
        pipe = StableDiffusion(mlx_dir, dtype=mx.float32, quantize=q)
        base = np.array(pipe.generate("a fox", **kw))
        pipe.load_lora(str(files[0]), 0.8)
        results[q] = base, np.array(pipe.generate("a fox", **kw))
    quant_error = psnr(results[(8, 32)][0], results[None][0])  # quantization alone
    lora_error = record("LoRA on an 8-bit model vs float (PSNR)", psnr(results[(8, 32)][1], results[None][1]), "dB")
    assert lora_error >= 40 and lora_error >= quant_error - 6


def test_lora_built_in_code(mlx_dir):
    """The API other features (FaceID) build on: a Lora from arrays, by module path."""
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    w = np.array(q.weight)
    down, up = mx.random.normal((2, w.shape[1])), mx.random.normal((w.shape[0], 2))
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    pipe.load_lora(Lora("faceid", {"unet": {path: LoraLayer(down, up, alpha=1.0)}}), scale=0.5)
    expected = w + 0.5 * 0.5 * np.array(up) @ np.array(down)
    assert np.abs(np.array(q.weight) - expected).max() < 1e-5
    with pytest.raises(UserError, match=r"down \(2, 7\) and up"):
        pipe.load_lora(Lora("bad", {"unet": {path: LoraLayer(mx.zeros((2, 7)), up)}}))


# -- bad input: one line each --------------------------------------------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def pipe(mlx_dir):
    return StableDiffusion(mlx_dir, dtype=mx.float32)


def test_sdxl_lora_on_sd15_names_both(pipe, sdxl, tmp_path):
    path, _, layers = sdxl
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    save_file(kohya_file(layers, sdxl=True, unet_config=ref.unet.config), tmp_path / "xl.safetensors")
    with pytest.raises(UserError) as e:
        pipe.load_lora(str(tmp_path / "xl.safetensors"))
    message = one_line(e)
    assert "is for an SDXL-style model (cross-attention width 64, two text encoders)" in message
    assert "the model is an SD-style model (cross-attention width 32, one text encoder)" in message
    assert len(pipe.loras) == 0


def bad_file(tmp_path, tensors: dict, name="bad.safetensors"):
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("tensors,expected", [
    ({"down_blocks.0.attentions.0.proj_in.weight": torch.zeros(32, 32)}, r"is not a LoRA: no lora_down"),
    ({"lora_unet_down_blocks_0_attentions_0_nothing.lora_down.weight": torch.zeros(2, 32),
      "lora_unet_down_blocks_0_attentions_0_nothing.lora_up.weight": torch.zeros(32, 2)},
     r"1 layers name no layer of this model: unet:down_blocks_0_attentions_0_nothing"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1), "extra.weight": torch.zeros(1)},
     r"1 keys are not LoRA weights: extra.weight"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, r"without both down and up weights"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)},
     r"unet conv_in has down \(2, 3, 3, 5\) and up \(32, 2\); the layer's weight is \(32, 3, 3, 4\)"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, r"a LoHa file"),
    ({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1),
      "unet.conv_in.lora_magnitude_vector": torch.zeros(32)}, r"a DoRA file \(unet.conv_in.lora_magnitude_vector\)"),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(48, 2)}, r"two text encoders"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
      "lora_unet_conv_in.alpha": torch.tensor(float("nan"))}, r"alpha must be a finite number"),
    ({"lora_unet_conv_in.lora_down.weight": torch.full((2, 4, 3, 3), float("inf")),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, r"weights hold NaN/Inf in 1 layers: unet conv_in"),
])
def test_bad_files(pipe, tmp_path, tensors, expected):
    before = weights(pipe)
    with pytest.raises(UserError, match=expected) as e:
        pipe.load_lora(bad_file(tmp_path, tensors))
    one_line(e)
    after = weights(pipe)
    assert len(pipe.loras) == 0 and all(np.array_equal(before[k], after[k]) for k in before)


def test_bad_refs(pipe, tmp_path):
    for ref, expected in [(str(tmp_path / "none.safetensors"), "neither a file nor a REPO:PATH"),
                          ("someone/loras:x.safetensors", "someone/loras:x.safetensors: not in the local Hub cache")]:
        with pytest.raises(UserError, match=expected) as e:
            pipe.load_lora(ref)
        one_line(e)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable LoRA file") as e:
        pipe.load_lora(str(tmp_path / "junk.safetensors"))
    with pytest.raises(UserError, match="LoRA scale must be a finite number"):
        pipe.load_lora(str(tmp_path / "junk.safetensors"), float("inf"))
    with pytest.raises(UserError, match="no LoRA 3: 0 loaded"):
        pipe.unload_lora(3)
    with pytest.raises(UserError, match="1 scales for 0 loaded LoRAs"):
        pipe.set_lora_scale(1.0)


# -- the command line ----------------------------------------------------------------------------------------------

def test_cli_lora(mlx_dir, files, tmp_path, capsys):
    import json

    from PIL import Image

    from ipadapter_mlx.cli import main

    out = tmp_path / "fox.png"
    args = ["generate", "--model", str(mlx_dir), "--prompt", "a fox", "--steps", "2", "--height", str(H), "--width",
            str(W), "--seed", "7", "--dtype", "float32", "--output", str(out)]
    assert main(args + ["--lora", f"{files[0]}:0.8", "--lora", str(files[1])]) == 0
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_lora(str(files[0]), 0.8)
    pipe.load_lora(str(files[1]))
    expected = pipe.generate("a fox", steps=2, height=H, width=W, seed=7)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    meta = json.loads(Image.open(out).text["ipadapter_mlx"])
    assert meta["loras"] == [{"lora": str(files[0]), "scale": 0.8}, {"lora": str(files[1]), "scale": 1.0}]

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args + ["--lora", f"{files[0]}:strong"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: argument --lora: the scale 'strong' of '{files[0]}:strong' is not a number")
    assert main(args + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: LoRA not found: {tmp_path / 'missing.safetensors'} is neither a file nor a REPO:PATH"


def test_lora_arg():
    from ipadapter_mlx.cli import lora_arg

    assert lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_arg("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert lora_arg("org/loras:sub/style.safetensors") == ("org/loras:sub/style.safetensors", 1.0)
    assert lora_arg("org/loras:sub/style.safetensors:-1.5") == ("org/loras:sub/style.safetensors", -1.5)


def test_memory_estimate_counts_the_lora(mlx_dir, files):
    """Fused in place: the estimate grows by the LoRA's own tensors only."""
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    before = pipe.estimate_memory(H, W)
    pipe.load_lora(str(files[0]))
    lora_bytes = pipe.loras[0].lora.nbytes
    assert lora_bytes > 0 and pipe.estimate_memory(H, W) - before == lora_bytes


def test_with_an_ip_adapter(sd15, diffusers_dir, mlx_dir, files, torch_pipe, tmp_path_factory):
    """A LoRA and an IP-Adapter together, against diffusers' load_ip_adapter pipeline with the LoRA fused."""
    from ip_fixtures import VARIANTS, make_adapter_repo
    from ipadapter_mlx import ImagePrompt
    from test_ip_adapter import diffusers_pipe, reference_image

    _, style, _ = sd15
    repo = make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)
    variant = next(iter(VARIANTS))
    image = reference_image(1)
    ref = diffusers_pipe(diffusers_dir, repo, [variant], [0.7])
    fuse_into(ref, style, 0.8)
    expected = ref("a cat", ip_adapter_image=[image], num_inference_steps=STEPS, guidance_scale=6.0, height=H,
                   width=W, latents=latents(), output_type="np").images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(repo / "models" / VARIANTS[variant][0]))
    ours.load_lora(str(files[0]), 0.8)
    got = ours.generate("a cat", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=latents().numpy(),
                        image_prompts=[ImagePrompt(images=[image], scale=0.7)], return_array=True)
    assert record(f"LoRA + IP-Adapter {variant}, SD 1.5", psnr(np.array(got), expected), "dB") >= 40


def test_cli_lora_from_the_hub_cache(mlx_dir, files, tmp_path):
    """--lora REPO:PATH:SCALE resolves through the Hub cache (offline), as IP-Adapter refs do."""
    import os
    import shutil

    from PIL import Image

    from test_cli import hub_cache, run_cli

    repo_files = tmp_path / "repo"
    (repo_files / "styles").mkdir(parents=True)
    shutil.copy(files[0], repo_files / "styles" / "style.safetensors")
    hub_cache(tmp_path / "hf", "someone/loras", repo_files)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.png"
    result = run_cli(["generate", "--model", str(mlx_dir), "--prompt", "a fox", "--steps", "2", "--height", str(H),
                      "--width", str(W), "--seed", "7", "--dtype", "float32", "--output", str(out),
                      "--lora", "someone/loras:styles/style.safetensors:0.8"], env)
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_lora(str(files[0]), 0.8)
    expected = pipe.generate("a fox", steps=2, height=H, width=W, seed=7)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_older_diffusers_format(sd15, mlx_dir, tmp_path):
    """The pre-PEFT diffusers layout (attn1.processor.to_q_lora.down, self_attn.to_q_lora, lora_linear_layer,
    lora.down), as diffusers' own converter writes it from a kohya file: the same weights as the kohya file."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    _, style, _ = sd15
    kohya = kohya_file([replace(la, alpha=None) for la in style])
    old, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert any(".processor.to_out_lora.down." in k for k in old) and any("self_attn.to_q_lora" in k for k in old)
    save_file(kohya, tmp_path / "kohya.safetensors")
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "old.safetensors")
    a, b = StableDiffusion(mlx_dir, dtype=mx.float32), StableDiffusion(mlx_dir, dtype=mx.float32)
    a.load_lora(str(tmp_path / "kohya.safetensors"), 0.8)
    b.load_lora(str(tmp_path / "old.safetensors"), 0.8)
    wa, wb, base = weights(a), weights(b), weights(StableDiffusion(mlx_dir, dtype=mx.float32))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert sum(not np.array_equal(wa[k], base[k]) for k in wa) == len(style)


def test_family_check_reads_quantized_widths_and_leaves_bad_shapes_to_the_shape_check(mlx_dir):
    """The family check compares cross-attention input widths: on a quantized UNet those are the unpacked widths
    (the packed weight is 32/bits times narrower), and a LoRA sharing the model's width with one malformed layer
    is a shape error naming that layer, not a family mismatch."""
    import mlx.nn as nn

    from ipadapter_mlx.loading import build, read_json
    from ipadapter_mlx.lora import check_family

    unet = build("unet", read_json(mlx_dir / "unet" / "config.json"))
    width = unet.config.cross_attention_dim[0]
    nn.quantize(unet, group_size=32, bits=4)
    models = {"unet": unet, "text_encoder": None}
    check_family("fits", {"unet"}, {width}, models)  # no error: 4-bit packing must not look like another family
    check_family("one malformed layer", {"unet"}, {width, width // 2}, models)
    with pytest.raises(UserError, match=rf"is for SDXL .*2048.*; the model is .*width {width}, one text encoder"):
        check_family("xl", {"unet", "text_encoder_2"}, {2048}, models)
