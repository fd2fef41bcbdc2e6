"""Read PyTorch `.bin` / `.ckpt` files (torch.save zip archives) without torch and without running code.

A torch checkpoint is a zip holding `<name>/data.pkl` plus one raw file per tensor storage. The pickle
may name any Python callable; a normal unpickler would call it. Ours is a small interpreter of the
pickle opcodes a checkpoint uses (parsed by `pickletools.genops`, so every length is checked against the
bytes present): it knows only the names torch.save writes for tensors (`_rebuild_tensor_v2`,
`_rebuild_parameter`, `OrderedDict`, the typed storages) and rebuilds those itself. Every other name,
and every opcode that calls or mutates something else, is refused before anything runs.

A file may only ask for what it holds: tensor views lie inside their storage and read no element twice,
storages are read no larger than the tensors declare, and members inflate at most INFLATE_RATIO times
the file's size. Every failure is one UserError line.
"""

from __future__ import annotations

import math
import os
import pickletools
import zipfile
from collections import OrderedDict
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import UserError

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

MAX_PICKLE_BYTES = 64 << 20  # data.pkl of a full SDXL training checkpoint is a few MB
MAX_OPCODES = 4_000_000  # ~25 per tensor: room for 100k tensors, a few seconds at most
MAX_NDIM = 32
INFLATE_RATIO = 32  # zip members may inflate to this many times the file's size (torch.save stores: 1x)
VIEW_RATIO = 2  # tensors may total twice the storage bytes read (a weight saved with its transpose)
SLACK = 1 << 20

# opcodes whose argument, as genops parses it, is the value pushed
VALUE_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "FLOAT", "SHORT_BINSTRING", "BINSTRING",
             "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
KEY_TYPES = (str, int, float, bool, bytes, type(None))  # dict keys: scalars only (hashing nested tuples recurses)


class _StorageType(NamedTuple):  # immutable: a file cannot change how later files are read
    name: str
    dtype: type


