"""LoRAs: low-rank weight deltas, read from kohya/A1111 and diffusers/PEFT files and fused into the weights.

The core, which other features (FaceID) build on:
  `LoraLayer(down, up, alpha)`  one layer's delta, `scale * alpha / rank * up @ down`, in MLX layout
  `Lora(name, layers)`          {component ("unet", "text_encoder", "text_encoder_2") -> {module path -> layer}},
                                module paths in diffusers naming, as our MLX modules are named
  `check_lora(lora, models)`    every layer against the modules it names (shapes, kind), strictly
  `LoraSet`                     the loaded LoRAs and their scales; `apply(component, model)` fuses their sum
                                into a model's Linear / Conv2d weights, restoring the kept originals exactly

Names are derived from the models themselves, as kohya's sd-scripts derives them: a kohya name is the module
path with '.' -> '_' behind `lora_unet_` / `lora_te_` (`lora_te1_` / `lora_te2_` on SDXL); SDXL files name the
UNet in the original (LDM) layout, which keymaps.py's config-derived table maps. diffusers/PEFT names are the
module paths behind `unet.` / `text_encoder.` / `text_encoder_2.`.

Fusing keeps each touched weight's original array (MLX arrays are immutable: no copy is made, the fused array
is the extra memory) and recomputes `original + sum(deltas)` on every change, so unloading restores the base
weights bit for bit. Quantized layers are dequantized, fused and quantized again with their own bits and
group size (the originals are kept quantized).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError, finite

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# key suffix -> what it holds; kohya writes the first three, PEFT / diffusers >= 0.24 the next two, older
# diffusers the rest
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".lora_A.weight": "down",
         ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
         ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
# LyCORIS / DoRA variants: a different delta than up @ down, refused by name
UNSUPPORTED = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lora_mid": "LoCon with a Tucker (CP) mid weight",
               "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "full-weight diff", "w_norm": "GLoRA"}
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

    def delta(self, weight_shape: tuple[int, ...]) -> mx.array:
        """The float32 delta in the weight's own layout (out, in) or (out, kh, kw, in)."""
        scale = (self.alpha if self.alpha is not None else self.rank) / self.rank
        d = self.up.astype(mx.float32) @ self.down.astype(mx.float32).reshape(self.rank, -1)
        return (scale * d).reshape(weight_shape)

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
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# -- checking a Lora against the models ---------------------------------------------------------------------

def _family(two_encoders: bool, widths: set[int]) -> str:
    w = max(widths) if widths else 0
    known = KNOWN_WIDTHS.get(w)
    kind = known or ("an SDXL-style model" if two_encoders else "an SD-style model")
    return f"{kind} (cross-attention width {w}, {'two text encoders' if two_encoders else 'one text encoder'})"


def _unet_widths(models: dict[str, nn.Module]) -> set[int]:
    unet = models.get("unet")
    return {a.to_k.weight.shape[1] for _, a in unet.cross_attentions()} if unet is not None else set()


def check_family(name: str, components: set[str], widths: set[int], models: dict[str, nn.Module]) -> None:
    """A LoRA for another family (SDXL on SD 1.5, ...) fails with one line naming both, before any detail.
    `components`: those the LoRA has layers for; `widths`: the input widths of its cross-attention to_k/to_v."""
    model_widths = _unet_widths(models)
    other_encoder = "text_encoder_2" in components and "text_encoder_2" not in models
    if other_encoder or (widths and model_widths and not widths <= model_widths):
        two = "text_encoder_2" in components or max(widths, default=0) == 2048
        raise UserError(f"LoRA {name} is for {_family(two, widths)}; the model is "
                        f"{_family('text_encoder_2' in models, model_widths)}")


def check_lora(lora: Lora, models: dict[str, nn.Module]) -> None:
    """Every layer names a Linear/Conv2d of `models` (structures suffice) and fits its shape; fails naming
    what does not."""
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
                  and tuple(d.shape[1:]) == tuple(shape[1:]) and 0 < d.shape[0] <= math.prod(shape[1:])
                  and mx.issubdtype(d.dtype, mx.floating) and mx.issubdtype(u.dtype, mx.floating))
            if not ok:
                raise UserError(f"LoRA {lora.name}: {component} {path} has down {tuple(d.shape)} and up "
                                f"{tuple(u.shape)}; the layer's weight is {shape}")
            if layer.alpha is not None and not (math.isfinite(layer.alpha)):
                raise UserError(f"LoRA {lora.name}: {component} {path} has alpha {layer.alpha}")


# -- reading files -------------------------------------------------------------------------------------------

def name_index(component: str, model: nn.Module) -> dict[str, str]:
    """{name a file may use -> module path} for every fusable module: the path itself (diffusers/PEFT), the
    kohya name (path with '.' -> '_'), and the same two for an alias: for the UNet its name in the original
    LDM layout (SDXL kohya files), from keymaps' config-derived table; for a text encoder its name without
    `text_model.`. Names two modules would share are left out."""
    from .checkpoints.keymaps import rename, unet_original_to_diffusers

    paths = [p for p, m in model.named_modules() if fusable(m)]
    if component == "unet":
        inverse = [(dst, src) for src, dst in unet_original_to_diffusers(model.config)]
        aliases = [(rename(p, inverse), p) for p in paths]
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
                # older diffusers: attention processors' own LoRA layers (attn1.processor.to_q_lora)
                name = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora$",
                              lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]), name)
                return prefixes[prefix], name, role
    return None


