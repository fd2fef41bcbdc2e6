"""Read PyTorch `.bin` / `.ckpt` files (torch.save zip archives) without torch and without running code.

A torch checkpoint is a zip holding `<name>/data.pkl` plus one raw file per tensor storage. The pickle
may name any Python callable; a normal unpickler would call it. Ours knows only the handful of names
torch.save writes for tensors (`_rebuild_tensor_v2`, `_rebuild_parameter`, `OrderedDict`, the typed
storages) and rebuilds those itself with numpy. Every other name is refused before anything runs.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import mlx.core as mx
import numpy as np

from ipadapter_mlx.errors import UserError

# storage class name -> numpy dtype of its raw bytes (bfloat16 is read as uint16 and viewed in MLX)
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Tensor:
    """A rebuilt tensor: numpy data plus whether it was bfloat16."""

    def __init__(self, array: np.ndarray, bf16: bool):
        self.array, self.bf16 = array, bf16


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    data, bf16 = storage
    item = data.itemsize
    if len(size) and data.size < offset + 1 + sum((s - 1) * st for s, st in zip(size, stride) if s):
        raise UserError("corrupt checkpoint: a tensor reaches past its storage")
    arr = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=[s * item for s in stride])
    return _Tensor(np.ascontiguousarray(arr), bf16)


def _rebuild_parameter(tensor, requires_grad=False, hooks=None):
    return tensor


SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _Storage(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, tuple[np.ndarray, bool]] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(
                f"{self.path}: refusing to load '{module}.{name}': the file asks to run code that is not a tensor "
                "(only plain tensor checkpoints are read; convert it to .safetensors with a tool you trust)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise UserError(f"{self.path}: unexpected persistent id in pickle: {pid!r:.80}")
        storage, key = pid[1], str(pid[2])
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise UserError(f"{self.path}: corrupt checkpoint, storage {key} is missing") from None
            self.storages[key] = (np.frombuffer(raw, dtype=storage.dtype), storage.name == "BFloat16Storage")
        return self.storages[key]


def _to_mx(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        a = mx.array(obj.array)
        return a.view(mx.bfloat16) if obj.bf16 else a
    if isinstance(obj, dict):
        return {k: _to_mx(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_mx(v) for v in obj)
    return obj


def load_torch_file(path: str) -> Any:
    """The object saved by torch.save (dicts, lists, scalars), with tensors as mx.arrays."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(
            f"{path}: not a readable PyTorch zip checkpoint ({e}); legacy (pre-1.6) or truncated files are not supported"
        ) from None
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkls:
            raise UserError(f"{path}: no data.pkl inside, not a PyTorch checkpoint")
        prefix = pkls[0].rpartition("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
            raise UserError(f"{path}: big-endian checkpoints are not supported")
        try:
            with archive.open(pkls[0]) as f:
                obj = _RestrictedUnpickler(f, archive, prefix, path).load()
        except UserError:
            raise
        except Exception as e:  # a truncated or corrupt pickle stream
            raise UserError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    return _to_mx(obj)
