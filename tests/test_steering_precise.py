"""ComfyUI_IPAdapter_plus' precise weight types and its style-and-composition with a separate layout image.

The tables against formulas written here from its source (IPAdapterPlus.py `ipadapter_execute`); end to end on an
SDXL UNet of the real layout (11 transformers) against diffusers with the same per-layer scales and, on the layers
where ComfyUI's CrossAttentionPatch swaps the branches (`uncond = cond; cond = cond * 0`) or puts the composition
image (`cond_alt`), the image tokens rewritten that way before diffusers' own IP-Adapter processor sees them."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch

from conftest import psnr, record
from ip_fixtures import SDXL_VARIANTS
from ipadapter_mlx import ImagePrompt, StableDiffusion, steering
from ipadapter_mlx.cli import main
from ipadapter_mlx.errors import UserError
from test_ip_adapter import reference_image
from test_steering import SD15, SDXL
from test_steering_parity import xl11  # noqa: F401 (fixture)


def comfy_precise(weight_type: str, weight: float, boost, is_sdxl: bool) -> tuple[dict, set]:
    """IPAdapterPlus.py (weight dict) and CrossAttentionPatch.py (where the branches swap), by hand."""
    if weight_type == "style transfer precise":
        wc = boost if boost is not None else weight
        w = {3: wc, 6: weight} if is_sdxl else {0: weight, 1: weight, 2: weight, 3: weight, 4: wc * 0.25, 5: wc,
                                                9: weight, 10: weight, 11: weight, 12: weight, 13: weight,
                                                14: weight, 15: weight}
        return w, ({3} if is_sdxl else {4, 5})
    wc, weight = weight, (boost if boost is not None else weight)
    if is_sdxl:
        w = {0: weight * .1, 1: weight * .1, 2: weight * .1, 3: wc, 4: weight * .1, 5: weight * .1, 6: weight,
             7: weight * .1, 8: weight * .1, 9: weight * .1, 10: weight * .1}
        return w, set(range(11)) - {3}
    w = {0: weight, 1: weight, 2: weight, 3: weight, 4: wc * 0.25, 5: wc, 6: weight * .1, 7: weight * .1,
         8: weight * .1, 9: weight, 10: weight, 11: weight, 12: weight, 13: weight, 14: weight, 15: weight}
    return w, set(range(16)) - {4, 5}


@pytest.mark.parametrize("weight_type", steering.PRECISE)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("weight,boost", [(0.8, None), (-0.6, 1.7), (1.0, 0.0)])
def test_precise_tables_follow_comfyui(weight_type, family, weight, boost):
    sites = SDXL if family == "sdxl" else SD15
    want, swapped = comfy_precise(weight_type.replace("-", " "), weight, boost, family == "sdxl")
    rule = steering.scale_rule(sites, weight, weight_type, boost=boost)
    for site in sites:
        got = rule(site, 0, 1.0) if callable(rule) else rule
        assert got == pytest.approx(want.get(site.index, 0.0), abs=1e-12), (site, want, got)
    assert steering.swapped_indices(weight_type, sites) == swapped


# -- end to end against diffusers, tokens rewritten on the swapped / composition layers ----------------------

XL_BLOCKS = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
             "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
             "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "up_blocks.1.attentions.0",
             "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]  # ComfyUI's transformer index 0-10 on SDXL


def diffusers_dict(by_index: dict[int, float]) -> dict:
    """ComfyUI's {index: weight} on SDXL as diffusers' set_ip_adapter_scale dict."""
    w = [by_index.get(i, 0.0) for i in range(11)]
    return {"down": {"block_1": w[0:2], "block_2": w[2:4]}, "mid": w[4],
            "up": {"block_0": w[5:8], "block_1": w[8:11]}}


class Rewrite:
    """Wraps diffusers' IP-Adapter processor of one layer: the image tokens' [uncond, cond] halves become
    [cond, cond * 0] (ComfyUI's swap), or [uncond, alt] (its cond_alt)."""

    def __init__(self, processor, alt=None):
        self.processor, self.alt = processor, alt

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        text, ip = encoder_hidden_states
        t = ip[0]
        b = t.shape[0] // 2
        t = torch.cat([t[b:], t[b:] * 0]) if self.alt is None else torch.cat([t[:b], self.alt])
        return self.processor(attn, hidden_states, (text, [t]), **kwargs)


def run_pair(xl11, by_index, swapped, prompt: ImagePrompt, composition=None, steps=3):  # noqa: F811
    path, mlx_folder, repo = xl11
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    ref.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=SDXL_VARIANTS["sdxl"][0],
                        image_encoder_folder="sdxl_models/image_encoder")
    ref.set_ip_adapter_scale(diffusers_dict(by_index))
    alt = None
    if composition is not None:  # the layout image's tokens, projected as the pipeline projects the style image's
        embeds = ref.prepare_ip_adapter_image_embeds([composition], None, "cpu", 1, True)
        alt = ref.unet.encoder_hid_proj(embeds)[0][1:]
    for i, block in enumerate(XL_BLOCKS):
        if i in swapped or (alt is not None and i == 3):
            for name, module in ref.unet.named_modules():
                if name.startswith(block + ".") and name.endswith("attn2"):
                    module.set_processor(Rewrite(module.processor, None if i in swapped else alt))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = ref("a fox", ip_adapter_image=reference_image(1), num_inference_steps=steps, guidance_scale=6.0,
                   height=32, width=32, latents=latents, output_type="np").images
    ours = StableDiffusion(mlx_folder, mx.float32)
    ours.load_ip_adapter(str(repo / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]))
    got = ours.generate("a fox", steps=steps, cfg=6.0, height=32, width=32, scheduler="euler",
                        latents=latents.numpy(), image_prompts=[prompt], return_array=True)
    return np.array(got), expected


