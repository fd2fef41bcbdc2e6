"""LoRAs: low-rank weight deltas, read from kohya/A1111 and diffusers/PEFT files and fused into the weights.

The core, which other features (FaceID) build on:
  `LoraLayer(down, up, alpha)`  one layer's delta, `scale * alpha / rank * up @ down`, in MLX layout
  `Lora(name, layers)`          {component ("unet", "text_encoder", "text_encoder_2") -> {module path -> layer}},
                                module paths in diffusers naming, as our MLX modules are named
  `check_lora(lora, models)`    every layer against the modules it names (shapes, kind), strictly
  `LoraSet`                     the loaded LoRAs and their scales; `apply(component, model, source)` fuses
                                their sum into a model's Linear / Conv2d weights, and restores layers exactly

Names are derived from the models themselves, as kohya's sd-scripts derives them: a kohya name is the module
path with '.' -> '_' behind `lora_unet_` / `lora_te_` (`lora_te1_` / `lora_te2_` on SDXL); SDXL files name the
UNet in the original (LDM) layout, which keymaps.py's config-derived table maps. diffusers/PEFT names are the
module paths behind `unet.` / `text_encoder.` / `text_encoder_2.`.

Fusing computes `original + sum(scale_i * delta_i)` in float32 on every change, from the original arrays:
re-read from the model's weights file (mx.load is lazy: only those tensors are read) and cast / quantized as
loading did, so unloading restores the base weights bit for bit with no second copy held (subtracting the
delta again would not: rounding). Quantized layers are dequantized, fused and quantized again with their own
bits and group size.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .checkpoints.torch_pickle import printable
from .errors import UserError, finite
from .loaded import LoadOrder

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# key suffix -> what it holds; kohya writes the first three, PEFT / diffusers >= 0.24 the next two, older
# diffusers the rest
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".lora_A.weight": "down",
         ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
         ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
         "_lora.down.weight": "down", "_lora.up.weight": "up"}
# LyCORIS / DoRA variants: a different delta than up @ down, refused by name (a key component, or its start)
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with a Tucker (CP) mid weight",
               "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "full-weight diff", "w_norm": "GLoRA",
               "oft_blocks": "OFT"}
KNOWN_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention width -> family, for messages


@dataclass
class LoraLayer:
    """One module's delta `alpha / rank * up @ down`. `down`: (rank, in) for a Linear, (rank, kh, kw, in) for a
    Conv2d (MLX layout); `up`: (out, rank). `alpha` None means alpha = rank (scale 1), as kohya and PEFT."""

    down: mx.array
    up: mx.array
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def add_to(self, w: mx.array, multiplier: float = 1.0) -> mx.array:
        """w + multiplier * delta, float32, for a weight flattened to (out, -1): one fused product-and-add."""
        up = self.up.astype(mx.float32) * (multiplier * self.scale)
        return mx.addmm(w, up, self.down.astype(mx.float32).reshape(self.rank, -1))

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes


@dataclass
class Lora:
    """{component -> {module path (diffusers naming) -> LoraLayer}}; `name` says where it came from."""

    name: str
    layers: dict[str, dict[str, LoraLayer]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for c in self.layers.values() for layer in c.values())

    def __len__(self) -> int:
        return sum(len(c) for c in self.layers.values())


def submodule(model: nn.Module, path: str):
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def fusable(module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.QuantizedLinear))


def base_shape(module) -> tuple[int, ...]:
    """The float weight shape of a Linear / Conv2d / QuantizedLinear (packed weights unpacked)."""
    if isinstance(module, nn.QuantizedLinear):
        return (module.weight.shape[0], module.weight.shape[1] * 32 // module.bits)
    return tuple(module.weight.shape)


def _listing(names, limit: int = 4) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(printable(n, 160) for n in names[:limit]) + more  # escaped: a key cannot forge a line


# -- checking a Lora against the models ---------------------------------------------------------------------

def _family(two_encoders: bool, widths: set[int]) -> str:
    w = max(widths) if widths else 0
    known = KNOWN_WIDTHS.get(w)
    kind = known or ("an SDXL-style model" if two_encoders else "an SD-style model")
    return f"{kind} (cross-attention width {w}, {'two text encoders' if two_encoders else 'one text encoder'})"


def _unet_widths(models: dict[str, nn.Module]) -> set[int]:
    unet = models.get("unet")
    return {base_shape(a.to_k)[1] for _, a in unet.cross_attentions()} if unet is not None else set()  # quantized too


def check_family(name: str, components: set[str], widths: set[int], models: dict[str, nn.Module]) -> None:
    """A LoRA for another family (SDXL on SD 1.5, ...) fails with one line naming both, before any detail.
    `components`: those the LoRA has layers for; `widths`: the input widths of its cross-attention to_k/to_v."""
    model_widths = _unet_widths(models)
    other_encoder = "text_encoder_2" in components and "text_encoder_2" not in models
    # no width in common: another family; some in common: a malformed layer, which the shape check names
    if other_encoder or (widths and model_widths and not widths & model_widths):
        two = "text_encoder_2" in components or max(widths, default=0) == 2048
        raise UserError(f"LoRA {name} is for {_family(two, widths)}; the model is "
                        f"{_family('text_encoder_2' in models, model_widths)}")


def check_arrays(name: str, arrays: dict[str, mx.array], ndims: tuple[int, ...] = (2, 4)) -> None:
    """Down/up weights as read, before any shape is used: {key in the file (or layer and role) -> array}, each
    with `ndims` dimensions (2 for a Linear, 4 for a conv kernel) and floating point."""
    for key, a in arrays.items():
        if not mx.issubdtype(a.dtype, mx.floating):
            dtype = str(a.dtype).removeprefix("mlx.core.")
            raise UserError(f"LoRA {name}: {printable(key, 160)} weights are {dtype}; a LoRA's are floating point")
        if a.ndim not in ndims:
            want = " or ".join(f"{n}-d" for n in ndims)
            raise UserError(f"LoRA {name}: {printable(key, 160)} is {tuple(a.shape)}, expected {want}")


def check_lora(lora: Lora, models: dict[str, nn.Module]) -> None:
    """Every layer names a Linear/Conv2d of `models` (structures suffice) and fits its shape; fails naming
    what does not."""
    for component, layers in lora.layers.items():
        for path, layer in layers.items():
            check_arrays(lora.name, {f"{component} {path} down": layer.down, f"{component} {path} up": layer.up})
    widths = {layer.down.shape[-1] for path, layer in lora.layers.get("unet", {}).items()
              if path.endswith(("attn2.to_k", "attn2.to_v"))}
    check_family(lora.name, set(lora.layers), widths, models)
    for component, layers in lora.layers.items():
        if component not in models:
            raise UserError(f"LoRA {lora.name} has layers for {component}, which this model does not have")
        model = models[component]
        modules = dict(model.named_modules())
        unknown = [p for p in layers if not fusable(modules.get(p))]
        if unknown:
            raise UserError(f"LoRA {lora.name}: {len(unknown)} layers name no Linear/Conv2d of the {component}: "
                            f"{_listing(unknown)}")
        for path, layer in layers.items():
            shape = base_shape(modules[path])
            d, u = layer.down, layer.up
            ok = (d.ndim == len(shape) and u.ndim == 2 and u.shape == (shape[0], d.shape[0])
                  and tuple(d.shape[1:]) == tuple(shape[1:]) and 0 < d.shape[0] <= math.prod(shape[1:]))
            if not ok:
                raise UserError(f"LoRA {lora.name}: {component} {path} has down {tuple(d.shape)} and up "
                                f"{tuple(u.shape)}; the layer's weight is {shape}")
            if layer.alpha is not None and not (math.isfinite(layer.alpha)):
                raise UserError(f"LoRA {lora.name}: {component} {path} has alpha {layer.alpha}")
    items = [(f"{c} {p}", la) for c, layers in lora.layers.items() for p, la in layers.items()]
    if items:  # one evaluation for all layers
        good = mx.stack([mx.isfinite(la.down).all() & mx.isfinite(la.up).all() for _, la in items]).tolist()
        bad = [name for (name, _), ok in zip(items, good) if not ok]
        if bad:
            raise UserError(f"LoRA {lora.name}: weights hold NaN/Inf in {len(bad)} layers: {_listing(bad)}")


# -- reading files -------------------------------------------------------------------------------------------

def name_index(component: str, model: nn.Module) -> dict[str, str]:
    """{name a file may use -> module path} for every fusable module: the path itself (diffusers/PEFT), the
    kohya name (path with '.' -> '_'), and the same two for an alias: for the UNet its name in the original
    LDM layout (SDXL kohya files), from keymaps' config-derived table; for a text encoder its name without
    `text_model.`. Names two modules would share are left out."""
    from .checkpoints.keymaps import renamer, unet_original_to_diffusers

    paths = [p for p, m in model.named_modules() if fusable(m)]
    if component == "unet":
        to_original = renamer([(dst, src) for src, dst in unet_original_to_diffusers(model.config)])
        aliases = [(to_original(p), p) for p in paths]
    else:  # transformers 5 names CLIP's modules without the `text_model.` level that files written before keep
        aliases = [(p.removeprefix("text_model."), p) for p in paths]
    index: dict[str, str] = {}
    clashes = set()
    for alias, path in [(p, p) for p in paths] + aliases:
        for name in {alias, alias.replace(".", "_")}:
            if index.get(name, path) != path:
                clashes.add(name)
            index[name] = path
    return {k: v for k, v in index.items() if k not in clashes}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """A file key -> (component, module name as the file writes it, role), or None when it is not a LoRA key."""
    role = next((r for s, r in ROLES.items() if key.endswith(s)), None)
    if role is None:
        return None
    stem = key[: -len(next(s for s in ROLES if key.endswith(s)))]
    for prefixes in (KOHYA_PREFIXES, DIFFUSERS_PREFIXES):
        for prefix in sorted(prefixes, key=len, reverse=True):  # text_encoder_2. before text_encoder.
            if stem.startswith(prefix):
                name = stem[len(prefix):]
                name = name.removeprefix("base_model.model.")  # PEFT's wrapper, when a file keeps it
                # older diffusers: attention processors' own LoRA layers (attn1.processor.to_q_lora), and the
                # same names on CLIP's attention (self_attn.to_q_lora = q_proj)
                name = re.sub(r"\.processor\.(to_[qkv]|to_out)$",
                              lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]), name)
                name = re.sub(r"\.self_attn\.to_(q|k|v|out)$", r".self_attn.\1_proj", name)
                return prefixes[prefix], name, role
    return None


def _alpha(what: str, value) -> float:
    """A LoRA alpha read from a file: a finite positive number (not a bool, not an int too large for a float)."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < float(value) < math.inf
    except OverflowError:
        ok = False
    if not ok:
        raise UserError(f"{what} must be a finite positive number, got {printable(repr(value), 60)}")
    return float(value)


