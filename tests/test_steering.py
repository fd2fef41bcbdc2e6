"""Steering rules without a model: ComfyUI_IPAdapter_plus' weight tables and sigma window against formulas
written here from its source, the step window, the cost of a zero scale, and one clear line per bad input."""

import math

import mlx.core as mx
import numpy as np
import pytest

from ipadapter_mlx import steering
from ipadapter_mlx.cli import main
from ipadapter_mlx.conditioning import Conditioning, ImageCondition, Site
from ipadapter_mlx.errors import UserError


def layout(down: dict[int, int], up: dict[int, int], depth: int = 2) -> list[Site]:
    """Sites of a UNet: {block: transformers} for down and up blocks, `depth` transformer blocks each, in
    ComfyUI's order (input, middle, output)."""
    blocks = [f"down_blocks.{b}.attentions.{j}" for b, n in down.items() for j in range(n)]
    blocks += ["mid_block.attentions.0"] + [f"up_blocks.{b}.attentions.{j}" for b, n in up.items() for j in range(n)]
    return [Site(f"{name}.transformer_blocks.{k}.attn2", i) for i, name in enumerate(blocks) for k in range(depth)]


SD15 = layout({0: 2, 1: 2, 2: 2}, {1: 3, 2: 3, 3: 3})  # 16 transformers
SDXL = layout({1: 2, 2: 2}, {0: 3, 1: 3}, depth=3)  # 11 (depth 2 and 10 in the real one)


def comfy_weight(weight_type: str, weight: float, t: int, block_type: str, is_sdxl: bool, wc: float = 1.0):
    """ComfyUI_IPAdapter_plus, IPAdapterPlus.py ipadapter_execute + CrossAttentionPatch.py ipadapter_attention,
    rewritten by hand (space-separated names as there); None where the layer is skipped."""
    layers = 11 if is_sdxl else 16
    dicts = {
        "style transfer": {6: weight} if is_sdxl else {**{i: weight for i in (0, 1, 2, 3)},
                                                        **{i: weight for i in range(9, 16)}},
        "composition": {3: weight} if is_sdxl else {4: weight * 0.25, 5: weight},
        "strong style transfer": ({i: weight for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)} if is_sdxl else
                                  {i: weight for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}),
        "style and composition": ({3: wc, 6: weight} if is_sdxl else
                                  {0: weight, 1: weight, 2: weight, 3: weight, 4: wc * 0.25, 5: wc, 9: weight,
                                   10: weight, 11: weight, 12: weight, 13: weight, 14: weight, 15: weight}),
        "strong style and composition": ({0: weight, 1: weight, 2: weight, 3: wc, 4: weight, 5: weight, 6: weight,
                                          7: weight, 8: weight, 9: weight, 10: weight} if is_sdxl else
                                         {**{i: weight for i in range(16)}, 4: wc, 5: wc}),
    }
    if weight_type in dicts:
        return dicts[weight_type].get(t)
    if weight_type == "ease in":
        return weight * (0.05 + 0.95 * (1 - t / layers))
    if weight_type == "ease out":
        return weight * (0.05 + 0.95 * (t / layers))
    if weight_type == "ease in-out":
        return weight * (0.05 + 0.95 * (1 - abs(t - (layers / 2)) / (layers / 2)))
    if weight_type == "reverse in-out":
        return weight * (0.05 + 0.95 * (abs(t - (layers / 2)) / (layers / 2)))
    if (weight_type, block_type) in (("weak input", "input"), ("weak middle", "middle"), ("weak output", "output")):
        return weight * 0.2
    if weight_type == "strong middle" and block_type in ("input", "output"):
        return weight * 0.2
    return weight


@pytest.mark.parametrize("weight_type", [t for t in steering.WEIGHT_TYPES if t not in steering.PRECISE])  # precise:
@pytest.mark.parametrize("family", ["sd15", "sdxl"])  # test_steering_precise.py
def test_weight_tables_follow_comfyui(weight_type, family):
    sites = SDXL if family == "sdxl" else SD15
    for weight, wc in ((0.8, 1.0), (-0.6, 0.35)):  # negative weights too
        rule = steering.scale_rule(sites, weight, weight_type, composition_weight=wc)
        for site in sites:
            block = {"down": "input", "mid": "middle", "up": "output"}[site.name.split("_")[0]]
            want = comfy_weight(weight_type.replace("-", " ").replace("in out", "in-out"), weight, site.index, block, family == "sdxl", wc)
            got = rule(site, 0, 1.0) if callable(rule) else rule
            assert got == pytest.approx(0.0 if want is None else want, abs=1e-12), (site, want, got)


