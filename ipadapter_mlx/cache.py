"""The cache of converted MLX folders: `$IPADAPTER_MLX_CACHE` (default `$HF_HOME/ipadapter-mlx`), keyed by the exact
source (Hub commit, or local path + size + mtime) and dtype, so a second run starts without converting.
Processes converting the same model at once take turns on a lock file: one converts, the others reuse its folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import mlx.core as mx

from .errors import UserError
from .folders import convert_once
from .hub import SINGLE_FILE_SUFFIXES, download_diffusers_repo, is_repo_id, resolve_config, snapshot
from .loading import is_mlx_folder

log = logging.getLogger(__name__)
ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a transformers CLIP vision folder's weights


def cache_root() -> Path:
    if os.environ.get("IPADAPTER_MLX_CACHE"):
        return Path(os.environ["IPADAPTER_MLX_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ipadapter-mlx"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _local_fingerprint(path: Path, *extra: str) -> str:
    """The identity of a local source: its resolved path, every file's size and time, and `extra` (whatever
    else decides the conversion, e.g. the --config and --tokenizer given for a single file)."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _key(str(path), *extra, *(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))


def _dtype_name(dtype: mx.Dtype | None) -> str:
    return "source" if dtype is None else str(dtype).rpartition(".")[2]


def resolve_model(
    model: str,
    dtype: mx.Dtype | None = None,
    tokenizer: str | None = None,
    config: str | None = None,
    revision: str | None = None,
) -> Path:
    """Any model reference -> a converted MLX folder (converting once, then cached).

    `model`: a converted MLX folder, a diffusers folder, a single-file checkpoint, or a Hub repo id.
    `dtype`: store the converted weights in this dtype (None keeps the source's).
    `tokenizer`: for single files, which carry none: a tokenizer folder or Hub repo (default CLIP ViT-L/14).
    `config`: for single files: a diffusers folder or Hub repo whose configs (and tokenizer) to use instead
    of those inferred from the tensor shapes.
    """
    from .checkpoints.stable_diffusion import convert_diffusers_folder, convert_single_file

    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and is_mlx_folder(path):
            return path
        extra = [] if path.is_dir() else [f"config={config}", f"tokenizer={tokenizer}"]
        dst = cache_root() / "converted" / f"{path.stem}-{_local_fingerprint(path, *extra)}-{_dtype_name(dtype)}"
        if path.is_dir():
            return convert_once(dst, lambda: convert_diffusers_folder(path, dst, dtype))
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path}: not a model (expected a folder or one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        config_dir = resolve_config(config) if config else None
        return convert_once(dst, lambda: convert_single_file(path, dst, tokenizer, dtype, config_dir))
    if not is_repo_id(model):
        raise UserError(f"model not found: {model} is neither an existing path nor a Hub repo id (org/name)")
    folder = download_diffusers_repo(model, revision)
    dst = cache_root() / "converted" / f"{model.replace('/', '--')}-{folder.name[:12]}-{_dtype_name(dtype)}"
    return convert_once(dst, lambda: convert_diffusers_folder(folder, dst, dtype))


def converted_encoder(where: str, sub: str | Path, dtype: mx.Dtype | None) -> Path:
    """The converted (cached) MLX folder of a transformers CLIP vision folder, local or on the Hub."""
    from .checkpoints.adapter_files import convert_image_encoder

    if where == "local":
        src = Path(sub)
        if is_mlx_folder(src):
            return src
        identity = _local_fingerprint(src)
    else:
        prefix = f"{sub}/" if sub else ""
        for name in ENCODER_WEIGHTS:
            root = snapshot(where, [f"{prefix}config.json", f"{prefix}{name}"])
            if (root / prefix / name).is_file():
                break
        else:
            raise UserError(f"{where}:{sub} has no encoder weights ({' or '.join(ENCODER_WEIGHTS)})")
        src, identity = root / prefix, _key(where, root.name, str(sub))  # root.name is the Hub commit
    dst = cache_root() / "converted" / f"image-encoder-{identity}-{_dtype_name(dtype)}"

    def convert() -> Path:
        log.info("converting image encoder %s ...", src)
        return convert_image_encoder(src, dst, dtype)

    return convert_once(dst, convert)
