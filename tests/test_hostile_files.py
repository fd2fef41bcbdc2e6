"""Hostile files: each ends in one UserError line naming what is wrong, in bounded time and memory; real
torch.save files still load bit-exactly (torch.load is the reference).

The hostile files are crafted byte by byte (pickle opcodes, zip headers, safetensors headers) and loaded in one
child process whose address space is capped (RLIMIT_AS): a bomb that comes back fails its test instead of taking
the machine down. The seeded fuzz test mutates small real files the same way.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import resource
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ipadapter_mlx  # noqa: F401  (before mlx: BLAS routing)
import mlx.core as mx
from ipadapter_mlx.checkpoints.torch_pickle import load_torch_file
from ipadapter_mlx.checkpoints.weights import read_weights
from ipadapter_mlx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CHILD_MEMORY = 2 << 30  # the bombs below declare 3-4 GB; the legit loads need ~0.7 GB of address space

# ---------------------------------------------------------------------------------------------------
# A tiny pickle assembler: the opcodes torch.save writes (protocol 2), with any values we like


def _val(x) -> bytes:
    if isinstance(x, bool):
        return b"\x88" if x else b"\x89"
    if isinstance(x, int):
        enc = pickle.encode_long(x)
        return b"\x8a" + bytes([len(enc)]) + enc  # LONG1
    if isinstance(x, float):
        return b"G" + struct.pack(">d", x)
    if isinstance(x, str):
        return b"X" + struct.pack("<I", len(x.encode())) + x.encode()
    if isinstance(x, tuple):
        return b"(" + b"".join(map(_val, x)) + b"t"
    raise TypeError(x)


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(size, stride, offset=0, numel=None, storage="FloatStorage", key="0") -> bytes:
    """The opcodes of one `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` call."""
    numel = math.prod(size) if numel is None else numel
    pid = b"(" + _val("storage") + _global("torch", storage) + _val(key) + _val("cpu") + _val(numel) + b"tQ"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = pid + _val(offset) + _val(tuple(size)) + _val(tuple(stride)) + _val(False) + hooks
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def _dict(**entries: bytes) -> bytes:
    return b"\x80\x02}(" + b"".join(_val(k) + v for k, v in entries.items()) + b"u."


def checkpoint(path: Path, pkl: bytes, storages: dict | None = None, byteorder: bytes | None = b"little",
               compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip laid out as torch.save lays it out."""
    storages = {"0": np.arange(4, dtype=np.float32).tobytes()} if storages is None else storages
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def patch_zip(path: Path, name: str, method: int | None = None, new_name: bytes | None = None) -> Path:
    """Rewrite a member's compression method or name in its local and central headers (the name keeps its
    length; the UTF-8 flag is set so zipfile decodes it strictly)."""
    raw = bytearray(path.read_bytes())
    for sig, flags_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        start = 0
        while (at := raw.find(sig, start)) >= 0:
            start = at + 4
            if raw[at + name_at: at + name_at + len(name)] != name.encode():
                continue
            if method is not None:
                raw[at + method_at: at + method_at + 2] = struct.pack("<H", method)
            if new_name is not None:
                raw[at + flags_at: at + flags_at + 2] = struct.pack("<H", 0x800)
                raw[at + name_at: at + name_at + len(new_name)] = new_name
    path.write_bytes(bytes(raw))
    return path


def safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def adapter_file(path: Path, layers: dict[str, dict[str, tuple]]) -> Path:
    """A flat IP-Adapter .safetensors: a base (linear) projection 8 -> 2 tokens of 4, and the given layers."""
    w = {"image_proj.proj.weight": mx.zeros((8, 8)), "image_proj.proj.bias": mx.zeros((8,)),
         "image_proj.norm.weight": mx.ones((4,)), "image_proj.norm.bias": mx.zeros((4,))}
    for i, parts in layers.items():
        w |= {f"ip_adapter.{i}.{p}.weight": mx.zeros(shape) for p, shape in parts.items()}
    mx.save_safetensors(str(path), w)
    return path


def features_file(path: Path, meta: dict, cond=(1, 4), uncond=(1, 4)) -> Path:
    mx.save_safetensors(str(path), {"cond": mx.zeros(cond), "uncond": mx.zeros(uncond)}, metadata=meta)
    return path


def _nested(n: int) -> bytes:
    return b"(" * n + b"t" * n


def _laughs(levels: int = 30, fan: int = 10) -> bytes:
    """A list of ten references to a list of ten references ... (10**30 leaves in under 2 KB of memo pickle)."""
    out = b"]r" + struct.pack("<I", 0)
    for i in range(1, levels + 1):  # each level memoized, then popped: only the top one stays on the stack
        out += b"0(" + (b"j" + struct.pack("<I", i - 1)) * fan + b"lr" + struct.pack("<I", i)
    return b"\x80\x02}(" + _val("w") + out + b"u."


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
KV = {"to_k_ip": (8, 4), "to_v_ip": (8, 4)}  # one adapter layer that fits adapter_file's projection
ZEROS_64MB = 64 << 20

# name -> (build(folder) -> path, load, expected message). Loads: "weights" read_weights, "adapter"
# read_ip_adapter, "features" load_features.
HOSTILE = {
    "negative stride -2**40": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((2,), (-2**40,), numel=4))),
                               "weights", r"negative or oversized layout \(size \(2,\), stride \(-1099511627776,\)"),
    "stride -1, offset 3": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((4,), (-1,), 3, numel=4))),
                            "weights", r"negative or oversized layout"),
    "negative offset": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((2,), (1,), -2, numel=4))),
                        "weights", r"negative or oversized layout .*offset -2"),
    "float stride": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((2,), (1.0,), numel=4))),
                     "weights", r"size, stride and offset are not integers"),
    "size 2**40": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((2**40,), (1,), numel=4))),
                   "weights", r"negative or oversized layout"),
    "view past storage": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((2, 3), (3, 1), 1, numel=4))),
                          "weights", r"past its 4-element storage \(size \(2, 3\), stride \(3, 1\), offset 1\)"),
    "zero strides declaring 3 GB": (
        lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((1 << 14, 1 << 14, 3), (0, 0, 1), numel=4))),
        "weights", r"reads elements more than once"),
    "overlapping strides": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((3, 2), (1, 1), numel=4))),
                            "weights", r"reads elements more than once"),
    "storage declaring 4 GB": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((2,), (1,), numel=2**30))),
                               "weights", r"archive/data/0 holds 16 bytes, its tensors declare 4294967296"),
    "one storage viewed 1000 times": (
        lambda d: checkpoint(d / "a.bin", _dict(**{f"w{i}": _tensor((1 << 18,), (1,), i, numel=1 << 20)
                                                   for i in range(1000)}), {"0": bytes(4 << 20)}),
        "weights", r"view the same storage over and over"),
    "zip bomb (64 MB of zeros deflated)": (
        lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((ZEROS_64MB // 4,), (1,))), {"0": bytes(ZEROS_64MB)},
                             compression=zipfile.ZIP_DEFLATED),
        "weights", r"archive/data/0 would inflate to 67108864 bytes, more than 32x the file"),
    "unsupported zip compression": (
        lambda d: patch_zip(checkpoint(d / "a.bin", _dict(w=_tensor((4,), (1,)))), "archive/data.pkl", method=99),
        "weights", r"corrupt checkpoint \(NotImplementedError: .*compression"),
    "non-UTF-8 member name": (
        lambda d: patch_zip(checkpoint(d / "a.bin", _dict(w=_tensor((4,), (1,)))), "archive/byteorder",
                            new_name=b"archive/byteord\xff\xff"),
        "weights", r"not a readable PyTorch zip checkpoint \('utf-8' codec"),
    "non-UTF-8 byteorder": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((4,), (1,))), byteorder=b"\xff\xfe"),
                            "weights", r"only little-endian checkpoints are supported \(byteorder b'\\xff\\xfe'\)"),
    "missing storage": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((4,), (1,))), {}),
                        "weights", r"archive/data/0 is missing"),
    "billion laughs": (lambda d: checkpoint(d / "a.bin", _laughs()), "weights", r"holds no tensors"),
    "LONG_BINPUT 335M": (lambda d: checkpoint(d / "a.bin", b"\x80\x02}r" + struct.pack("<I", 335_000_000) + b"."),
                         "weights", r"holds no tensors"),
    "GET before PUT": (lambda d: checkpoint(d / "a.bin", b"\x80\x02j" + struct.pack("<I", 335_000_000) + b"."),
                       "weights", r"reads memo entry 335000000 before writing it"),
    "200k nested tuples": (lambda d: checkpoint(d / "a.bin", b"\x80\x02" + _nested(200_000) + b"."),
                           "weights", r"expected a dict of tensors, found tuple"),
    "nested tuple as a dict key": (
        lambda d: checkpoint(d / "a.bin", b"\x80\x02}(" + _nested(200_000) + _val(1) + b"u."),
        "weights", r"a dict key is a tuple"),
    "bytes8 declaring 2**60 bytes": (
        lambda d: checkpoint(d / "a.bin", b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b"xy."),
        "weights", r"corrupt checkpoint \(ValueError: expected 1152921504606846976 bytes in a bytes8"),
    "truncated pickle": (lambda d: checkpoint(d / "a.bin", _dict(w=_tensor((4,), (1,)))[:-2]),
                         "weights", r"corrupt checkpoint \(ValueError: pickle exhausted before seeing STOP"),
    "BUILD on a storage type": (
        lambda d: checkpoint(d / "a.bin", b"\x80\x02" + _global("torch", "FloatStorage") + b"}(" + _val("name")
                             + _val("HalfStorage") + b"ub."),
        "weights", r"sets the state of a _StorageType, not of a state dict"),
    "BUILD on _rebuild_tensor_v2": (
        lambda d: checkpoint(d / "a.bin", b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"}b."),
        "weights", r"sets the state of a method"),
    "REDUCE a storage type": (
        lambda d: checkpoint(d / "a.bin", b"\x80\x02" + _global("torch", "FloatStorage") + b")R."),
        "weights", r"calls a _StorageType, which is not a tensor constructor"),
    "NEWOBJ": (lambda d: checkpoint(d / "a.bin", b"\x80\x02" + _global("collections", "OrderedDict") + b")\x81."),
               "weights", r"pickle opcode NEWOBJ, which tensor checkpoints do not use"),
    "STACK_GLOBAL of an int": (lambda d: checkpoint(d / "a.bin", b"\x80\x04K\x01K\x02\x93."),
                               "weights", r"a global's name is not a string"),
    "os.system": (lambda d: checkpoint(d / "a.bin", b"\x80\x02" + _global("posix", "system") + _val(("true",)) + b"R."),
                  "weights", r"refusing to load 'posix.system'"),
    "safetensors header longer than the file": (
        lambda d: safetensors(d / "a.safetensors", {"a": F32}, bytes(8), 10**12),
        "weights", r"not a readable safetensors file, truncated or corrupt \(header length 1000000000000, the file"),
    "safetensors non-UTF-8 header": (
        lambda d: _raw(d / "a.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{}"),
        "weights", r"header is not JSON"),
    "safetensors offsets past the file": (
        lambda d: safetensors(d / "a.safetensors", {"a": F32 | {"shape": [2**28], "data_offsets": [0, 2**30]}}, b"1234"),
        "weights", r"'a' is \[268435456\] F32 \(1073741824 bytes\) at bytes 0..1073741824 of 4"),
    "safetensors shape overflowing 64 bits": (
        lambda d: safetensors(d / "a.safetensors", {"a": F32 | {"shape": [2**62, 4], "data_offsets": [0, 0]}}),
        "weights", r"'a' has no valid dtype, shape and data_offsets"),
    "safetensors tensors sharing bytes": (
        lambda d: safetensors(d / "a.safetensors", {f"a{i}": F32 for i in range(3)}, bytes(8)),
        "weights", r"tensors 'a0' and 'a1' share bytes"),
    "adapter layer number 1e8": (lambda d: adapter_file(d / "a.safetensors", {"100000001": KV}),
                                 "adapter", r"layer number 100000001 among 1 layers: it fits no UNet"),
    "adapter layer named 1e3": (lambda d: adapter_file(d / "a.safetensors", {"1e3": KV}),
                                "adapter", r"numbered like a UNet's attention layers, found '1e3'"),
    "adapter without to_k_ip": (lambda d: adapter_file(d / "a.safetensors", {"1": {"to_v_ip": (8, 4)}}),
                                "adapter", r"1 parameters missing from the file: ip_adapter\.1\.to_k_ip\.weight$"),
    "adapter with a 1-d to_k_ip": (lambda d: adapter_file(d / "a.safetensors", {"1": KV | {"to_k_ip": (8,)}}),
                                   "adapter", r"ip_adapter\.1\.to_k_ip\.weight is \(8,\), expected a matrix"),
    "embeddings without hidden_states": (
        lambda d: features_file(d / "e.safetensors", {"format": "ipadapter-mlx-embeds"}),
        "features", r"embeddings file without a true/false hidden_states entry"),
    "embeddings with mismatched arrays": (
        lambda d: features_file(d / "e.safetensors", {"format": "ipadapter-mlx-embeds", "hidden_states": "false"},
                                uncond=(2, 4)),
        "features", r"malformed embeddings: cond \(1, 4\) mlx.core.float32, uncond \(2, 4\)"),
    "embeddings of the wrong rank": (
        lambda d: features_file(d / "e.safetensors", {"format": "ipadapter-mlx-embeds", "hidden_states": "true"}),
        "features", r"expected two equal float arrays of rank 3"),
}