STORAGE_TYPES = {("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()}


class _Storage(NamedTuple):
    key: str
    data: np.ndarray
    bf16: bool


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not a float that looks whole


def printable(name: str, limit: int = 80) -> str:
    """A name read from a file, safe in a one-line message (no newlines or control characters)."""
    return name[:limit] if name.isprintable() else ascii(name[:limit])


class _Unpickler:
    """One load: the archive, what it may still inflate, the storages read and the tensors rebuilt."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str):
        self.archive, self.prefix, self.path = archive, prefix, path
        self.budget = INFLATE_RATIO * os.path.getsize(path) + SLACK
        self.raw: dict[str, bytes] = {}
        self.storage_bytes = self.viewed = 0
        self.tensors: dict[tuple, mx.array] = {}  # the same view twice (tied weights) is one array
        self.calls = (self.rebuild_tensor, self.rebuild_parameter, self.ordered_dict)
        self.globals = {("torch._utils", "_rebuild_tensor_v2"): self.calls[0],
                        ("torch._utils", "_rebuild_parameter"): self.calls[1],
                        ("collections", "OrderedDict"): self.calls[2], **STORAGE_TYPES}

    def corrupt(self, why: str) -> UserError:
        return UserError(f"{self.path}: corrupt checkpoint, {why}")

    def read(self, name: str, nbytes: int | None = None) -> bytes:
        """`nbytes` of a member (all of it if None), refused when the member or the budget is too small."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise self.corrupt(f"{printable(name)} is missing") from None
        nbytes = info.file_size if nbytes is None else nbytes
        if nbytes > info.file_size:
            raise self.corrupt(f"{printable(name)} holds {info.file_size} bytes, its tensors declare {nbytes}")
        if nbytes > self.budget:
            raise self.corrupt(f"{printable(name)} would inflate to {nbytes} bytes, "
                               f"more than {INFLATE_RATIO}x the file")
        self.budget -= nbytes
        with self.archive.open(info) as f:
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise self.corrupt(f"{printable(name)} is truncated")
        return data

    def find_class(self, module: Any, name: Any) -> Any:
        if type(module) is not str or type(name) is not str:
            raise self.corrupt("a global's name is not a string")
        if (module, name) not in self.globals:
            raise UserError(
                f"{self.path}: refusing to load '{printable(module, 60)}.{printable(name, 60)}': the file asks to run "
                "code that is not a tensor (only plain tensor checkpoints are read; convert it to .safetensors with a "
                "tool you trust)"
            )
        return self.globals[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        # torch writes ("storage", storage type, key, location, number of elements)
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[1]) is _StorageType
                and type(pid[2]) is str and _is_int(pid[4]) and pid[4] >= 0):
            raise self.corrupt(f"unexpected persistent id (a {type(pid).__name__})")
        kind, key, numel = pid[1], pid[2], pid[4]
        nbytes = numel * np.dtype(kind.dtype).itemsize
        if key not in self.raw or len(self.raw[key]) < nbytes:
            self.raw[key] = self.read(f"{self.prefix}/data/{key}", nbytes)
            self.storage_bytes += nbytes
        data = np.frombuffer(self.raw[key], dtype=kind.dtype, count=numel)
        return _Storage(key, data, kind.name == "BFloat16Storage")

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if type(storage) is not _Storage:
            raise self.corrupt("a tensor without a storage")
        if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= MAX_NDIM
                and all(_is_int(x) for x in (offset, *size, *stride))):
            raise self.corrupt("a tensor's size, stride and offset are not integers")
        layout = f"size {size}, stride {stride}, offset {offset}"
        if offset < 0 or any(not 0 <= n < 2**31 for n in size) or any(s < 0 for s in stride):
            raise self.corrupt(f"a tensor has a negative or oversized layout ({layout})")
        key = (storage.key, storage.data.dtype.str, storage.bf16, offset, size, stride)
        if key in self.tensors:
            return self.tensors[key]
        data, numel = storage.data, math.prod(size)
        if numel:
            # Dims by stride: each must step past everything the smaller ones reach, so no element is read twice
            # (no zero strides, no overlap); then the last element reached must lie inside the storage.
            reach = 0
            for st, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
                if st <= reach:
                    raise self.corrupt(f"a tensor reads elements more than once ({layout})")
                reach += (n - 1) * st
            if offset + reach >= data.size:
                raise self.corrupt(f"a tensor reaches past its {data.size}-element storage ({layout})")
        self.viewed += numel * data.itemsize
        if self.viewed > VIEW_RATIO * self.storage_bytes + SLACK:
            raise self.corrupt(f"its tensors view the same storage over and over ({self.viewed} bytes "
                               f"from {self.storage_bytes})")
        view = (np.lib.stride_tricks.as_strided(data[offset:], size, [s * data.itemsize for s in stride]) if numel
                else np.zeros(size, data.dtype))
        array = mx.array(view)
        self.tensors[key] = array = array.view(mx.bfloat16) if storage.bf16 else array
        return array

    def rebuild_parameter(self, tensor, requires_grad=False, hooks=None):
        if not isinstance(tensor, mx.array):
            raise self.corrupt("a parameter without a tensor")
        return tensor

    def ordered_dict(self, *args):
        if args:
            raise self.corrupt("OrderedDict called with arguments")
        return OrderedDict()

    def load(self, data: bytes) -> Any:
        """Run the pickle opcodes: pushes, containers, the memo and our globals; nothing else is callable."""
        stack: list = []
        marks: list[list] = []
        memo: dict[int, Any] = {}
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            name = op.name
            if count >= MAX_OPCODES:
                raise self.corrupt(f"more than {MAX_OPCODES} pickle opcodes")
            if name in VALUE_OPS:
                stack.append(arg)
            elif name in CONSTANTS:
                stack.append(CONSTANTS[name])
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name in ("TUPLE", "LIST", "DICT", "POP_MARK", "APPENDS", "SETITEMS"):
                items, stack = stack, marks.pop()
                if name == "TUPLE":
                    stack.append(tuple(items))
                elif name == "LIST":
                    stack.append(items)
                elif name == "DICT":
                    stack.append(self.setitems({}, items))
                elif name == "APPENDS":
                    self.container(stack[-1], list).extend(items)
                elif name == "SETITEMS":
                    self.setitems(stack[-1], items)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                if len(items) != n:
                    raise IndexError("stack underflow")
                del stack[-n:]
                stack.append(items)
            elif name == "APPEND":
                value = stack.pop()
                self.container(stack[-1], list).append(value)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                self.setitems(stack[-1], [key, value])
            elif name == "POP":
                stack.pop()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise self.corrupt(f"pickle reads memo entry {arg} before writing it")
                stack.append(memo[arg])
            elif name == "GLOBAL":
                stack.append(self.find_class(*arg.split(" ", 1)))
            elif name == "STACK_GLOBAL":
                qualname, module = stack.pop(), stack.pop()
                stack.append(self.find_class(module, qualname))
            elif name == "BINPERSID":
                stack.append(self.persistent_load(stack.pop()))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                if not any(func is f for f in self.calls) or type(args) is not tuple:
                    raise self.corrupt(f"pickle calls a {type(func).__name__}, which is not a tensor constructor")
                stack.append(func(*args))
            elif name == "BUILD":
                # torch.save sets a state dict's `_metadata` this way; it is not needed and is dropped
                state = stack.pop()
                if type(stack[-1]) is not OrderedDict or type(state) is not dict:
                    raise self.corrupt(f"pickle sets the state of a {type(stack[-1]).__name__}, not of a state dict")
            elif name == "STOP":
                return stack.pop()
            elif name not in ("PROTO", "FRAME"):
                raise self.corrupt(f"pickle opcode {name}, which tensor checkpoints do not use")
        raise self.corrupt("pickle ends before STOP")  # genops raises first; kept for clarity

    def container(self, obj: Any, kind: type) -> Any:
        if not isinstance(obj, kind):
            raise self.corrupt(f"pickle adds items to a {type(obj).__name__}")
        return obj

    def setitems(self, target: Any, items: list) -> dict:
        self.container(target, dict)
        if len(items) % 2:
            raise self.corrupt("pickle gives a dict key without a value")
        for k, v in zip(items[::2], items[1::2]):
            if not isinstance(k, KEY_TYPES):
                raise self.corrupt(f"a dict key is a {type(k).__name__}")
            target[k] = v
        return target


