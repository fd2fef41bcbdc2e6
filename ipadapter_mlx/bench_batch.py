"""Throughput of `batch`: N jobs as `generate` in a loop (one process, one model load per picture), as one `batch`
process, and as `batch` over two ranks of `mlx.launch` (also with one rank slowed, claimed jobs against the static
split), on a random-weight pipeline at SD 1.5's shapes (synthetic.py: speed does not depend on the values). And
one picture's seconds per step: `generate` alone, one rank's share of `--parallel cfg` on a machine of its own
(`generate --cfg 1`: the UNet on one half of the guidance batch, all cores), and `generate --parallel cfg` on two
ranks pinned to a core each (modes generate, cfg-half, parallel-cfg).

Wall seconds give pictures per hour; CPU seconds (user + sys of every process) are reported too, since on a
machine shared with other work the wall time depends on the neighbours and the CPU time much less.

    python -m ipadapter_mlx.bench_batch --jobs 16 --size 64 --steps 2 --output bench_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("loop", "batch", "ranks2", "slow-claim", "slow-static", "generate", "cfg-half", "parallel-cfg")
ONE_PICTURE = ("generate", "cfg-half", "parallel-cfg")
PER_STEP = re.compile(r"\(([0-9.]+) s/step\)")  # generate --verbose: "sampling 3.1 s (1.55 s/step)"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(commands: list[list[str]], env: dict | None = None) -> dict:
    """Run the commands one after the other; wall and CPU seconds of all of them (and the last one's seconds
    per sampling step, when it printed them)."""
    t0, c0 = time.perf_counter(), children_cpu()
    for command in commands:
        r = subprocess.run(command, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"failed: {' '.join(command)}\n{r.stderr[-2000:]}")
    result = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(children_cpu() - c0, 1)}
    if step := PER_STEP.search(r.stdout + r.stderr):
        result["s_per_step"] = float(step.group(1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipadapter_mlx.bench_batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a pipeline folder (default: SD 1.5 shapes, random weights)")
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--hogs", type=int, default=1, help="busy loops beside the slowed rank")
    p.add_argument("--output", default="bench_batch.json")
    args = p.parse_args(argv)
    py = [sys.executable, "-m", "ipadapter_mlx"]
    common = ["--steps", str(args.steps), "--height", str(args.size), "--width", str(args.size)]
    report = {"jobs": args.jobs, "size": args.size, "steps": args.steps, "cpus": os.cpu_count(),
              "hogs": args.hogs,
              "load_average_before": os.getloadavg(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-bench-batch-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from .bench_shapes import SD15
            from .synthetic import random_pipeline

            model = str(random_pipeline(tmp / "model", {k: SD15[k] for k in ("unet", "text_encoder", "vae")}))
        jobs = [{"prompt": f"picture {i}", "seed": i} for i in range(args.jobs)]
        (tmp / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
        batch = [*py, "batch", str(tmp / "jobs.jsonl"), "--model", model, *common]
        one_thread = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # two ranks on two cores: one thread each
        for mode in args.modes:
            out = tmp / mode
            if mode == "loop":
                result = timed([[*py, "generate", "--model", model, *common, "--prompt", j["prompt"], "--seed",
                                 str(j["seed"]), "--output", str(out / f"{i}.png")] for i, j in enumerate(jobs)])
            elif mode == "batch":
                result = timed([[*batch, "--output-dir", str(out)]])
            elif mode in ONE_PICTURE:
                one = [*py, "generate", "--model", model, *common, "--prompt", "a picture", "--seed", "1",
                       "--verbose", "--output", str(out / "picture.png")]
                if mode != "parallel-cfg":
                    result = timed([one + (["--cfg", "1"] if mode == "cfg-half" else [])])
                else:
                    pinned = ["sh", "-c", 'exec taskset -c "$MLX_RANK" "$@"', "pin", *one, "--parallel", "cfg"]
                    result = timed([["mlx.launch", "-n", "2", "--backend", "ring", "--", *pinned]], one_thread)
            elif mode == "ranks2":
                result = timed([["mlx.launch", "-n", "2", "--backend", "ring", "--", *batch, "--output-dir",
                                 str(out)]], one_thread)
            else:  # rank 0 alone on core 0; rank 1 on core 1 beside busy loops: 1 / (hogs + 1) of its speed
                hogs = [subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", "while True: pass"])
                        for _ in range(args.hogs)]
                try:
                    pinned = ["sh", "-c", 'exec taskset -c "$MLX_RANK" "$@"', "pin", *batch, "--output-dir", str(out)]
                    result = timed([["mlx.launch", "-n", "2", "--backend", "ring", "--", *pinned,
                                     *(["--static-split"] if mode == "slow-static" else [])]], one_thread)
                finally:
                    for hog in hogs:
                        hog.kill()
                        hog.wait()
            if mode not in ("loop", *ONE_PICTURE):
                entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
                result["jobs_per_rank"] = [sum(e["rank"] == r for e in entries) for r in range(2)]
            if mode not in ONE_PICTURE:
                result["pictures_per_hour"] = round(3600 * args.jobs / result["wall_s"])
            report["modes"].setdefault(mode, []).append(result)
            print(mode, result, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    report["load_average_after"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