def _peft_alphas(metadata: dict[str, str], component: str) -> tuple[float | None, dict, dict]:
    """diffusers' saved LoraConfig (`lora_adapter_metadata`) for one component: (lora_alpha, alpha_pattern,
    use_rslora), or (None, {}, False) without it; values checked."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: deeply nested brackets
        raise UserError("LoRA metadata lora_adapter_metadata is not JSON (or nests too deeply)") from None
    if not isinstance(config, dict):
        raise UserError(f"LoRA metadata lora_adapter_metadata is a JSON {type(config).__name__}, expected an object")
    prefix = component + "."
    if config.get(prefix + "use_dora"):
        raise UserError("a DoRA LoRA (use_dora in its metadata): only plain LoRA / LoCon (up @ down) is supported")
    alpha = config.get(prefix + "lora_alpha")
    if alpha is not None:
        alpha = _alpha(f"LoRA metadata {prefix}lora_alpha", alpha)
    pattern = config.get(prefix + "alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise UserError(f"LoRA metadata {prefix}alpha_pattern is a JSON {type(pattern).__name__}, expected an "
                        "object of module name -> alpha")
    pattern = {k: _alpha(f"LoRA metadata {prefix}alpha_pattern[{printable(k, 60)}]", v) for k, v in pattern.items()}
    return alpha, pattern, bool(config.get(prefix + "use_rslora"))


def _pattern_value(path: str, pattern: dict, default):
    """PEFT's pattern lookup: a key matches a module whose name ends with it. PEFT treats keys as regexes, but
    the files diffusers writes hold plain module names / path suffixes; we match them literally, as suffixes at
    a '.' boundary: a file's pattern is never run as a regex (a hostile one could take forever)."""
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def parse_lora(weights: dict[str, mx.array], metadata: dict[str, str], models: dict[str, nn.Module],
               name: str) -> Lora:
    """A file's tensors -> a Lora for these models (structures suffice), strictly: every key is read or named."""
    for key in weights:
        for part, kind in UNSUPPORTED.items():
            if any(p == part or (part.endswith("_") and p.startswith(part)) for p in key.split(".")[1:]):
                raise UserError(f"LoRA {name}: a {kind} file ({printable(key, 160)}); only plain LoRA / LoCon "
                                "(up @ down) is supported")
    groups: dict[tuple[str, str], dict[str, mx.array]] = {}
    keys: dict[tuple[str, str], dict[str, str]] = {}  # the file's key of each role, for messages
    not_lora = []
    for key, value in weights.items():
        parsed = _split_key(key)
        if parsed is None:
            not_lora.append(key)
            continue
        component, module, role = parsed
        groups.setdefault((component, module), {})[role] = value
        keys.setdefault((component, module), {})[role] = key
    if not groups:
        raise UserError(f"{name} is not a LoRA: no lora_down/lora_up or lora_A/lora_B keys "
                        f"(keys: {_listing(weights)})")
    if not_lora:
        raise UserError(f"LoRA {name}: {len(not_lora)} keys are not LoRA weights: {_listing(not_lora)}")
    missing = [f"{c}:{m}" for (c, m), g in groups.items() if not {"down", "up"} <= set(g)]
    if missing:
        raise UserError(f"LoRA {name}: layers without both down and up weights: {_listing(missing)}")
    for group, g in groups.items():  # before any shape is read: Linear (2-d) or conv (4-d), floating point
        check_arrays(name, {keys[group][r]: g[r] for r in ("down", "up")})

    # the family first: a LoRA for SDXL on SD 1.5 is one clear line, not a list of unknown names
    widths = {g["down"].shape[1] for (c, m), g in groups.items()
              if c == "unet" and g["down"].ndim >= 2 and re.search(r"attn2[._]to_[kv]$", m)}
    check_family(name, {c for c, _ in groups}, widths, models)
    lora = Lora(name)
    unknown = []
    indexes = {c: name_index(c, m) for c, m in models.items()}
    for (component, module), g in groups.items():
        path = indexes.get(component, {}).get(module)
        if path is None:
            unknown.append(f"{component}:{module}")
            continue
        target = submodule(models[component], path)
        lora.layers.setdefault(component, {})[path] = _layer(g, target, component, path, metadata, name)
    if unknown:
        raise UserError(f"LoRA {name}: {len(unknown)} layers name no layer of this model: {_listing(unknown)}")
    check_lora(lora, models)
    return lora


