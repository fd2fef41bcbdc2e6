"""Steering an image prompt: on which layers it acts, how strongly, and at which steps.

Every option ends up in one ScaleRule (conditioning.py): a per-layer table, built once per generation, times a
window of active steps.
- Per-block scales: a number, or a dict in diffusers' `set_ip_adapter_scale` form, expanded exactly as
  diffusers' `_maybe_expand_lora_scales` does (unnamed blocks 0, a number for a whole block, `mid`, lists of
  `layers_per_block` entries for down blocks and one more for up blocks), with its error messages.
- Weight types and layer weights by ComfyUI_IPAdapter_plus' definitions (`ipadapter_execute` in IPAdapterPlus.py,
  `ipadapter_attention` in CrossAttentionPatch.py), keyed by the transformer index (Site.index). The precise
  types' swapped layers and the composition layers are named here too; adapters.py gives them their tokens.
- When: step fractions (off at step i of N when i/N < start or (i+1)/N > end: the IP-Adapter authors' and
  diffusers' control_guidance rule), or ComfyUI's sigma range (on while sigma_end <= sigma <= sigma_start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import numpy as np

from .conditioning import ScaleRule, Site
from .errors import UserError, finite

Scale = Union[float, dict]  # a number, or diffusers' per-block dict
WEIGHT_TYPES = ("linear", "ease-in", "ease-out", "ease-in-out", "reverse-in-out", "weak-input", "weak-middle",
                "weak-output", "strong-middle", "style-transfer", "composition", "strong-style-transfer",
                "style-and-composition", "strong-style-and-composition", "style-transfer-precise",
                "composition-precise")
PRECISE = ("style-transfer-precise", "composition-precise")
TIMINGS = ("step", "sigma")


# -- per-block scales (diffusers) ------------------------------------------------------------------------


def _number(value, where: str) -> float:
    return finite(f"IP-Adapter scale for {where}", value)


def _no_layer(name: str) -> UserError:
    return UserError(f"Can't set IP-Adapter scale for layer {name}. It either doesn't exist in this unet or it "
                     "has no attentions.")


def block_scales(scale: Scale, sites: Iterable[Site]) -> dict[str, float]:
    """Transformer2DModel name (Site.block) -> its scale. Blocks and their sizes are read from the layers."""
    blocks = sorted({s.block for s in sites})
    if not isinstance(scale, dict):
        value = _number(scale, "the adapter")
        return {b: value for b in blocks}
    # diffusers' blocks_with_transformer / transformer_per_block: down blocks hold layers_per_block transformers,
    # up blocks one more
    layout: dict[str, dict[int, int]] = {"down": {}, "up": {}}
    for b in blocks:
        part = b.split(".")  # down_blocks.2.attentions.1
        if part[0] in ("down_blocks", "up_blocks"):
            held = layout[part[0][: -len("_blocks")]]
            held[int(part[1])] = held.get(int(part[1]), 0) + 1
    for key in scale:
        if key not in ("down", "mid", "up"):
            raise _no_layer(key)
    out = {}
    mid = scale.get("mid", 0.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise UserError(f"Expected 1 scales for mid, got {len(mid)}.")
        mid = mid[0]
    out["mid_block.attentions.0"] = _number(mid, "mid")
    for updown, held in layout.items():
        given = scale.get(updown, 0.0)
        if not isinstance(given, dict):
            given = {f"block_{i}": given for i in held}
        for key in given:
            if not (key.startswith("block_") and key[6:].isdigit() and int(key[6:]) in held):
                raise _no_layer(f"{updown}.{key}")
        for i, n in held.items():
            values = given.get(f"block_{i}", 0.0)
            if not isinstance(values, list):
                values = [values] * n
            elif len(values) == 1:
                values = values * n
            elif len(values) != n:
                raise UserError(f"Expected {n} scales for {updown}.block_{i}, got {len(values)}.")
            for j, v in enumerate(values):
                out[f"{updown}_blocks.{i}.attentions.{j}"] = _number(v, f"{updown}.block_{i}.{j}")
    return {b: out.get(b, 0.0) for b in blocks}


# -- weight types (ComfyUI_IPAdapter_plus) -----------------------------------------------------------------

# ComfyUI's dict weight types, by layout (16 transformers: SD 1.x/2.x, 11: SDXL): the indices at the weight, and
# the composition indices with their factor on the composition weight
_STYLE = {16: {0, 1, 2, 3, *range(9, 16)}, 11: {6}}
_STRONG = {16: {0, 1, 2, 3, *range(6, 16)}, 11: {0, 1, 2, *range(4, 11)}}
_COMPOSITION = {16: {4: 0.25, 5: 1.0}, 11: {3: 1.0}}
_TABLES = {L: {"style-transfer": (_STYLE[L], {}), "composition": (set(), _COMPOSITION[L]),
               "strong-style-transfer": (_STRONG[L], {}), "style-and-composition": (_STYLE[L], _COMPOSITION[L]),
               "strong-style-and-composition": (_STRONG[L], {t: 1.0 for t in _COMPOSITION[L]})}
           for L in (16, 11)}
# composition-precise: the layers at the full boost; the other non-composition layers get a tenth of it
_PRECISE_FULL = {16: {0, 1, 2, 3, *range(9, 16)}, 11: {6}}


def composition_indices(sites: Iterable[Site]) -> set[int]:
    """ComfyUI's composition layers of this layout (SDXL: 3; SD 1.x/2.x: 4 and 5)."""
    L = len({s.index for s in sites})
    if L not in _COMPOSITION:
        raise UserError(f"composition layers are defined for SD 1.x/2.x (16 transformers) and SDXL (11); "
                        f"this UNet has {L}")
    return set(_COMPOSITION[L])


