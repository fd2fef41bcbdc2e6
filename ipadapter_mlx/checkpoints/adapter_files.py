"""IP-Adapter checkpoints (tencent format, .bin or .safetensors) and CLIP image encoders -> MLX."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..ip_adapter import IPAdapter, IPAdapterConfig
from ..loading import build, read_json
from ..models.image_proj import infer_image_proj_config

from ..folders import write_mlx_folder
from .stable_diffusion import component_weights, diffusers_rename, quantized
from .torch_pickle import load_torch_file, printable
from .weights import fit_weights, read_weights

IP_PREFIXES = ("image_proj.", "ip_adapter.")


def flat_adapter_weights(path: str | Path) -> dict[str, mx.array]:
    """`{"image_proj": {...}, "ip_adapter": {...}}` (.bin) or the flat `image_proj.*`/`ip_adapter.*` dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        weights = read_weights(path)
    else:
        if not path.is_file():
            raise UserError(f"IP-Adapter not found: {path}")
        obj = load_torch_file(str(path))
        if not (isinstance(obj, dict) and isinstance(obj.get("image_proj"), dict) and isinstance(obj.get("ip_adapter"), dict)):
            raise UserError(f"{path}: not an IP-Adapter checkpoint (expected 'image_proj' and 'ip_adapter' entries)")
        weights = {f"{top}.{k}": v for top in ("image_proj", "ip_adapter") for k, v in obj[top].items()
                   if isinstance(k, str) and isinstance(v, mx.array)}
    if not any(k.startswith("image_proj.") for k in weights) or not any(k.startswith("ip_adapter.") for k in weights):
        raise UserError(f"{path}: not an IP-Adapter checkpoint (no image_proj.* / ip_adapter.* tensors)")
    return weights


def split_faceid_lora(weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """(adapter weights, the FaceID LoRA's `ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight`)."""
    lora = {k: v for k, v in weights.items() if k.startswith("ip_adapter.") and "_lora." in k}
    return {k: v for k, v in weights.items() if k not in lora}, lora


def infer_ip_adapter_config(weights: dict[str, mx.array], name: str = "") -> IPAdapterConfig:
    """The config from the tensors' shapes; `name` (the file's) tells what the weights cannot: FaceID Plus v2's
    shortcut and portrait-unnorm's face input (as ComfyUI_IPAdapter_plus tells them)."""
    name = name.lower()
    try:
        proj = infer_image_proj_config({k[len("image_proj."):]: v for k, v in weights.items()
                                        if k.startswith("image_proj.")}, face="unnorm" in name)
        proj.shortcut = proj.kind == "faceid-plus" and "plusv2" in name
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"IP-Adapter projection has unexpected tensors ({type(e).__name__}: {e})") from None
    layers: dict[str, int] = {}
    contexts = set()
    # a layer is known by either projection, so one without to_k_ip is reported as missing it
    for k, v in weights.items():
        parts = k.split(".")
        if len(parts) == 4 and parts[0] == "ip_adapter" and parts[2] in ("to_k_ip", "to_v_ip") and parts[3] == "weight":
            if v.ndim != 2:
                raise UserError(f"IP-Adapter tensor {printable(k)} is {tuple(v.shape)}, expected a matrix")
            layers[parts[1]] = v.shape[0]
            contexts.add(v.shape[1])
    if not layers:
        raise UserError("IP-Adapter checkpoint has no ip_adapter.N.to_k_ip weights")
    if contexts != {proj.output_dim}:
        raise UserError(f"IP-Adapter is inconsistent: its projection makes {proj.output_dim}-d tokens, "
                        f"its attention layers read {'/'.join(map(str, sorted(contexts)))}-d")
    return IPAdapterConfig(proj, proj.output_dim, layers)  # checks the layer numbers


def read_ip_adapter(path: str | Path, dtype: mx.Dtype | None = None) -> IPAdapter:
    """An IP-Adapter file (or a folder written by `python -m convert`) -> an MLX IPAdapter, checked strictly."""
    if Path(path).is_dir():
        folder = Path(path) / "ip_adapter"
        adapter = IPAdapter(IPAdapterConfig.from_dict(read_json(folder / "config.json")))
        weights, lora = split_faceid_lora(read_weights(folder / "model.safetensors"))
        fitted = fit_weights(adapter, weights, what=str(folder), dtype=dtype)
        adapter.load_weights(list(fitted.items()))
        adapter._lora = lora
        return adapter
    weights, lora = split_faceid_lora(flat_adapter_weights(path))
    try:
        config = infer_ip_adapter_config(weights, Path(path).name)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    adapter = IPAdapter(config)
    fitted = fit_weights(adapter, weights, what=str(path), dtype=dtype)
    adapter.load_weights(list(fitted.items()))
    adapter.eval()
    adapter._lora = lora
    return adapter


def save_ip_adapter(path: str | Path, dst: str | Path, dtype: mx.Dtype | None = None) -> Path:
    """`python -m convert` for adapters: an MLX folder with config.json and model.safetensors."""
    adapter = read_ip_adapter(path, dtype)
    from mlx.utils import tree_flatten

    tensors = dict(tree_flatten(adapter.parameters())) | adapter._lora  # a FaceID LoRA travels with its adapter
    return write_mlx_folder(Path(dst), {"ip_adapter": (adapter.config.to_dict(), tensors)},
                            str(path), kind="ip-adapter")


def convert_image_encoder(
    src: str | Path, dst: str | Path, dtype: mx.Dtype | None = None, quantize: tuple[int, int] | None = None
) -> Path:
    """A transformers CLIPVisionModelWithProjection folder -> an MLX folder (image_encoder/ inside)."""
    src = Path(src)
    config = read_json(src / "config.json")
    weights = fit_weights(build("image_encoder", config), component_weights(src), diffusers_rename("image_encoder"),
                          what=str(src), dtype=dtype)
    return write_mlx_folder(Path(dst), {"image_encoder": quantized("image_encoder", config, weights, quantize)},
                            str(src), kind="image-encoder")