def _layer(g: dict[str, mx.array], target, component: str, path: str, metadata: dict, name: str) -> LoraLayer:
    """Torch-layout down/up -> a LoraLayer in the target's MLX layout."""
    down, up = g["down"], g["up"]
    if down.ndim == 4:  # a conv LoRA (kohya's LoCon; SD 1.x's 1x1 proj_in/out, Linear layers here)
        down = down.transpose(0, 2, 3, 1)
        if isinstance(target, (nn.Linear, nn.QuantizedLinear)) and down.shape[1:3] == (1, 1):
            down = down.reshape(down.shape[0], -1)
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up.reshape(up.shape[:2])
    alpha = None
    if "alpha" in g:
        if g["alpha"].size != 1:
            raise UserError(f"LoRA {name}: {component} {path} alpha has shape {tuple(g['alpha'].shape)}")
        alpha = g["alpha"].astype(mx.float32).item() or None  # kohya: alpha 0 means alpha = rank
    else:
        peft_alpha, alpha_pattern, rslora = _peft_alphas(metadata, component)
        if peft_alpha is not None:
            alpha = _pattern_value(path, alpha_pattern, peft_alpha)
            if rslora:  # PEFT's rank-stabilised scale alpha / sqrt(r), as an alpha over r
                alpha *= math.sqrt(down.shape[0])
    if alpha is not None:
        finite(f"LoRA {name} {component} {path} alpha", alpha)
    return LoraLayer(down, up, alpha)