COMPOSITION_TYPES = ("style-and-composition", "strong-style-and-composition")  # ComfyUI's style+composition node


def check_options(weight_type: str, boost: float | None = None, composition_image: bool = False) -> None:
    """The options that belong to some weight types only."""
    if boost is not None and weight_type not in PRECISE:
        raise UserError(f"boost is for the precise weight types ({', '.join(PRECISE)}), not {weight_type}")
    if composition_image and weight_type not in COMPOSITION_TYPES:
        raise UserError(f"a composition image is for the weight types {', '.join(COMPOSITION_TYPES)}, "
                        f"not {weight_type}")


def swapped_indices(weight_type: str, sites: Iterable[Site]) -> set[int]:
    """The precise types' layers where ComfyUI swaps the branches (`uncond = cond; cond = cond * 0`): the image
    acts in the unconditional half only. style-transfer-precise: the composition layers; composition-precise:
    all the others."""
    if weight_type not in PRECISE:
        return set()
    sites = list(sites)
    comp = composition_indices(sites)
    return comp if weight_type == "style-transfer-precise" else {s.index for s in sites} - comp


def weight_table(weight_type: str, weight: float, sites: Iterable[Site],
                 composition_weight: float = 1.0, boost: float | None = None) -> dict[int, float]:
    """Transformer index -> weight, as ComfyUI_IPAdapter_plus gives it (indices left out get 0).

    `composition` takes `weight` on its layers; the `style-and-composition` types take `composition_weight` there
    (ComfyUI's weight_composition, 1.0 in its advanced node). The precise types: `boost` is ComfyUI's style_boost
    (style-transfer-precise: the weight of the composition layers) or composition_boost (composition-precise: the
    weight of the style layers, the composition layers keeping `weight`); None gives `weight`."""
    if weight_type not in WEIGHT_TYPES:
        raise UserError(f"unknown weight type {weight_type!r} (choose from {', '.join(WEIGHT_TYPES)})")
    part = {s.index: s.name.split("_")[0] for s in sites}  # down / mid / up: ComfyUI's input / middle / output
    L = len(part)  # ComfyUI's `layers`: 16 (SD 1.x/2.x) or 11 (SDXL), the count, not the last index
    curves = {
        "linear": lambda t: 1.0,
        "ease-in": lambda t: 0.05 + 0.95 * (1 - t / L),
        "ease-out": lambda t: 0.05 + 0.95 * (t / L),
        "ease-in-out": lambda t: 0.05 + 0.95 * (1 - abs(t - L / 2) / (L / 2)),
        "reverse-in-out": lambda t: 0.05 + 0.95 * (abs(t - L / 2) / (L / 2)),
        "weak-input": lambda t: 0.2 if part[t] == "down" else 1.0,
        "weak-middle": lambda t: 0.2 if part[t] == "mid" else 1.0,
        "weak-output": lambda t: 0.2 if part[t] == "up" else 1.0,
        "strong-middle": lambda t: 0.2 if part[t] != "mid" else 1.0,
    }
    if weight_type in curves:
        return {t: weight * curves[weight_type](t) for t in part}
    if L not in _TABLES:
        raise UserError(f"weight type {weight_type} is defined for SD 1.x/2.x (16 transformers) and SDXL (11); "
                        f"this UNet has {L}")
    b = weight if boost is None else boost
    if weight_type == "style-transfer-precise":
        return {t: weight for t in _STYLE[L]} | {t: b * f for t, f in _COMPOSITION[L].items()}
    if weight_type == "composition-precise":
        return ({t: (b if t in _PRECISE_FULL[L] else 0.1 * b) for t in part}
                | {t: weight * f for t, f in _COMPOSITION[L].items()})
    style, composition = _TABLES[L][weight_type]
    c = weight if weight_type == "composition" else composition_weight
    return {t: weight for t in style} | {t: c * f for t, f in composition.items()}


