"""Where weights come from: local paths, Hub repos, and the cache of converted MLX folders.

Hub downloads fetch only the files a component needs (allow_patterns), respect HF_HOME and
HF_HUB_OFFLINE (huggingface_hub reads both), and show huggingface_hub's progress bars. A converted
folder is cached under `$IPADAPTER_MLX_CACHE` (default `$HF_HOME/ipadapter-mlx`), keyed by the exact
source (Hub commit, or local path + size + mtime) and dtype, so a second run starts without converting.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import mlx.core as mx

from .errors import UserError
from .loading import is_mlx_folder

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")

# A diffusers SD repo: configs first, then per component one weights format (safetensors preferred).
CONFIG_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json"]
WEIGHT_PATTERNS = {
    "safetensors": ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"],
    "bin": ["text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin"],
}


def cache_root() -> Path:
    if os.environ.get("IPADAPTER_MLX_CACHE"):
        return Path(os.environ["IPADAPTER_MLX_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ipadapter-mlx"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _local_fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _key(str(path.resolve()), *(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))


def _dtype_name(dtype: mx.Dtype | None) -> str:
    return "source" if dtype is None else str(dtype).rpartition(".")[2]


def snapshot(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """Download (or find in the cache, offline too) just the files matching `patterns`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except RepositoryNotFoundError:
        raise UserError(f"model not found: no Hub repo {repo_id!r} (and no local path of that name)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{repo_id}: not in the local Hub cache and the Hub cannot be reached "
                        "(HF_HUB_OFFLINE is set, or no network)") from None
    except HfHubHTTPError as e:
        raise UserError(f"{repo_id}: download failed ({e})") from None


def download_diffusers_repo(repo_id: str, revision: str | None = None) -> Path:
    folder = snapshot(repo_id, CONFIG_PATTERNS, revision)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{repo_id} is not a diffusers pipeline repo (no model_index.json)")
    folder = snapshot(repo_id, CONFIG_PATTERNS + WEIGHT_PATTERNS["safetensors"], revision)
    missing = [p for p in WEIGHT_PATTERNS["safetensors"] if not (folder / p).is_file()]
    if missing:  # older repos: fall back to the .bin pickles for the components without safetensors
        bins = [WEIGHT_PATTERNS["bin"][WEIGHT_PATTERNS["safetensors"].index(p)] for p in missing]
        folder = snapshot(repo_id, CONFIG_PATTERNS + WEIGHT_PATTERNS["safetensors"] + bins, revision)
    return folder


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
    from convert.stable_diffusion import DEFAULT_TOKENIZER, convert_diffusers_folder, convert_single_file

    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and is_mlx_folder(path):
            return path
        dst = cache_root() / "converted" / f"{path.stem}-{_local_fingerprint(path)}-{_dtype_name(dtype)}"
        if is_mlx_folder(dst):
            return dst
        if path.is_dir():
            return convert_diffusers_folder(path, dst, dtype)
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path}: not a model (expected a folder or one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        config_dir = resolve_config(config) if config else None
        if tokenizer is None and config_dir is not None:
            tokenizer = str(config_dir / "tokenizer")
        return convert_single_file(path, dst, resolve_tokenizer(tokenizer or DEFAULT_TOKENIZER), dtype, config_dir)
    if not REPO_ID.match(model):
        raise UserError(f"model not found: {model} is neither an existing path nor a Hub repo id (org/name)")
    folder = download_diffusers_repo(model, revision)
    dst = cache_root() / "converted" / f"{model.replace('/', '--')}-{folder.name[:12]}-{_dtype_name(dtype)}"
    if is_mlx_folder(dst):
        return dst
    return convert_diffusers_folder(folder, dst, dtype)


def resolve_config(ref: str) -> Path:
    """A diffusers folder or Hub repo, for its configs and tokenizer only (no weights are downloaded)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if not REPO_ID.match(ref):
        raise UserError(f"config not found: {ref} is neither a folder nor a Hub repo id")
    return snapshot(ref, CONFIG_PATTERNS)


def resolve_tokenizer(ref: str) -> Path:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if not REPO_ID.match(ref):
        raise UserError(f"tokenizer not found: {ref}")
    folder = snapshot(ref, ["tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                            "tokenizer.json"])
    return folder
