"""Downloads from the Hugging Face Hub: only the files a component needs (allow_patterns), HF_HOME and
HF_HUB_OFFLINE respected (huggingface_hub reads both), huggingface_hub's progress bars, and every failure as
one UserError line, at once when the Hub cannot be reached."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection

from .errors import UserError

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


def is_weights_file(path: str) -> bool:
    """Whether a name is a single weights file's (.safetensors, .ckpt, .bin, .pt, .pth; any case)."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def is_repo_id(ref: str) -> bool:
    """`org/name`, and not something meant as a local path (`./x`, `../x`, `/x`, `~/x`, `x.safetensors`)."""
    if ref.startswith(("./", "../", "/", "~")) or is_weights_file(ref):
        return False
    return bool(REPO_ID.match(ref))


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


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # the .bin: older repos


def model_files(repo: str, sub: str, what: str, check: Callable[[Path], None] | None = None) -> tuple[Path, Path]:
    """A diffusers model (config.json and one weights file, safetensors first) at the root of a Hub repo or in its
    sub-folder `sub`: (the snapshot, the model's folder in it). `check` sees config.json before any weights are
    downloaded."""
    prefix, where = (f"{sub}/", f"{repo}:{sub}") if sub else ("", repo)
    root = snapshot(repo, [f"{prefix}config.json"])
    if not (root / prefix / "config.json").is_file():
        raise UserError(f"{where} has no config.json: not a diffusers {what}")
    if check:
        check(root / prefix / "config.json")
    for name in DIFFUSERS_WEIGHTS:
        root = snapshot(repo, [f"{prefix}config.json", f"{prefix}{name}"])
        if (root / prefix / name).is_file():
            return root, root / prefix
    raise UserError(f"{where} has no {what} weights ({' or '.join(DIFFUSERS_WEIGHTS)})")


def names_a(ref: str, presets: Collection[str], is_folder: Callable[[Path], bool],
            is_file: Callable[[Path], bool]) -> bool:
    """For `python -m convert`: whether SOURCE names one kind of checkpoint (a ControlNet, a T2I-Adapter): one of
    its presets; a local folder or file, by the kind's own tests; REPO:PATH to a file (downloaded: whichever kind
    it is, converting needs it); a Hub repo or REPO:FOLDER by its config.json alone (a pipeline repo has none at
    its root). A repo that cannot be read is not of the kind: the converter that takes SOURCE says why."""
    path = Path(ref).expanduser()
    if ref in presets:
        return True
    if path.is_dir():
        return is_folder(path)
    if path.exists():
        return path.is_file() and is_file(path)
    repo, sub = split_hub_path(ref) or ((ref, "") if is_repo_id(ref) else (None, ""))
    if repo is None:
        return False
    if is_weights_file(sub):
        return is_file(hub_file(repo, sub))
    config = f"{sub}/config.json" if sub else "config.json"
    try:
        return is_folder(snapshot(repo, [config]) / Path(config).parent)
    except UserError:
        return False