def parse_layer_weights(text: str | dict, sites: Iterable[Site]) -> dict[int, float]:
    """ComfyUI's `layer_weights` ("3:1.0, 6:0.5", or a dict): transformer index -> weight factor."""
    count = len({s.index for s in sites})
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        try:
            pairs = [item.split(":") for item in text.split(",") if item.strip()]
            pairs = [(int(k), float(v)) for k, v in pairs]
        except ValueError:
            raise UserError(f"layer weights must read INDEX:WEIGHT,... (e.g. 3:1.0,6:0.5), got {text!r:.80}") from None
    out = {}
    for k, v in pairs:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < count:
            raise UserError(f"layer weight for transformer {k!r}: this UNet has {count} (0-{count - 1})")
        out[k] = _number(v, f"transformer {k}")
    if not out:
        raise UserError("layer weights are empty: give INDEX:WEIGHT pairs, e.g. 3:1.0,6:0.5")
    return out


# -- when -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """What a window of steps is measured against: the number of steps this run takes, and the model's training
    sigmas (ComfyUI maps its percentages to sigmas on those)."""

    steps: int
    train_sigmas: np.ndarray


def percent_to_sigma(percent: float, train_sigmas: np.ndarray) -> float:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma: log-sigma interpolated at timestep (1 - p) * (T - 1)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    log_sigmas = np.log(train_sigmas)
    t = min(max((1.0 - percent) * (len(log_sigmas) - 1), 0.0), len(log_sigmas) - 1)
    lo, hi = math.floor(t), math.ceil(t)
    return float(np.exp((1 - (t - lo)) * log_sigmas[lo] + (t - lo) * log_sigmas[hi]))


def window(start: float, end: float, timing: str, timeline: Timeline | None) -> Callable[[int, float], bool] | None:
    """(step, sigma) -> whether the image prompt acts; None when it acts at every step."""
    check_window(start, end, timing)
    if start == 0.0 and end == 1.0:
        return None
    if timeline is None:
        raise UserError("a start/end window needs the steps of the run (give conditions() a Timeline)")
    if timing == "step":
        n = timeline.steps
        return lambda i, sigma: not (i / n < start or (i + 1) / n > end)
    hi, lo = percent_to_sigma(start, timeline.train_sigmas), percent_to_sigma(end, timeline.train_sigmas)
    return lambda i, sigma: lo <= sigma <= hi


def check_window(start: float, end: float, timing: str = "step") -> None:
    for name, v in (("start", start), ("end", end)):
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise UserError(f"{name}-at must be a fraction in [0, 1], got {v!r:.40}")
    if start > end:
        raise UserError(f"start-at {start} is after end-at {end}")
    if timing not in TIMINGS:
        raise UserError(f"unknown timing {timing!r} (choose from {', '.join(TIMINGS)})")


# -- all of it as one rule ---------------------------------------------------------------------------------


def scale_rule(sites: Iterable[Site], scale: Scale = 1.0, weight_type: str = "linear",
               layer_weights: str | dict | None = None, composition_weight: float = 1.0,
               start_at: float = 0.0, end_at: float = 1.0, timing: str = "step",
               timeline: Timeline | None = None, boost: float | None = None) -> float | ScaleRule:
    """The scale of every layer at every step; a plain number when it is one number throughout."""
    sites = list(sites)
    if weight_type not in WEIGHT_TYPES:
        raise UserError(f"unknown weight type {weight_type!r} (choose from {', '.join(WEIGHT_TYPES)})")
    steered = weight_type != "linear" or layer_weights is not None
    if isinstance(scale, dict):
        if steered:
            raise UserError("a per-block scale dict does not combine with a weight type or layer weights; "
                            "give the scale as a number")
        by_block = block_scales(scale, sites)
        table = {s: by_block[s.block] for s in sites}
    else:
        w = _number(scale, "the adapter")
        check_options(weight_type, boost)
        if layer_weights is not None:
            if weight_type not in ("linear", *PRECISE):  # ComfyUI keeps a precise type's swap with layer weights
                raise UserError(f"layer weights replace the weight type: give one of them, not both "
                                f"(weight type {weight_type})")
            by_index = {k: v * w for k, v in parse_layer_weights(layer_weights, sites).items()}
        else:
            by_index = weight_table(weight_type, w, sites, _number(composition_weight, "composition"),
                                    None if boost is None else _number(boost, "boost"))
        table = {s: by_index.get(s.index, 0.0) for s in sites}
    active = window(start_at, end_at, timing, timeline)
    if active is None and len(set(table.values())) == 1:
        return next(iter(table.values()))
    if active is None:
        return lambda site, step, sigma: table[site]
    return lambda site, step, sigma: table[site] if active(step, sigma) else 0.0
