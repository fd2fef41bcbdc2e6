"""Read weight files of any supported format, and fit a flat name->array dict onto an MLX module, strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from ..loading import read_safetensors

from .keymaps import IGNORED_SUFFIXES
from .torch_pickle import load_torch_file, printable

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def torch_state(path: Path, unwrap: str = "state_dict") -> dict:
    """A torch file's top-level dict (a Lightning-style .ckpt's state_dict, or what `unwrap` names), read without
    running code."""
    state = load_torch_file(str(path))
    if isinstance(state, dict) and isinstance(state.get(unwrap), dict):
        state = state[unwrap]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def read_weights(path: str | Path, unwrap: str = "state_dict") -> dict[str, mx.array]:
    """All tensors of a .safetensors or torch (.bin/.ckpt/.pt) file, by name (a torch file's tensors inside a dict
    under `unwrap` taken from there). Never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        weights, _ = read_safetensors(path)
    elif path.suffix in WEIGHT_SUFFIXES:
        weights = {k: v for k, v in torch_state(path, unwrap).items() if isinstance(k, str) and isinstance(v, mx.array)}
    else:
        raise UserError(f"{path}: unknown weights format (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    if not weights:
        raise UserError(f"{path}: holds no tensors")
    return weights


def _fit(name: str, value: mx.array, shape: tuple[int, ...], what: str) -> mx.array:
    """PyTorch layout -> MLX layout: conv kernels OIHW -> OHWI, and 1x1 convs that are Linear layers here."""
    if value.ndim == 4 and len(shape) == 4:
        value = value.transpose(0, 2, 3, 1)
    elif value.ndim == 4 and len(shape) == 2 and value.shape[2:] == (1, 1):
        value = value.reshape(value.shape[:2])
    if tuple(value.shape) != tuple(shape):
        raise UserError(f"{what}: weights do not fit the config: {name} is {tuple(value.shape)} in the file, "
                        f"the model its config describes expects {tuple(shape)}")
    return value


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(map(printable, sorted(names)[:limit])) + more


def fit_weights(
    model: nn.Module,
    weights: dict[str, mx.array],
    rename: Callable[[str], str] = lambda k: k,
    what: str = "model",
    dtype: mx.Dtype | None = None,
) -> dict[str, mx.array]:
    """Map every source tensor onto a parameter of `model`; fail naming what is missing or left over."""
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, mx.array] = {}
    unused = []
    for key, value in weights.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        name = rename(key)
        if name not in params:
            unused.append(key)
            continue
        value = _fit(name, value, params[name].shape, what)
        if mx.issubdtype(params[name].dtype, mx.floating) != mx.issubdtype(value.dtype, mx.floating):
            raise UserError(f"{what}: {key} holds {value.dtype} values, the model needs {params[name].dtype}")
        out[name] = value.astype(dtype) if dtype is not None and mx.issubdtype(value.dtype, mx.floating) else value
    missing = [k for k in params if k not in out]
    if unused or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameters missing from the file: {_listing(missing)}")
        if unused:
            parts.append(f"{len(unused)} tensors in the file fit no parameter: {_listing(unused)}")
        raise UserError(f"{what}: weights do not fit the config; " + "; ".join(parts))
    return out