def read_lora(path: str | Path, models: dict[str, nn.Module]) -> Lora:
    """A .safetensors or torch (.bin/.pt/.ckpt, through the restricted unpickler) LoRA file, resolved against
    the models' structures."""
    from .checkpoints.weights import read_weights, torch_state
    from .loading import read_safetensors

    path = Path(path)
    metadata = {}
    if path.suffix == ".safetensors" and path.is_file():
        weights, metadata = read_safetensors(path, "LoRA file")
        metadata = metadata or {}
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt") and path.is_file():
        obj = torch_state(path)
        weights = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, mx.array)}
        # torch-saved LoRAs may hold an alpha as a Python number rather than a tensor (read_weights keeps tensors)
        for k, v in obj.items():
            if isinstance(k, str) and k.endswith(".alpha") and not isinstance(v, mx.array):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e38 and math.isfinite(v)
                if not ok:
                    raise UserError(f"LoRA {path.name}: {printable(k)} is {printable(repr(v), 40)}, expected a number")
                weights[k] = mx.array(float(v))
        if not weights:
            raise UserError(f"{path}: holds no tensors")
    else:
        weights = read_weights(path)  # its errors: not found, unknown format
    return parse_lora(weights, metadata, models, path.name)


# -- fusing ----------------------------------------------------------------------------------------------------