def load_torch_file(path: str) -> Any:
    """The object saved by torch.save (dicts, lists, scalars), with tensors as mx.arrays."""
    try:
        archive = zipfile.ZipFile(path)
    except MemoryError:
        raise
    except Exception as e:  # BadZipFile, OSError, UnicodeDecodeError of a member's name, ...
        raise UserError(
            f"{path}: not a readable PyTorch zip checkpoint ({e}); legacy (pre-1.6) or truncated files are not "
            "supported"
        ) from None
    try:
        with archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkls:
                raise UserError(f"{path}: no data.pkl inside, not a PyTorch checkpoint")
            prefix = pkls[0].rpartition("/")[0]
            unpickler = _Unpickler(archive, prefix, path)
            if f"{prefix}/byteorder" in archive.namelist():
                order = unpickler.read(f"{prefix}/byteorder", min(archive.getinfo(f"{prefix}/byteorder").file_size, 16))
                if order.strip() != b"little":
                    raise UserError(f"{path}: only little-endian checkpoints are supported (byteorder "
                                    f"{order.strip()[:16]!r})")
            if archive.getinfo(pkls[0]).file_size > MAX_PICKLE_BYTES:
                raise unpickler.corrupt(f"{pkls[0]} is larger than {MAX_PICKLE_BYTES >> 20} MB")
            return unpickler.load(unpickler.read(pkls[0]))
    except (UserError, MemoryError):  # a file that fits its declarations but not this machine is not corrupt
        raise
    except Exception as e:  # a truncated or corrupt zip or pickle: BadZipFile, zlib.error, NotImplementedError, ...
        raise UserError(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
