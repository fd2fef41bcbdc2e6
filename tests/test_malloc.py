"""The heap policy for MLX's CPU buffers (ipadapter_mlx/_malloc.py): large blocks freed are reused, not mapped
afresh, and `release` gives them back. Checked by what the kernel counts (page faults, resident memory), never
by timing; each case in a fresh interpreter, since the policy is set at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the package under test, not an installed copy


def huge_pages() -> bool:
    """Transparent huge pages for every mapping, or glibc's huge-page tunable: far fewer faults to count."""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        thp = ""
    return "[always]" in thp or "hugetlb" in os.environ.get("GLIBC_TUNABLES", "")


pytestmark = [pytest.mark.skipif(sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION"),
                                 reason="glibc's malloc"),
              pytest.mark.skipif(huge_pages(), reason="huge pages: page faults do not tell the policies apart")]

PROBE = """
import json, resource
import ipadapter_mlx, mlx.core as mx
from ipadapter_mlx import _malloc

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def faults_of_a_fresh_64mib_array():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = mx.zeros((16 << 20,))  # 64 MiB, above glibc's largest mmap threshold
    mx.eval(x)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults = [faults_of_a_fresh_64mib_array() for _ in range(3)]
import threading  # the same from another thread (one arena for all: a thread's own would map the block)
threading.Thread(target=lambda: faults.extend(faults_of_a_fresh_64mib_array() for _ in range(2))).start()
import time
while len(faults) < 5:
    time.sleep(0.01)
big = mx.ones((64 << 20,)); mx.eval(big); del big  # 256 MiB, freed
held = resident()
_malloc.release()
print(json.dumps({"state": _malloc.state, "faults": faults, "released": held - resident()}))
"""


def probe(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "IPADAPTER_MLX_MALLOC"} | env
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_large_buffers_are_reused_and_released():
    pages = (64 << 20) // os.sysconf("SC_PAGESIZE")
    heap, system = probe(), probe(IPADAPTER_MLX_MALLOC="system")
    assert heap["state"].startswith("heap") and system["state"] == "system malloc"
    # glibc's default maps every 64 MiB block afresh: each one faults in all its pages, every time
    assert min(system["faults"]) > pages // 2
    # the heap policy faults them in once; later blocks reuse the same memory, from any thread
    assert max(heap["faults"][1:]) < pages // 20
    # freed memory stays with the process until release() hands it back
    assert heap["released"] > (200 << 20)


def test_generate_hands_memory_back_at_its_end(tmp_path, monkeypatch):
    """`generate` releases what its activations held once, after decoding; sampling and decoding alone do not
    (the memory is reused from step to step)."""
    import mlx.core as mx

    from ipadapter_mlx import StableDiffusion, _malloc
    from ipadapter_mlx.bench_shapes import TINY
    from ipadapter_mlx.synthetic import random_pipeline

    pipe = StableDiffusion(random_pipeline(tmp_path / "model", TINY), mx.float32)
    calls = []
    monkeypatch.setattr(_malloc, "release", lambda: calls.append(1))
    sampling = pipe.generate_latents("a cat", steps=2, height=64, width=64, seed=1)
    for step in sampling:
        pass
    mx.eval(pipe.decode(step.latents))
    assert calls == []
    pipe.generate("a cat", steps=2, height=64, width=64, seed=1)
    assert calls == [1]