@dataclass
class LoadedLora:
    ref: str
    lora: Lora
    scale: float


class _Fused:
    """Which layers of a model hold fused weights, and (for a model without a source file) their original arrays.
    A plain attribute of the model (not a dict, which MLX would take for parameters): it goes away with it."""

    def __init__(self):
        self.paths: set[str] = set()
        self.kept: dict[str, dict[str, mx.array]] = {}


def original_arrays(file: dict[str, mx.array], path: str, module) -> dict[str, mx.array]:
    """A module's arrays as load_component made them from its file: cast to the model's dtype, quantized on load
    with the layer's own bits and group size (or stored quantized). The same operations on the same bits, so the
    same result, bit for bit."""
    if not isinstance(module, nn.QuantizedLinear):
        return {"weight": file[f"{path}.weight"].astype(module.weight.dtype)}
    dtype = module.scales.dtype
    if f"{path}.scales" in file:  # a folder converted with --quantize
        return {k: file[f"{path}.{k}"].astype(dtype) if k != "weight" else file[f"{path}.{k}"]
                for k in ("weight", "scales", "biases") if f"{path}.{k}" in file}
    q = mx.quantize(file[f"{path}.weight"].astype(dtype), module.group_size, module.bits, mode=module.mode)
    return dict(zip(("weight", "scales", "biases"), q))