def _load(kind: str, path: Path):
    if kind == "weights":
        return read_weights(path)
    if kind == "adapter":
        from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter

        return read_ip_adapter(path)
    from ipadapter_mlx.ip_adapter import load_features

    return load_features(str(path))


def _outcome(kind: str, path: Path) -> dict:
    t = time.perf_counter()
    try:
        _load(kind, path)
        out = {"ok": True}
    except UserError as e:
        out = {"error": str(e)}
    except BaseException as e:  # noqa: BLE001  (what the test must never see: a traceback, MemoryError)
        out = {"crash": f"{type(e).__name__}: {str(e)[:300]}"}
    return out | {"seconds": round(time.perf_counter() - t, 3)}


def child_main(mode: str, folder: str, *args: str) -> None:
    """Runs in the capped child: one JSON line per case, flushed, so a crash names the case it died in."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    cases = _hostile_cases(Path(folder)) if mode == "hostile" else _fuzz_cases(Path(folder), int(args[0]), int(args[1]))
    for name, kind, path in cases:
        print(json.dumps({"case": name} | _outcome(kind, path)), flush=True)
        path.unlink(missing_ok=True)


def _hostile_cases(folder: Path):
    for i, (name, (build, kind, _)) in enumerate(HOSTILE.items()):
        (folder / str(i)).mkdir()
        yield name, kind, build(folder / str(i))


def _run_child(*args, timeout: float = 300) -> dict[str, dict]:
    code = (f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'tests')]}; "
            "import test_hostile_files as t; t.child_main(*sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"child died (rc {proc.returncode}) after {lines[-1:]}: {proc.stderr[-2000:]}"
    return {line.pop("case"): line for line in lines}


@pytest.fixture(scope="module")
def hostile_outcomes(tmp_path_factory):
    return _run_child("hostile", tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_gets_one_clear_error(name, hostile_outcomes):
    got = hostile_outcomes[name]
    print(f"{name}: {got}")
    assert "error" in got, got
    assert "\n" not in got["error"]
    assert __import__("re").search(HOSTILE[name][2], got["error"]), got["error"]


# ---------------------------------------------------------------------------------------------------
# The crafted files are the real format, and real files load bit-exactly


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


def test_crafted_checkpoint_is_what_torch_reads(tmp_path):
    torch = pytest.importorskip("torch")
    path = checkpoint(tmp_path / "a.bin", _dict(w=_tensor((2, 2), (1, 2)), v=_tensor((2,), (2,), 1, numel=4)))
    ref = torch.load(path, weights_only=True)
    got = load_torch_file(str(path))
    for k in ("w", "v"):
        assert np.array_equal(_np(got[k]), ref[k].numpy()), k


def _torch_state(torch) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = {
        "f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16().t(), "transposed": torch.randn(4, 3, generator=g).t(),
        "strided slice": base[1:5:2, ::2], "column slice": base[:, 1:], "tied": base, "tied again": base.detach(),
        "permuted": torch.randn(2, 3, 4, 5, generator=g).permute(2, 0, 3, 1), "empty": torch.zeros(0, 3),
        "position_ids": torch.arange(7).expand((1, -1)), "i64": torch.arange(4), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5), "param": torch.nn.Parameter(torch.randn(2, generator=g)),
    }
    lin = torch.nn.Linear(3, 2)
    return sd | {f"linear.{k}": v for k, v in lin.state_dict().items()}


@pytest.mark.parametrize("lightning", [False, True])
def test_real_checkpoints_load_bit_exactly(tmp_path, lightning):
    torch = pytest.importorskip("torch")
    sd = _torch_state(torch)
    torch.save({"state_dict": sd, "epoch": 3} if lightning else sd, tmp_path / "x.ckpt")
    ref = torch.load(tmp_path / "x.ckpt", weights_only=True)
    ref = ref["state_dict"] if lightning else ref
    got = read_weights(tmp_path / "x.ckpt")
    assert set(got) == set(ref)
    for k, v in ref.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        assert got[k].dtype == {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16,
                                torch.int64: mx.int64, torch.bool: mx.bool_}[v.dtype], k
        assert got[k].shape == tuple(v.shape) and np.array_equal(_np(got[k]), want), k
    assert got["tied"] is got["tied again"]  # one array for one view, however often it is saved


def test_a_file_cannot_change_how_later_files_load(tmp_path):
    """The storage types are immutable: a BUILD that sets FloatStorage's name or dtype is refused, and the next
    float32 file still loads as float32."""
    evil = b"\x80\x02" + _global("torch", "FloatStorage") + b"}(" + _val("dtype") + _val("float16") + b"ub."
    with pytest.raises(UserError, match="sets the state of a _StorageType"):
        load_torch_file(str(checkpoint(tmp_path / "evil.bin", evil)))
    got = load_torch_file(str(checkpoint(tmp_path / "ok.bin", _dict(w=_tensor((4,), (1,))))))
    assert got["w"].dtype == mx.float32 and np.array_equal(np.array(got["w"]), np.arange(4, dtype=np.float32))


def test_features_round_trip(tmp_path):
    from ipadapter_mlx.ip_adapter import Features, load_features, save_features

    cond = mx.array(np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32))
    save_features(str(tmp_path / "e.safetensors"), Features(cond, cond * 0, True))
    got = load_features(str(tmp_path / "e.safetensors"))
    assert got.hidden_states is True and np.array_equal(np.array(got.cond), np.array(cond))
    with pytest.raises(UserError, match="embeddings file not found"):
        load_features(str(tmp_path / "nope.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Seeded fuzz: byte flips, truncations and pickle-opcode mutations of small real files

FUZZ_CASES = 300


def _pickle_mutations(pkl: bytes, rng: random.Random) -> bytes:
    import pickletools

    ops = [(pos, op) for op, _, pos in pickletools.genops(pkl)]
    pos, op = rng.choice(ops)
    end = next((p for p, _ in ops if p > pos), len(pkl))
    choice = rng.randrange(5)
    if choice == 0:  # another opcode in its place
        return pkl[:pos] + bytes([rng.choice(pickletools.opcodes).code.encode("latin-1")[0]]) + pkl[pos + 1:]
    if choice == 1:  # drop the opcode
        return pkl[:pos] + pkl[end:]
    if choice == 2:  # repeat it
        return pkl[:end] + pkl[pos:end] + pkl[end:]
    if choice == 3 and op.name in ("BININT1", "BININT", "LONG1", "BINPUT", "BINGET", "LONG_BINPUT"):  # hostile numbers
        value = rng.choice([0, 1, -1, 2**31 - 1, 2**40, -2**40, 335_000_000])
        if op.name in ("BINPUT", "BINGET"):
            return pkl[:pos + 1] + bytes([value & 0xFF]) + pkl[end:]
        return pkl[:pos] + _val(value) + pkl[end:]
    flip = rng.randrange(pos, end)  # a byte of its argument
    return pkl[:flip] + bytes([rng.randrange(256)]) + pkl[flip + 1:]


def _fuzz_cases(folder: Path, seed: int, n: int):
    rng = random.Random(seed)
    bases = sorted(p for p in folder.iterdir() if p.name.startswith("base"))
    for i in range(n):
        base = rng.choice(bases)
        raw = base.read_bytes()
        how = rng.choice(["flip", "truncate", "header" if base.suffix == ".safetensors" else "pickle"])
        if how == "flip":
            raw = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif how == "truncate":
            raw = raw[: rng.randrange(len(raw))]
        elif how == "header":  # a random number in place of one in the JSON header
            n_header = struct.unpack("<Q", raw[:8])[0]
            header = raw[8:8 + n_header].decode()
            digits = [j for j, c in enumerate(header) if c.isdigit()]
            j = rng.choice(digits)
            header = header[:j] + str(rng.choice([0, 1, 2**31, 2**62, 10**30])) + header[j + 1:]
            raw = struct.pack("<Q", len(header)) + header.encode() + raw[8 + n_header:]
        else:
            with zipfile.ZipFile(base) as z:
                members = {name: z.read(name) for name in z.namelist()}
            pkl_name = next(name for name in members if name.endswith("data.pkl"))
            members[pkl_name] = _pickle_mutations(members[pkl_name], rng)
            path = folder / f"case{i}{base.suffix}"
            with zipfile.ZipFile(path, "w") as z:
                for name, data in members.items():
                    z.writestr(name, data)
            yield f"{i} {how} {base.name}", "weights", path
            continue
        path = folder / f"case{i}{base.suffix}"
        path.write_bytes(bytes(raw))
        yield f"{i} {how} {base.name}", "weights", path


def test_fuzzed_files_end_in_success_or_one_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    sd = _torch_state(torch)
    torch.save(sd, tmp_path / "base.bin")
    torch.save({"state_dict": {k: v for k, v in list(sd.items())[:6]}, "epoch": 1}, tmp_path / "base.ckpt")
    mx.save_safetensors(str(tmp_path / "base.safetensors"),
                        {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": mx.ones((4,), dtype=mx.float16)})
    got = _run_child("fuzz", tmp_path, 0, FUZZ_CASES)
    assert len(got) == FUZZ_CASES
    crashes = {k: v for k, v in got.items() if "crash" in v or "\n" in v.get("error", "")}
    assert not crashes, crashes
    errors = sum("error" in v for v in got.values())
    print(f"{FUZZ_CASES} cases: {errors} UserError, {FUZZ_CASES - errors} loaded; slowest "
          f"{max(v['seconds'] for v in got.values())} s")
    assert errors > FUZZ_CASES // 3  # the mutations do reach the checks
