"""Converted MLX folder -> MLX modules, strictly: every parameter filled, no tensor left over.

A converted folder mirrors a diffusers repo: `text_encoder/`, `unet/`, `vae/` each hold the checkpoint's
own `config.json` and a `model.safetensors` in MLX layout; `tokenizer/` and `scheduler/` are copied as they
are; `mlx_model.json` is written last and marks the folder complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CLIPTextConfig, CLIPVisionConfig, ControlNetConfig, SchedulerConfig, UNetConfig, VAEConfig
from .errors import UserError
from .models import AutoencoderKL, CLIPTextModel, CLIPVisionModel, ControlNetModel, UNet2DConditionModel
from .models.t2i_adapter import T2IAdapter, T2IAdapterConfig

MARKER = "mlx_model.json"
FORMAT_VERSION = 1

# component folder -> (config class, module class)
COMPONENTS = {
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "text_encoder_2": (CLIPTextConfig, CLIPTextModel),
    "unet": (UNetConfig, UNet2DConditionModel),
    "vae": (VAEConfig, AutoencoderKL),
    "image_encoder": (CLIPVisionConfig, CLIPVisionModel),
    "t2i_adapter": (T2IAdapterConfig, T2IAdapter),
    "controlnet": (ControlNetConfig, ControlNetModel),
}


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


# safetensors dtype -> bytes per element (the ones MLX reads)
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
                        "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the reference reader's own limit


def check_safetensors(path: Path, what: str = "safetensors file") -> list[str]:
    """The tensor names of a .safetensors file, read from its header alone. Refuses a header that declares what the file does not hold, before MLX reads it: MLX accepts shapes whose
    byte count overflows (arrays of negative or 2**64 elements) and tensors that share bytes (one megabyte
    served a thousand times)."""
    def bad(why: str) -> UserError:
        return UserError(f"{path}: not a readable {what}, truncated or corrupt ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8:
            raise bad(f"{size} bytes, fewer than the 8 that give the header's length")
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise bad(f"header length {n}, the file holds {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise bad(f"header is not JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None)  # MLX writes null when there is none
    if not (meta is None or isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ is not a map of strings")
    data, spans = size - 8 - n, []
    for name, t in header.items():
        ok = (isinstance(t, dict) and t.get("dtype") in SAFETENSORS_ITEMSIZE
              and isinstance(t.get("shape"), list) and len(t["shape"]) <= 32
              and all(type(d) is int and 0 <= d < 2**31 for d in t["shape"])
              and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
              and all(type(o) is int for o in t["data_offsets"]))
        if not ok:
            raise bad(f"tensor {name!r:.80} has no valid dtype, shape and data_offsets")
        begin, end = t["data_offsets"]
        nbytes = math.prod(t["shape"]) * SAFETENSORS_ITEMSIZE[t["dtype"]]
        if not 0 <= begin <= end <= data or end - begin != nbytes:
            raise bad(f"tensor {name!r:.80} is {t['shape']} {t['dtype']} ({nbytes} bytes) at bytes {begin}..{end} "
                      f"of {data}")
        if end > begin:  # an empty tensor shares nothing
            spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {a!r:.80} and {b!r:.80} share bytes")
    return list(header)


MAX_NAME_TABLE = 64 << 20  # a torch file's data.pkl: names and layout only (real ones are under a few MB)


def holds_tensors(path: Path, *names: str, every: bool = False) -> bool:
    """Whether a weights file holds tensors named `names...` (any of them; with `every`, each of them), without
    reading the tensors: a .safetensors file's names come from its header (prefix match); a torch zip
    (.pth/.pt/.ckpt/.bin) keeps its names as plain strings in data.pkl, the tensors in other members (substring
    match). An unreadable or unknown file is False: the converter that takes it says what is wrong."""
    import zipfile

    if path.suffix == ".safetensors":
        try:
            keys = check_safetensors(path)
        except Exception:
            return False
        found = [any(k.startswith(n) for k in keys) for n in names]
    elif path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        try:
            with zipfile.ZipFile(path) as archive:
                pkl = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
                if pkl is None or pkl.file_size > MAX_NAME_TABLE:
                    return False
                data = archive.read(pkl)
        except Exception:  # any failure to read it (a corrupt or encrypted member too): only a yes/no question
            return False
        found = [n.encode() in data for n in names]
    else:
        return False
    return all(found) if every else any(found)


def read_safetensors(path: str | Path, what: str = "safetensors file") -> tuple[dict[str, mx.array], dict[str, str]]:
    """The arrays and metadata of a .safetensors file, its header checked first; every failure is a UserError."""
    path = Path(path)
    try:
        check_safetensors(path, what)
        return mx.load(str(path), return_metadata=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable {what}, truncated or corrupt ({e})") from None


def build(component: str, config: dict) -> nn.Module:
    """An MLX module with freshly initialised weights, sized by the checkpoint's config dict."""
    config_cls, module_cls = COMPONENTS[component]
    try:
        return module_cls(config_cls.from_dict(config))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{component} config.json is incomplete or invalid ({type(e).__name__}: {e})") from None


def is_mlx_folder(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


QUANTIZABLE = ("text_encoder", "text_encoder_2", "unet", "image_encoder", "controlnet")  # the VAE is convolutions; adapters are small


def load_component(
    folder: str | Path, component: str, dtype: mx.Dtype | None = None, quantize: tuple[int, int] | None = None
) -> nn.Module:
    """One model of a converted folder. `quantize` = (bits, group_size) quantizes its Linear layers on load;
    a folder converted with --quantize is loaded quantized as it is, without quantizing again."""
    from .quantize import quantize_model

    folder = Path(folder) / component
    config = read_json(folder / "config.json")
    model = build(component, config)
    stored = config.get("quantization")
    if stored:
        quantize_model(model, stored["bits"], stored["group_size"])
    path = folder / "model.safetensors"
    if not path.is_file():
        raise UserError(f"weights not found: {path}")
    weights, _ = read_safetensors(path)
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    bad = [k for k in params if k in weights and weights[k].shape != params[k].shape]
    kind = [k for k in params if k in weights and mx.issubdtype(weights[k].dtype, mx.floating)
            != mx.issubdtype(params[k].dtype, mx.floating)]  # int32 where floats belong: silent zeros
    if missing or extra or bad or kind:
        detail = "; ".join(
            f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", bad),
                                 ("wrong dtype", kind))
            if names
        )
        raise UserError(f"{path}: weights do not fit {component}/config.json ({detail})")
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    if quantize and not stored and component in QUANTIZABLE:
        quantize_model(model, *quantize)
    mx.eval(model.parameters())
    model.eval()
    return model


def component_bytes(
    folder: str | Path, component: str, dtype: mx.Dtype, quantize: tuple[int, int] | None = None
) -> int:
    """The bytes load_component(folder, component, dtype, quantize) will hold, from shapes alone: MLX arrays
    are lazy, so the model built here is never computed."""
    from .quantize import quantize_model

    config = read_json(Path(folder) / component / "config.json")
    model = build(component, config)
    model.set_dtype(dtype)
    stored = config.get("quantization")
    if stored or (quantize and component in QUANTIZABLE):
        quantize_model(model, *((stored["bits"], stored["group_size"]) if stored else quantize))
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_scheduler_config(folder: str | Path) -> SchedulerConfig:
    return SchedulerConfig.from_dict(read_json(Path(folder) / "scheduler" / "scheduler_config.json"))