def test_named_examples_of_the_issue():
    """SDXL style-transfer: up_blocks.0.attentions.1 only; SD 1.5 composition: index 4 a quarter, 5 the weight;
    SD 1.5 ease-in at index 15: weight x (0.05 + 0.95/16)."""
    rule = steering.scale_rule(SDXL, 0.9, "style-transfer")
    assert {s.block for s in SDXL if rule(s, 0, 1.0)} == {"up_blocks.0.attentions.1"}
    rule = steering.scale_rule(SD15, 0.8, "composition")
    assert {s.index: rule(s, 0, 1.0) for s in SD15 if rule(s, 0, 1.0)} == {4: 0.2, 5: 0.8}
    rule = steering.scale_rule(SD15, 0.5, "ease-in")
    assert rule(SD15[-1], 0, 1.0) == pytest.approx(0.5 * (0.05 + 0.95 / 16))


def test_layer_weights():
    rule = steering.scale_rule(SD15, 0.5, layer_weights="3:1.0, 6:-0.5")
    assert {s.index: rule(s, 0, 1.0) for s in SD15 if rule(s, 0, 1.0)} == {3: 0.5, 6: -0.25}
    rule = steering.scale_rule(SD15, 2.0, layer_weights={15: 0.25})
    assert {s.index: rule(s, 0, 1.0) for s in SD15 if rule(s, 0, 1.0)} == {15: 0.5}


@pytest.mark.parametrize("start,end,steps", [(0.0, 1.0, 4), (0.25, 0.75, 4), (0.2, 0.6, 5), (0.5, 0.5, 4),
                                             (0.0, 0.3, 7), (0.34, 1.0, 3)])
def test_step_window_is_diffusers_control_guidance_rule(start, end, steps):
    rule = steering.scale_rule(SD15, 0.7, start_at=start, end_at=end,
                               timeline=steering.Timeline(steps, np.ones(1000)))
    for i in range(steps):
        # StableDiffusionControlNetPipeline: keeps = 1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)
        keep = 1.0 - float(i / steps < start or (i + 1) / steps > end)
        assert (rule(SD15[0], i, 5.0) if callable(rule) else rule) == 0.7 * keep