class LoraSet(LoadOrder[LoadedLora]):
    """Loaded LoRAs in load order, each with its scale. The pipeline calls `apply` for each loaded model after
    every change and whenever a model is (re)loaded."""

    def __init__(self):
        super().__init__()

    def add(self, lora: Lora, scale: float = 1.0, ref: str | None = None) -> int:
        finite("LoRA scale", scale)
        self.loaded.append(LoadedLora(ref or lora.name, lora, float(scale)))
        return len(self.loaded) - 1

    def index(self, which: int | str) -> int:
        if isinstance(which, int) and not isinstance(which, bool):
            if not -len(self.loaded) <= which < len(self.loaded):
                raise UserError(f"no LoRA {which}: {len(self.loaded)} loaded")
            return which % len(self.loaded)
        names = [la.ref for la in self.loaded]
        if which not in names:
            raise UserError(f"no LoRA {which!r} loaded (loaded: {', '.join(names) or 'none'})")
        return names.index(which)

    def remove(self, which: int | str | None = None) -> None:
        if which is None:
            self.loaded.clear()
        else:
            self.loaded.pop(self.index(which))

    def set_scales(self, *scales: float) -> None:
        if len(scales) != len(self.loaded):
            raise UserError(f"{len(scales)} scales for {len(self.loaded)} loaded LoRAs")
        for la, s in zip(self.loaded, scales):
            la.scale = float(finite("LoRA scale", s))

    def targets(self, component: str) -> dict[str, list[tuple[float, LoraLayer]]]:
        out: dict[str, list[tuple[float, LoraLayer]]] = {}
        for la in self.loaded:
            for path, layer in la.lora.layers.get(component, {}).items():
                out.setdefault(path, []).append((la.scale, layer))
        return out

    def apply(self, component: str, model: nn.Module, source: Callable[[], dict[str, mx.array]] | None = None) -> None:
        """Make `model`'s weights its originals plus every loaded LoRA's scaled delta for this component; layers
        no LoRA touches any more get their original arrays back, bit for bit.

        `source` gives the model's weights file (lazily: mx.load reads only the tensors used), from which
        `original_arrays` rebuilds a fused layer's originals: no second copy is held. Without it the originals
        of the fused layers are kept in memory."""
        state = model.__dict__.setdefault("_lora_fused", _Fused())
        targets = self.targets(component)
        file = None

        def original(path: str, module) -> dict[str, mx.array]:
            nonlocal file
            if path in state.kept:
                return state.kept[path]
            if file is None:
                file = source()
            return original_arrays(file, path, module)

        for path in [p for p in state.paths if p not in targets]:
            module = submodule(model, path)
            module.update(original(path, module))
            state.paths.discard(path)
            state.kept.pop(path, None)
            mx.eval(module.parameters())
        for path, deltas in targets.items():
            module = submodule(model, path)
            if path in state.paths:
                base = original(path, module)
            else:  # not fused yet: its arrays are the originals
                base = {k: module[k] for k in ("weight", "scales", "biases") if k in module}
                if source is None:
                    state.kept[path] = base
            quantized = isinstance(module, nn.QuantizedLinear)
            w = (mx.dequantize(base["weight"], base["scales"], base.get("biases"), module.group_size, module.bits,
                               mode=module.mode) if quantized else base["weight"])
            dtype = base["scales"].dtype if quantized else w.dtype
            w = w.astype(mx.float32).reshape(w.shape[0], -1)
            for s, layer in deltas:
                w = layer.add_to(w, s)
            w = w.reshape(base_shape(module)).astype(dtype)
            if quantized:
                module.update(dict(zip(("weight", "scales", "biases"),
                                       mx.quantize(w, module.group_size, module.bits, mode=module.mode))))
            else:
                module.weight = w
            state.paths.add(path)
            mx.eval(module.parameters())  # one layer at a time: the transient float32 copy stays one layer's

    def resident_bytes(self) -> int:
        """The LoRAs' own tensors: fused weights replace the originals, so nothing else stays (one layer's float32
        copy while fusing)."""
        return sum(la.lora.nbytes for la in self.loaded)
