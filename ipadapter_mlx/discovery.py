"""Finding IP-Adapters (presets, REPO:PATH, files) and the CLIP image encoder each one needs."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .cache import converted_encoder
from .errors import UserError
from .hub import hub_file, is_repo_id, snapshot, split_hub_path
from .loading import is_mlx_folder

IP_ADAPTER_REPO = "h94/IP-Adapter"
PRESETS = {
    "sdxl": "h94/IP-Adapter:sdxl_models/ip-adapter_sdxl.safetensors",
    "sdxl-vit-h": "h94/IP-Adapter:sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    "sdxl-plus-vit-h": "h94/IP-Adapter:sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
    "sdxl-plus-face-vit-h": "h94/IP-Adapter:sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
    "sd15": "h94/IP-Adapter:models/ip-adapter_sd15.safetensors",
    "sd15-light": "h94/IP-Adapter:models/ip-adapter_sd15_light.safetensors",
    "sd15-plus": "h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors",
    "sd15-plus-face": "h94/IP-Adapter:models/ip-adapter-plus-face_sd15.safetensors",
    "sd15-full-face": "h94/IP-Adapter:models/ip-adapter-full-face_sd15.safetensors",
    "sd15-vit-g": "h94/IP-Adapter:models/ip-adapter_sd15_vit-G.safetensors",
}
# FaceID (faceid.py): the .bin files carry their LoRA (portrait has none); Plus reads h94/IP-Adapter's ViT-H
PRESETS.update({f"faceid-{name}": f"h94/IP-Adapter-FaceID:ip-adapter-{file}.bin" for name, file in {
    "sd15": "faceid_sd15", "plus-sd15": "faceid-plus_sd15", "plusv2-sd15": "faceid-plusv2_sd15",
    "portrait-sd15": "faceid-portrait_sd15", "portrait-v11-sd15": "faceid-portrait-v11_sd15",
    "sdxl": "faceid_sdxl", "plusv2-sdxl": "faceid-plusv2_sdxl", "portrait-sdxl": "faceid-portrait_sdxl",
    "portrait-unnorm-sdxl": "faceid-portrait_sdxl_unnorm"}.items()})
# Where h94/IP-Adapter keeps its two encoders: ViT-H/14 and ViT-bigG/14.
ENCODER_FOLDERS = ("models/image_encoder", "sdxl_models/image_encoder")


def resolve_ip_adapter(ref: str) -> tuple[Path, tuple[str, str] | None]:
    """A preset name, `REPO:PATH`, or a local file -> (local file, (repo, path) when it came from the Hub)."""
    ref = PRESETS.get(ref, ref)
    path = Path(ref).expanduser()
    if path.is_file() or (path.is_dir() and is_mlx_folder(path)):
        return path, None
    hub = split_hub_path(ref)
    if hub is None:
        raise UserError(f"IP-Adapter not found: {ref} is not a file, a REPO:PATH, or a preset "
                        f"({', '.join(PRESETS)})")
    return hub_file(*hub), hub


def resolve_lora(ref: str) -> Path:
    """A LoRA: a local file or `REPO:PATH` on the Hub (downloaded once, then from the cache)."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    hub = split_hub_path(ref)
    if hub is None:
        raise UserError(f"LoRA not found: {ref} is neither a file nor a REPO:PATH")
    return hub_file(*hub)


def _encoder_candidates(adapter_file: Path, hub: tuple[str, str] | None) -> list[tuple[str, str | Path]]:
    """Where the encoder may be: beside the adapter (as in the Hub repo), then h94's two encoders."""
    local = [("local", adapter_file.parent / "image_encoder")]
    local += [("local", adapter_file.parent.parent / f) for f in ENCODER_FOLDERS]
    remote = []
    if hub:
        repo, path = hub
        parent = path.rpartition("/")[0]
        remote += [(repo, f"{parent}/image_encoder" if parent else "image_encoder")] + [(repo, f) for f in ENCODER_FOLDERS]
    remote += [(IP_ADAPTER_REPO, f) for f in ENCODER_FOLDERS]
    seen, out = set(), []
    for c in local + remote:
        if (c[0] == "local" and not Path(c[1]).is_dir()) or c in seen:
            continue
        seen.add(c)
        out.append(c)
    return out


def _parse_encoder_ref(ref: str) -> tuple[str, str | Path]:
    """`--image-encoder`: a local folder (transformers or converted), `REPO:PATH`, or a repo id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return ("local", path)
    if path.exists():
        raise UserError(f"image encoder {ref} is a file; give its folder (config.json and the weights)")
    if split_hub_path(ref):
        return split_hub_path(ref)
    if is_repo_id(ref):
        return (ref, "")
    raise UserError(f"image encoder not found: {ref}")


def _encoder_config(where: str, sub: str | Path) -> dict:
    from .loading import read_json

    if where == "local":
        sub = Path(sub)
        return read_json(sub / "image_encoder" / "config.json" if is_mlx_folder(sub) else sub / "config.json")
    cfg = f"{sub}/config.json" if sub else "config.json"
    return read_json(snapshot(where, [cfg]) / cfg)


def _encoder_source(where: str, sub: str) -> str:
    return str(sub) if where == "local" else f"{where}:{sub}"


def resolve_image_encoder(adapter, adapter_file: Path, hub: tuple[str, str] | None, override: str | None = None,
                          dtype: mx.Dtype | None = None) -> tuple[Path, str]:
    """The converted MLX folder of the image encoder this adapter needs, and where it came from (to tell the user).

    `override` wins; otherwise the first candidate (beside the adapter, then h94's two encoders) whose
    config fits the adapter's shapes, so a ViT-H adapter never gets the bigG encoder or the reverse."""
    from .config import CLIPVisionConfig

    candidates = [_parse_encoder_ref(override)] if override else _encoder_candidates(adapter_file, hub)
    errors = []
    for where, sub in candidates:
        try:
            adapter.check_encoder(CLIPVisionConfig.from_dict(_encoder_config(where, sub)))
        except UserError as e:
            if override:
                raise
            errors.append(f"{_encoder_source(where, sub)}: {e}")
            continue
        return converted_encoder(where, sub, dtype), _encoder_source(where, sub)
    raise UserError("no image encoder fits this adapter: " + "; ".join(errors))