def comfy_percent_to_sigma(percent: float, betas_range=(0.00085, 0.012)) -> float:
    """comfy/model_sampling.py ModelSamplingDiscrete (linear schedule = sqrt-linear betas), in float32 as there."""
    torch = pytest.importorskip("torch")
    betas = torch.linspace(betas_range[0] ** 0.5, betas_range[1] ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    log_sigmas = (((1 - ac) / ac) ** 0.5).float().log()
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    t = torch.clamp(torch.tensor((1.0 - percent) * 999.0).float(), min=0, max=999)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp().item()


def test_sigma_window_follows_comfyui():
    from ipadapter_mlx.config import SchedulerConfig
    from ipadapter_mlx.samplers import alphas_cumprod

    ac = alphas_cumprod(SchedulerConfig.from_dict({"beta_start": 0.00085, "beta_end": 0.012,
                                                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}))
    timeline = steering.Timeline(10, np.sqrt((1 - ac) / ac))
    for p in (0.0, 0.1, 0.25, 0.333, 0.5, 0.77, 0.999, 1.0):
        assert steering.percent_to_sigma(p, timeline.train_sigmas) == pytest.approx(comfy_percent_to_sigma(p), rel=1e-5)
    rule = steering.scale_rule(SD15, 1.0, start_at=0.2, end_at=0.7, timing="sigma", timeline=timeline)
    hi, lo = comfy_percent_to_sigma(0.2), comfy_percent_to_sigma(0.7)
    for sigma in np.geomspace(0.02, 15, 60):  # CrossAttentionPatch: on while sigma_end <= sigma <= sigma_start
        if min(abs(sigma - hi), abs(sigma - lo)) > 1e-4 * sigma:
            assert rule(SD15[0], 0, float(sigma)) == float(lo <= sigma <= hi)


def test_a_layer_at_zero_costs_nothing():
    """Conditioning.at leaves out every layer whose rule gives 0: style-transfer on SDXL attends in one block."""
    layers = {s: object() for s in SDXL}
    rule = steering.scale_rule(SDXL, 0.9, "style-transfer", start_at=0.5, timeline=steering.Timeline(4, np.ones(9)))
    cond = Conditioning(mx.zeros((2, 77, 8)), images=[ImageCondition(layers, mx.zeros((2, 4, 8)), rule)])
    on = cond.at(2, 1.0).image
    assert {n.split(".transformer_blocks.")[0] for n in on} == {"up_blocks.0.attentions.1"}
    assert all(entry[2] == 0.9 for entries in on.values() for entry in entries)
    assert cond.at(1, 1.0).image == {}  # before start-at: no image attention at all


@pytest.mark.parametrize("scale,message", [
    ({"middle": 1.0}, "Can't set IP-Adapter scale for layer middle. It either doesn't exist"),
    ({"up": {"block_3": 1.0}}, "Can't set IP-Adapter scale for layer up.block_3. It either doesn't exist"),
    ({"down": {"block_0": 1.0}}, "Can't set IP-Adapter scale for layer down.block_0."),  # SDXL: no attention there
    ({"down": {"block_2": [0.0, 1.0, 0.5]}}, "Expected 2 scales for down.block_2, got 3."),
    ({"up": {"block_0": [0.0, 1.0]}}, "Expected 3 scales for up.block_0, got 2."),
    ({"mid": [1.0, 2.0]}, "Expected 1 scales for mid, got 2."),
    ({"up": {"block_0": "big"}}, "IP-Adapter scale for up.block_0.0 must be a finite number, got 'big'"),
])
def test_bad_block_dicts(scale, message):
    with pytest.raises(UserError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        steering.block_scales(scale, SDXL)


@pytest.mark.parametrize("kw,message", [
    (dict(weight_type="styles"), "unknown weight type 'styles' (choose from linear, ease-in,"),
    (dict(start_at=0.8, end_at=0.5), "start-at 0.8 is after end-at 0.5"),
    (dict(start_at=-0.1), "start-at must be a fraction in [0, 1], got -0.1"),
    (dict(timing="percent"), "unknown timing 'percent' (choose from step, sigma)"),
    (dict(layer_weights="3=1"), "layer weights must read INDEX:WEIGHT,... (e.g. 3:1.0,6:0.5), got '3=1'"),
    (dict(layer_weights="16:1"), "layer weight for transformer 16: this UNet has 16 (0-15)"),
    (dict(layer_weights="3:1", weight_type="ease-in"), "layer weights replace the weight type"),
    (dict(scale={"up": 1.0}, weight_type="style-transfer"), "a per-block scale dict does not combine"),
])
def test_bad_steering(kw, message):
    with pytest.raises(UserError) as e:
        steering.scale_rule(SD15, **({"scale": 1.0} | kw), timeline=steering.Timeline(4, np.ones(9)))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_weight_types_need_a_known_layout():
    with pytest.raises(UserError, match="this UNet has 6"):
        steering.scale_rule(layout({0: 2}, {1: 3}), 1.0, "style-transfer")
    assert callable(steering.scale_rule(layout({0: 2}, {1: 3}), 1.0, "ease-out"))  # curves work on any layout


@pytest.mark.parametrize("args,message", [
    (["--scale", '{"up": {"block_0": [0, 1, 0]'], "error: argument --scale: malformed JSON: Expecting"),
    (["--scale", "[1, 2]"], "error: argument --scale: not a number: '[1, 2]'"),
    (["--weight-type", "style"], "error: argument --weight-type: invalid choice: 'style' (choose from 'linear', 'ease-in',"),
    (["--start-at", "0.8", "--end-at", "0.2"], "error: start-at 0.8 is after end-at 0.2"),
    (["--end-at", "1.5"], "error: argument --end-at: must be a fraction in [0, 1], got 1.5"),
])
def test_cli_bad_input_one_line(args, message, tmp_path, capsys):
    """Refused before any model is read (the model named does not exist) and nothing is written."""
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(tmp_path / "nowhere"), "--output", str(out), "--ip-adapter", "x.bin", *args]
    if "argument" in message:  # argparse's own refusal
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []
