"""Where weights come from: local paths, Hub repos, and the cache of converted MLX folders.

Hub downloads fetch only the files a component needs (allow_patterns), respect HF_HOME and
HF_HUB_OFFLINE (huggingface_hub reads both), and show huggingface_hub's progress bars. A converted
folder is cached under `$IPADAPTER_MLX_CACHE` (default `$HF_HOME/ipadapter-mlx`), keyed by the exact
source (Hub commit, or local path + size + mtime) and dtype, so a second run starts without converting.
Processes converting the same model at once take turns on a lock file: one converts, the others reuse its folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .errors import UserError
from .loading import is_mlx_folder

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")

# A diffusers SD repo: configs first, then per component one weights format (safetensors preferred).
CONFIG_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*", "*/config.json"]
WEIGHT_PATTERNS = {  # text_encoder_2: SDXL only
    "safetensors": ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"],
    "bin": ["text_encoder/pytorch_model.bin", "text_encoder_2/pytorch_model.bin", "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.bin"],
}


def is_repo_id(ref: str) -> bool:
    """`org/name`, and not something meant as a local path (`./x`, `../x`, `/x`, `~/x`, `x.safetensors`)."""
    if ref.startswith(("./", "../", "/", "~")) or Path(ref).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return False
    return bool(REPO_ID.match(ref))


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


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _unreachable(e: Exception) -> bool:
    """A connection failure, whichever HTTP library this huggingface_hub uses (requests, httpx)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & {"TransportError", "RequestException"})


@contextmanager
def hub_errors(what: str):
    """Every huggingface_hub failure about `what` (a repo, or REPO:PATH) -> one UserError line."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:  # before EntryNotFoundError: newer huggingface_hub derives it from that
        offline = constants.HF_HUB_OFFLINE
        raise UserError(f"{what}: not in the local Hub cache and the Hub cannot be reached "
                        f"({'HF_HUB_OFFLINE is set' if offline else 'no network'})") from None
    except EntryNotFoundError:
        repo, _, path = what.partition(":")
        raise UserError(f"{repo} has no file {path}" if path else f"{what}: file not found on the Hub") from None
    except GatedRepoError:
        raise UserError(f"{what}: a gated Hub repo; accept its terms on huggingface.co and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"not found: no Hub repo {what.partition(':')[0]!r} (and no local path of that name)") from None
    except RevisionNotFoundError:
        raise UserError(f"{what}: no such revision on the Hub") from None
    except HFValidationError:
        raise UserError(f"not found: {what} is neither an existing path nor a valid Hub repo id") from None
    except HfHubHTTPError as e:
        raise UserError(f"{what}: download failed ({_first_line(e)})") from None
    except Exception as e:
        if not _unreachable(e):
            raise
        raise UserError(f"{what}: not in the local Hub cache and the Hub cannot be reached "
                        f"({type(e).__name__}: {_first_line(e)})") from None


def snapshot(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """Download (or find in the cache, offline too) just the files matching `patterns`. Fails at once when the
    Hub is unreachable: snapshot_download asks the Hub once, without retries, and falls back to the cache."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id):
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))


def convert_once(dst: Path, convert: Callable[[], Path]) -> Path:
    """`dst` in the cache, converting it first unless it is there. Concurrent first uses of one model are safe:
    a lock file lets one process convert while the others wait, then find its complete folder."""
    import fcntl

    from convert.stable_diffusion import clean_stale

    clean_stale(dst.parent)  # what killed conversions left
    if is_mlx_folder(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "a") as lock:  # stays: deleting it would race with a waiter
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process converting into {dst} ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_mlx_folder(dst):  # the other process finished it
            return dst
        return convert()


def download_diffusers_repo(repo_id: str, revision: str | None = None) -> Path:
    folder = snapshot(repo_id, CONFIG_PATTERNS, revision)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{repo_id} is not a diffusers pipeline repo (no model_index.json)")
    folder = snapshot(repo_id, CONFIG_PATTERNS + WEIGHT_PATTERNS["safetensors"], revision)
    missing = [p for p in WEIGHT_PATTERNS["safetensors"]
               if (folder / p).parent.joinpath("config.json").is_file() and not (folder / p).is_file()]
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
    from convert.stable_diffusion import convert_diffusers_folder, convert_single_file

    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and is_mlx_folder(path):
            return path
        dst = cache_root() / "converted" / f"{path.stem}-{_local_fingerprint(path)}-{_dtype_name(dtype)}"
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


def _folder_or_snapshot(ref: str, patterns: list[str], what: str) -> Path:
    """A local folder as it is, or just the files matching `patterns` of a Hub repo."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if not is_repo_id(ref):
        raise UserError(f"{what} not found: {ref} is neither a folder nor a Hub repo id")
    return snapshot(ref, patterns)


def resolve_config(ref: str) -> Path:
    """A diffusers folder or Hub repo, for its configs and tokenizers only (no weights are downloaded)."""
    return _folder_or_snapshot(ref, CONFIG_PATTERNS, "config")


def resolve_tokenizer(ref: str) -> Path:
    return _folder_or_snapshot(ref, ["tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                                     "tokenizer.json"], "tokenizer")


# ---------------------------------------------------------------------------------------------------
# IP-Adapters and their image encoders

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
# Where h94/IP-Adapter keeps its two encoders: ViT-H/14 and ViT-bigG/14.
ENCODER_FOLDERS = ("models/image_encoder", "sdxl_models/image_encoder")
ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def split_hub_path(ref: str) -> tuple[str, str] | None:
    """`REPO:PATH` -> (repo, path), else None."""
    repo, sep, path = ref.partition(":")
    return (repo, path.strip("/")) if sep and is_repo_id(repo) and path else None


def hub_file(repo: str, path: str) -> Path:
    """One file of a Hub repo: from the local cache when it is there (no network), else downloaded. Fails at once
    when the Hub is unreachable: hf_hub_download alone retries for ~25 s, so one request without retries asks first."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    with hub_errors(f"{repo}:{path}"):
        cached = try_to_load_from_cache(repo, path)
        if isinstance(cached, str):
            return Path(cached)
        if not constants.HF_HUB_OFFLINE:
            get_hf_file_metadata(hf_hub_url(repo, path))
        return Path(hf_hub_download(repo, path))


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


def _converted_encoder(where: str, sub: str | Path, dtype: mx.Dtype | None) -> Path:
    """The converted (cached) MLX folder of a transformers CLIP vision folder, local or on the Hub."""
    from convert.ip_adapter import convert_image_encoder

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
        print(f"converting image encoder {src} ...", flush=True)
        return convert_image_encoder(src, dst, dtype)

    return convert_once(dst, convert)


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
        return _converted_encoder(where, sub, dtype), _encoder_source(where, sub)
    raise UserError("no image encoder fits this adapter: " + "; ".join(errors))