def _peft_alphas(metadata: dict[str, str], component: str) -> tuple[float | None, dict, dict]:
    """diffusers' saved LoraConfig (`lora_adapter_metadata`) for one component: (lora_alpha, alpha_pattern,
    use_rslora), or (None, {}, False) without it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except ValueError:
        raise UserError("LoRA metadata lora_adapter_metadata is not JSON") from None
    prefix = component + "."
    if config.get(prefix + "use_dora"):
        raise UserError("a DoRA LoRA (use_dora in its metadata): only plain LoRA / LoCon (up @ down) is supported")
    alpha = config.get(prefix + "lora_alpha")
    return alpha, config.get(prefix + "alpha_pattern") or {}, bool(config.get(prefix + "use_rslora"))


def _pattern_value(path: str, pattern: dict, default):
    """PEFT's pattern lookup: a key matches a module whose name ends with it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def parse_lora(weights: dict[str, mx.array], metadata: dict[str, str], models: dict[str, nn.Module],
               name: str) -> Lora:
    """A file's tensors -> a Lora for these models (structures suffice), strictly: every key is read or named."""
    for key in weights:
        for part, kind in UNSUPPORTED.items():
            if f".{part}" in key or key.startswith(part):
                raise UserError(f"LoRA {name}: a {kind} file ({key}); only plain LoRA / LoCon (up @ down) is "
                                "supported")
    groups: dict[tuple[str, str], dict[str, mx.array]] = {}
    not_lora = []
    for key, value in weights.items():
        parsed = _split_key(key)
        if parsed is None:
            not_lora.append(key)
            continue
        component, module, role = parsed
        groups.setdefault((component, module), {})[role] = value
    if not groups:
        raise UserError(f"{name} is not a LoRA: no lora_down/lora_up or lora_A/lora_B keys "
                        f"(keys: {_listing(weights)})")
    if not_lora:
        raise UserError(f"LoRA {name}: {len(not_lora)} keys are not LoRA weights: {_listing(not_lora)}")
    missing = [f"{c}:{m}" for (c, m), g in groups.items() if not {"down", "up"} <= set(g)]
    if missing:
        raise UserError(f"LoRA {name}: layers without both down and up weights: {_listing(missing)}")

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
            alpha = float(_pattern_value(path, alpha_pattern, peft_alpha))
            if rslora:  # PEFT's rank-stabilised scale alpha / sqrt(r), as an alpha over r
                alpha *= math.sqrt(down.shape[0])
    if alpha is not None:
        finite(f"LoRA {name} {component} {path} alpha", alpha)
    return LoraLayer(down, up, alpha)


def read_lora(path: str | Path, models: dict[str, nn.Module]) -> Lora:
    """A .safetensors or torch (.bin/.pt/.ckpt, through the restricted unpickler) LoRA file, resolved against
    the models' structures."""
    from .checkpoints.weights import read_weights
    from .loading import read_safetensors

    path = Path(path)
    metadata = {}
    if path.suffix == ".safetensors" and path.is_file():
        weights, metadata = read_safetensors(path, "LoRA file")
        metadata = metadata or {}
    else:
        weights = read_weights(path)
    return parse_lora(weights, metadata, models, path.name)


# -- fusing ----------------------------------------------------------------------------------------------------

@dataclass
class LoadedLora:
    ref: str
    lora: Lora
    scale: float


class _Originals:
    """A model's original arrays of the layers LoRAs touch, {path: {name: array}}. Kept as a plain attribute of
    the model (not a dict, which MLX would take for parameters), so it goes away with the model."""

    def __init__(self):
        self.arrays: dict[str, dict[str, mx.array]] = {}


class LoraSet:
    """Loaded LoRAs in load order, each with its scale. The pipeline calls `apply` for each loaded model after
    every change and whenever a model is (re)loaded."""

    def __init__(self):
        self.loaded: list[LoadedLora] = []

    def __len__(self) -> int:
        return len(self.loaded)

    def __getitem__(self, index: int) -> LoadedLora:
        return self.loaded[index]

    def __iter__(self):
        return iter(self.loaded)

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

    def apply(self, component: str, model: nn.Module) -> None:
        """Make `model`'s weights its originals plus every loaded LoRA's scaled delta for this component; layers
        no LoRA touches any more get their original arrays back (bit for bit)."""
        originals = model.__dict__.setdefault("_lora_originals", _Originals()).arrays
        targets = self.targets(component)
        for path in [p for p in originals if p not in targets]:
            submodule(model, path).update(originals.pop(path))
        updated = []
        for path, deltas in targets.items():
            module = submodule(model, path)
            base = originals.setdefault(path, {k: module[k] for k in ("weight", "scales", "biases") if k in module})
            shape = base_shape(module)
            delta = sum(s * layer.delta(shape) for s, layer in deltas)
            if isinstance(module, nn.QuantizedLinear):
                w = mx.dequantize(base["weight"], base["scales"], base.get("biases"), module.group_size,
                                  module.bits, mode=module.mode)
                w = (w.astype(mx.float32) + delta).astype(base["scales"].dtype)
                q = mx.quantize(w, module.group_size, module.bits, mode=module.mode)
                module.update(dict(zip(("weight", "scales", "biases"), q)))
            else:
                w = base["weight"]
                module.weight = (w.astype(mx.float32) + delta).astype(w.dtype)
            updated.append(module.parameters())
        mx.eval(updated)

    def resident_bytes(self) -> int:
        """The LoRAs' own tensors (the fused copies of the touched weights come on top: memory.py)."""
        return sum(la.lora.nbytes for la in self.loaded)