@pytest.mark.parametrize("weight_type,weight,boost", [("style-transfer-precise", 1.2, None),
                                                      ("style-transfer-precise", 0.9, 2.0),
                                                      ("composition-precise", 1.1, 0.6)])
def test_precise_types_match_the_swap_on_sdxl(xl11, weight_type, weight, boost):  # noqa: F811
    by_index, swapped = comfy_precise(weight_type.replace("-", " "), weight, boost, True)
    prompt = ImagePrompt(images=[reference_image(1)], scale=weight, weight_type=weight_type, boost=boost)
    got, expected = run_pair(xl11, by_index, swapped, prompt)
    assert record(f"{weight_type} (SDXL, boost {boost}) = swapped tokens", psnr(got, expected), "dB") >= 40
    _, unswapped = run_pair(xl11, by_index, set(), prompt)
    assert psnr(got, unswapped) < 40  # the swap really changes the picture


def test_composition_image_on_sdxl(xl11):  # noqa: F811
    """IPAdapterStyleComposition: the style image on index 6, the layout image's tokens on index 3."""
    layout = reference_image(5)
    prompt = ImagePrompt(images=[reference_image(1)], scale=0.9, weight_type="style-and-composition",
                         composition_weight=1.3, composition_images=[layout])
    got, expected = run_pair(xl11, {3: 1.3, 6: 0.9}, set(), prompt, composition=layout)
    assert record("style-and-composition with a layout image (SDXL)", psnr(got, expected), "dB") >= 40
    _, style_only = run_pair(xl11, {3: 1.3, 6: 0.9}, set(), prompt)
    assert psnr(got, style_only) < 90  # the layout image really acts (~64 dB apart on this tiny model; ~130 when equal)
    ours = StableDiffusion(xl11[1], mx.float32)
    ours.load_ip_adapter(str(xl11[2] / "sdxl_models" / SDXL_VARIANTS["sdxl"][0]))
    bad = ImagePrompt(images=[reference_image(1)], weight_type="style-transfer", composition_images=[layout])
    with pytest.raises(UserError, match="a composition image is for the weight types style-and-composition"):
        ours.generate("a fox", steps=1, height=32, width=32, image_prompts=[bad])


@pytest.mark.parametrize("args,message", [
    (["--boost", "1.5"], "error: boost is for the precise weight types (style-transfer-precise, composition-precise), "
                         "not linear"),
    (["--weight-type", "style-transfer", "--composition-image", "x.png"],
     "error: a composition image is for the weight types style-and-composition, strong-style-and-composition, "
     "not style-transfer"),
    (["--negative-content-scale", "0.5"], "error: --negative-content-scale needs a --negative-content-prompt"),
])
def test_cli_bad_input_one_line(args, message, tmp_path, capsys):
    """Refused before any model or image is read, nothing written."""
    argv = ["generate", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o.png"),
            "--ip-adapter", "x.bin", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == message, err
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_one_line():
    with pytest.raises(UserError, match="boost is for the precise weight types"):
        steering.scale_rule(SDXL, 1.0, "style-transfer", boost=1.0)
    with pytest.raises(UserError, match="composition layers are defined for SD 1.x/2.x"):
        steering.swapped_indices("composition-precise", SDXL[:10])
