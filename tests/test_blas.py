"""MLX's BLAS routing (ipadapter_mlx/_blas.py) and the honesty of the benchmark's torch side.

Each check that depends on how a process starts runs in a fresh interpreter: the routing happens at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipadapter_mlx import _blas

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not any(Path(p).exists() for p in _blas.CANDIDATES[1:]),
    reason="needs Linux with a system OpenBLAS")


def python(code: str, **env: str | None) -> dict:
    """Run `code` in a fresh interpreter with these environment changes (None removes a variable); it prints
    one JSON line, returned here."""
    environ = dict(os.environ)
    for k, v in env.items():
        environ.pop(k, None) if v is None else environ.__setitem__(k, v)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])  # the package under test, not an installed copy
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


STATE = """
import ctypes, json, os
import ipadapter_mlx
from ipadapter_mlx import _blas
print(json.dumps({**_blas.state.__dict__, "agree": _blas.products_agree(),
                  "global_sgemm": hasattr(ctypes.CDLL(None), "cblas_sgemm"),
                  "env": os.environ.get("OPENBLAS_CORETYPE"), "timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                  "warning": _blas.slow_blas_warning()}))
"""


def test_mlx_runs_on_a_private_openblas():
    """MLX's products come from OpenBLAS and are right, and OpenBLAS is not in the process's global symbol
    scope: loading it globally rebinds torch's own sgemm_ (3.5x slower torch on an Intel machine)."""
    s = python(STATE)
    assert s["library"].startswith("OpenBLAS") and s["core"], s
    assert s["agree"]
    assert not s["global_sgemm"]


def test_openblas_knows_each_core_name_we_choose():
    """The names cpu_core() returns are OpenBLAS's own spellings: forced on this CPU, OpenBLAS reports the
    same core (an unknown name would silently leave its own choice)."""
    here = _blas.cpu_core()
    if here is None:
        pytest.skip("no AVX on this CPU")
    order = ["Sandybridge", "Haswell", "SkylakeX", "Cooperlake"]
    for name in order[: order.index(here) + 1]:
        s = python(STATE, OPENBLAS_CORETYPE=name)
        assert s["core"].lower() == name.lower(), (name, s)
        assert s["agree"]


def test_core_follows_the_cpu_unless_the_user_chose():
    """Unset: the core this CPU's flags call for, and the variable is gone again afterwards (numpy's own
    OpenBLAS must not inherit it). Set: the user's choice wins; an SSE core on an AVX2 machine is flagged."""
    want = _blas.cpu_core()
    if want is None:
        pytest.skip("no AVX on this CPU")
    s = python(STATE, OPENBLAS_CORETYPE=None, OPENBLAS_L2_SIZE=None, OPENBLAS_THREAD_TIMEOUT=None)
    assert s["core"].lower() == want.lower() and s["env"] is None and s["timeout"] is None, s
    assert s["warning"] is None
    s = python(STATE, OPENBLAS_CORETYPE="Prescott", OPENBLAS_THREAD_TIMEOUT="20")
    assert s["core"] == "Prescott" and s["agree"] and s["timeout"] == "20"
    assert f"OPENBLAS_CORETYPE={want}" in s["warning"], s


def test_cpu_core_from_flags():
    """The instruction sets named in /proc/cpuinfo's flags line decide the core (OpenBLAS's names)."""
    base = "sse sse2 ssse3 sse4_1 sse4_2 avx"
    avx2 = base + " avx2 fma"
    avx512 = avx2 + " avx512f avx512dq avx512cd avx512bw avx512vl"
    cases = {base: "Sandybridge", avx2: "Haswell", avx512: "SkylakeX", avx512 + " avx512_bf16": "Cooperlake",
             avx512 + " avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8": "Cooperlake",  # no SapphireRapids core in 0.3.21
             "sse sse2 sse3": None, avx2.replace(" fma", ""): "Sandybridge"}
    for flags, core in cases.items():
        assert _blas.cpu_core(f"processor\t: 0\nflags\t\t: fpu {flags}\n") == core, flags


def test_wrong_products_put_the_reference_blas_back():
    """When the check against numpy fails, MLX's import slots get their old values back and MLX computes with
    the reference BLAS, correctly."""
    code = """
import ctypes, json, os
import ipadapter_mlx
from ipadapter_mlx import _blas
path, lo, hi = _blas._mlx_library()
base = _blas._load_base(ctypes.CDLL(path))
slots = {n: base + o for n, o in _blas.import_slots(path).items()}
before = {n: ctypes.c_void_p.from_address(a).value for n, a in slots.items()}
os.environ.pop("IPADAPTER_MLX_BLAS")
_blas.state = _blas.BlasState()
good = _blas.products_agree
_blas.products_agree = lambda: False
state = _blas.route_mlx_blas()
after = {n: ctypes.c_void_p.from_address(a).value for n, a in slots.items()}
print(json.dumps({"library": state.library, "note": state.note, "restored": before == after,
                  "sgemm_slot": "cblas_sgemm" in slots, "agree": good()}))
"""
    s = python(code, IPADAPTER_MLX_BLAS="reference")
    assert s["library"] == "reference BLAS" and "wrong products" in s["note"], s
    assert s["sgemm_slot"] and s["restored"] and s["agree"]


def test_reference_switch_leaves_mlx_alone():
    s = python(STATE, IPADAPTER_MLX_BLAS="reference")
    assert s["library"] == "reference BLAS" and s["agree"] and s["warning"] is None


def test_bench_torch_side_runs_in_a_clean_process():
    """The diffusers side of `bench` loads neither MLX nor any BLAS of ours: it is the torch a plain
    diffusers script gets."""
    from conftest import needs_torch
    from ipadapter_mlx.bench import _run_worker

    needs_torch()
    r = _run_worker({"framework": "diffusers", "size": 64, "dtype": "float32", "quantize": None,
                     "low_memory": False, "steps": 1, "repeat": 1, "tiny": True, "model_kind": "sd15"}, 600)
    assert "error" not in r, r
    assert r["libraries"] == [] and r["ipadapter_mlx_imported"] is False, r
    assert r["unet_step_s"] > 0 and r["torch_blas"]
