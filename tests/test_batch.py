"""`batch`: jobs parsed by generate's own parser, pictures equal to `generate`'s, reuse of the model, adapters and
reference features, manifest and resume, bad lines, and the same batch over two ranks of `mlx.launch`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import psnr, record
from ipadapter_mlx import cli
from ipadapter_mlx.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--steps", "3", "--height", "64", "--width", "64", "--scheduler", "euler"]  # every job's defaults


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random pipeline, image encoder and IP-Adapter-plus written in the real formats, and references."""
    from ipadapter_mlx.bench_shapes import TINY
    from ipadapter_mlx.synthetic import random_image_encoder, random_ip_adapter, random_pipeline

    root = tmp_path_factory.mktemp("batch-models")
    random_pipeline(root / "model", TINY)
    random_image_encoder(root / "encoder", TINY["image_encoder"])
    random_ip_adapter(root / "ip.safetensors", TINY)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / f"ref{i}.png")
    return root


def adapter(tiny, ref: int, scale: float = 0.6) -> dict:
    return {"ip_adapter": str(tiny / "ip.safetensors"), "image_encoder": str(tiny / "encoder"),
            "image": [str(tiny / f"ref{ref}.png")], "scale": scale}


def adapter_flags(group: dict) -> list[str]:
    """The same adapter group written as generate's flags by hand (the independent side of the comparison)."""
    flags = ["--ip-adapter", group["ip_adapter"], "--image-encoder", group["image_encoder"]]
    for image in group["image"]:
        flags += ["--image", image]
    return flags + ["--scale", str(group["scale"])]


def write_jobs(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def batch(capsys, tiny, jobs: Path, out: Path, *extra):
    code = main(["batch", str(jobs), "--output-dir", str(out), "--model", str(tiny / "model"), *BASE, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def generated(capsys, tiny, out: Path, *flags) -> np.ndarray:
    """What `generate` alone makes with these flags."""
    code = main(["generate", "--model", str(tiny / "model"), *BASE, *flags, "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    return pixels(out)


SWEEP = [  # (job, the same options as generate flags)
    ({"prompt": "a cat", "seed": 1}, ["--prompt", "a cat", "--seed", "1"]),
    ({"prompt": "a cat", "seed": 2, "cfg": 3, "negative-prompt": "-blurry", "output": "sub/cat.png"},
     ["--prompt", "a cat", "--seed", "2", "--cfg", "3", "--negative-prompt=-blurry"]),
    ({"prompt": "a dog", "seed": 3, "ip_adapters": "A0"}, ["--prompt", "a dog", "--seed", "3", "A0"]),
    ({"prompt": "a fox", "seed": 4, "ip_adapters": "A0"}, ["--prompt", "a fox", "--seed", "4", "A0"]),
    ({"prompt": "a fox", "seed": 4, "ip_adapters": "A1", "num_images": 2},
     ["--prompt", "a fox", "--seed", "4", "A1", "--num-images", "2"]),
]


def sweep(tiny) -> list[tuple[dict, list[str]]]:
    groups = {"A0": adapter(tiny, 0), "A1": adapter(tiny, 1, 0.8)}
    out = []
    for job, flags in SWEEP:
        job = {k: [groups[v]] if k == "ip_adapters" else v for k, v in job.items()}
        out.append((job, [f for flag in flags for f in (adapter_flags(groups[flag]) if flag in groups else [flag])]))
    return out


def expected_names(jobs) -> list[str]:
    names = []
    for n, (job, _) in enumerate(jobs, 1):
        name = job.get("output", f"{n:05d}.png")
        names += [name] if job.get("num_images", 1) == 1 else [name.replace(".png", f"_{i}.png") for i in (1, 2)]
    return names


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """Each sweep job's pictures from `generate` alone (in a fresh process per picture set: the real CLI)."""
    root = tmp_path_factory.mktemp("generate")
    pictures = []
    for n, (job, flags) in enumerate(sweep(tiny), 1):
        out = root / f"{n}.png"
        r = subprocess.run([sys.executable, "-m", "ipadapter_mlx", "generate", "--model", str(tiny / "model"), *BASE,
                            *flags, "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        pictures += ([pixels(out)] if job.get("num_images", 1) == 1 else
                     [pixels(root / f"{n}_{i}.png") for i in (1, 2)])
    return pictures


# -- jobs file -> options -----------------------------------------------------------------------------


def test_job_keys_are_generates_options(tiny):
    """A job's keys give the namespace argparse gives for the same command line; adapter groups, '-' or '_',
    lists for repeated options, pairs for two-value options; the job replaces defaults it names."""
    from ipadapter_mlx.batch import Options, generate_parser, parse_job
    from ipadapter_mlx.pipeline import DEFAULT_STEPS

    parser = generate_parser()
    defaults = cli.build_parser().parse_args(["generate", "--steps", "9", "--prompt", "default",
                                              "--ip-adapter", "sd15", "--image", "d.png"])
    a = adapter(tiny, 0)
    job = {"prompt": "-a cat", "negative-prompt": "dull", "num_images": 2, "original_size": [64, 48],
           "low_memory": True, "ip_adapters": [a, {"ip_adapter": "sd15", "image": ["x.png", "y.png"],
                                                    "image_weight": [1, 0.5], "scale": {"up": {"block_0": [1]}}}]}
    got = parse_job(job, defaults, parser, Options.of(parser))
    want = cli.build_parser().parse_args(
        ["generate", "--steps", "9", "--prompt=-a cat", "--negative-prompt", "dull", "--num-images", "2",
         "--original-size", "64", "48", "--low-memory", *adapter_flags(a), "--ip-adapter", "sd15",
         "--image", "x.png", "--image", "y.png", "--image-weight", "1", "--image-weight", "0.5",
         "--scale", '{"up": {"block_0": [1]}}'])
    assert vars(got) == vars(want)
    # the top-level form of one adapter, and null for generate's default
    got = parse_job({"ip_adapter": "sd15", "image": "x.png", "steps": None}, defaults, parser, Options.of(parser))
    assert got.ip_args == [("ip_adapter", "sd15"), ("image", "x.png")] and got.steps is None  # --fast may set it
    cli.fill_fast_flags(got)
    assert got.steps == DEFAULT_STEPS
    defaults.low_memory = True  # a flag on the command line, false in the job
    assert parse_job({"low_memory": False}, defaults, parser, Options.of(parser)).low_memory is False


def test_options_added_to_generate_work_in_jobs(monkeypatch):
    """Another engineer's `_add_<feature>_options(p)` in generate: its options are job keys with no change here."""
    from ipadapter_mlx.batch import Options, generate_parser, parse_job

    original = cli._add_ip_options

    def with_extra(p, embed=False):
        original(p, embed)
        p.add_argument("--extra-knob", type=float, default=1.0)
        p.add_argument("--extra-file", action="append", default=[])  # repeatable, like --lora

    monkeypatch.setattr(cli, "_add_ip_options", with_extra)
    parser = generate_parser()
    defaults = parser.parse_args(["--extra-file", "d"])
    got = parse_job({"extra-knob": 0.25, "extra_file": ["a", "b"]}, defaults, parser, Options.of(parser))
    assert got.extra_knob == 0.25 and got.extra_file == ["a", "b"]
    got = parse_job({}, defaults, parser, Options.of(parser))
    assert got.extra_knob == 1.0 and got.extra_file == ["d"]


def test_example_jobs_file_is_valid():
    from ipadapter_mlx.batch import read_jobs

    jobs = read_jobs(str(ROOT / "examples" / "style_sweep.jsonl"), cli.build_parser().parse_args(["generate"]))
    assert len(jobs) == 12 and [j.error for j in jobs] == [None] * 12
    assert {j.args.ip_args[0] for j in jobs} == {("ip_adapter", "sd15-plus")}


# -- one process ------------------------------------------------------------------------------------


def test_batch_equals_generate_and_loads_once(tiny, reference, tmp_path, capsys, monkeypatch):
    """Every picture equals `generate`'s bit for bit; the model, the adapter file and the vision tower are loaded
    once, each reference set encoded once."""
    from ipadapter_mlx import adapters, batch as batch_module, pipeline
    from ipadapter_mlx.checkpoints import adapter_files

    counts = {"model": 0, "adapter": 0, "encode": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(pipeline.StableDiffusion, "from_pretrained",
                        classmethod(counted("model", pipeline.StableDiffusion.from_pretrained.__func__)))
    monkeypatch.setattr(adapter_files, "read_ip_adapter", counted("adapter", adapter_files.read_ip_adapter))
    monkeypatch.setattr(adapters, "encode_images", counted("encode", adapters.encode_images))
    jobs = sweep(tiny)
    code, out, err = batch(capsys, tiny, write_jobs(tmp_path / "jobs.jsonl", [j for j, _ in jobs]), tmp_path / "out")
    assert code == 0, err
    names = expected_names(jobs)
    for name, want in zip(names, reference):
        assert np.array_equal(pixels(tmp_path / "out" / name), want), name
    assert counts == {"model": 1, "adapter": 1, "encode": 2}  # ref0 once for two jobs, ref1 once
    printed = [line for line in out.splitlines() if line.endswith(".png")]  # (the log says which encoder too)
    assert printed == [str(tmp_path / "out" / n) for n in names]  # the paths, as generate prints them
    entries = manifest(tmp_path / "out")
    assert [e["line"] for e in entries] == [1, 2, 3, 4, 5] and {e["status"] for e in entries} == {"done"}
    assert entries[4]["outputs"] == names[4:] and entries[1]["options"] == jobs[1][0] and entries[0]["rank"] == 0
    meta = json.loads(Image.open(tmp_path / "out" / "sub" / "cat.png").text["ipadapter_mlx"])
    assert meta["negative_prompt"] == "-blurry" and meta["cfg_scale"] == 3.0 and meta["seed"] == 2

    # a rerun renders nothing; a job whose options change (here a default) renders again, alone
    stamps = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in names}
    code, out, err = batch(capsys, tiny, tmp_path / "jobs.jsonl", tmp_path / "out")
    assert code == 0 and out == "" and "0 rendered, 5 skipped" in err, err
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in names} == stamps
    jobs[0][0]["prompt"] = "a lion"
    (tmp_path / "out" / names[1]).unlink()  # a lost picture is made again too
    code, out, err = batch(capsys, tiny, write_jobs(tmp_path / "jobs.jsonl", [j for j, _ in jobs]), tmp_path / "out")
    assert code == 0 and out.split() == [str(tmp_path / "out" / n) for n in names[:2]], err
    assert len(manifest(tmp_path / "out")) == 7
    assert not list((tmp_path / "out").rglob("*.tmp.png"))


def test_bad_lines_fail_alone(tiny, tmp_path, capsys):
    """Each bad job: one `warning: line N: ...` line and a manifest entry; the good jobs run; exit status 1."""
    good = {"prompt": "ok", "seed": 1}
    lines = [good, "{not json", {"prompt": "x", "stepz": 3}, {**good, "ip_adapters": [{**adapter(tiny, 0),
             "image": [str(tmp_path / "missing.png")]}]}, {**good, "output": "../escape.png"},
             {**good, "seed": 2, "output": "00001.png"}, {"steps": [2, 3]}, {"image": "a.png"}, ["a list"],
             {**good, "seed": 3}]
    code, out, err = batch(capsys, tiny, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out")
    assert code == 1
    expect = {2: "malformed JSON", 3: "unknown option 'stepz'; did you mean 'steps'?", 4: "image not found: ",
              5: "must be a file name inside --output-dir", 6: "output 00001.png is also line 1's",
              7: "'steps' takes one value, got a list", 8: "'image' is an option of --ip-adapter: give \"ip_adapters\"",
              9: "a job is a JSON object, got list"}
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(expect), err
    for (n, words), line in zip(sorted(expect.items()), warnings):
        assert line.startswith(f"warning: line {n}: ") and words in line, (n, line)
    entries = {e["line"]: e for e in manifest(tmp_path / "out")}
    assert {n for n, e in entries.items() if e["status"] == "done"} == {1, 10}
    assert all(entries[n]["error"].startswith(f"line {n}: ") for n in expect)
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00001.png", "00010.png"]


@pytest.mark.parametrize("args, words", [
    (["--output-dir", "{tmp}/file/out"], "cannot write --output-dir"),
    (["--output", "x.png"], "--output is not a batch option"),
    (["--jobs-file-missing"], "unrecognized arguments"),
])
def test_bad_command_gets_one_line(tiny, tmp_path, capsys, args, words):
    (tmp_path / "file").write_text("x")
    write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "x"}])
    argv = ["batch", str(tmp_path / "jobs.jsonl"), *(a.format(tmp=tmp_path) for a in args)]
    if "--output-dir" not in args:
        argv += ["--output-dir", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_missing_jobs_file_and_empty_one(tmp_path, capsys):
    for jobs, words in ((tmp_path / "none.jsonl", "jobs file not found"),
                        (write_jobs(tmp_path / "empty.jsonl", ["", "# only a comment"]), "no jobs in")):
        assert main(["batch", str(jobs), "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


# -- two ranks --------------------------------------------------------------------------------------


def free_ports(n: int = 2) -> int:
    """A first port with the n - 1 after it free too (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n < 65536 and all(_free(port + i) for i in range(n)):
            return port
    pytest.skip("no free ports for the ring backend")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(tiny, jobs: Path, out, *extra) -> subprocess.Popen:
    """`mlx.launch -n 2` of batch; `out` may hold $MLX_RANK (each rank its own folder)."""
    command = ["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--",
               "sh", "-c", 'exec "$@" --output-dir "' + str(out) + '"', "batch", sys.executable, "-m", "ipadapter_mlx",
               "batch", str(jobs), "--model", str(tiny / "model"), *BASE, *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ)


@pytest.fixture(scope="module")
def launcher():
    import shutil

    if not shutil.which("mlx.launch"):
        pytest.skip("mlx.launch is not installed")


def test_two_ranks_split_the_batch(tiny, reference, tmp_path, launcher):
    """Under `mlx.launch -n 2 --backend ring`: both ranks render, every picture equals `generate`'s, each job
    once; a second launch renders nothing."""
    jobs = sweep(tiny) * 2  # ten jobs: the copies get their own line numbers, hence their own files
    write_jobs(tmp_path / "jobs.jsonl", [j if "output" not in j else {**j, "output": f"{n}.png"}
                                         for n, (j, _) in enumerate(jobs)])
    p = launch(tiny, tmp_path / "jobs.jsonl", tmp_path / "out")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "10 rendered, 0 skipped (done before), 0 failed; pipelines loaded: 2" in err, err
    entries = manifest(tmp_path / "out")
    assert sorted(e["line"] for e in entries) == list(range(1, 11)) and {e["status"] for e in entries} == {"done"}
    assert {e["rank"] for e in entries} == {0, 1}
    worst = float("inf")
    for e in entries:
        n = (e["line"] - 1) % 5  # the sweep job this line repeats
        first = sum(1 if j.get("num_images", 1) == 1 else 2 for j, _ in sweep(tiny)[:n])
        for k, name in enumerate(e["outputs"]):
            worst = min(worst, record(f"batch: 2 ranks vs generate, line {e['line']}",
                                      psnr(pixels(tmp_path / "out" / name) / 255, reference[first + k] / 255), "dB"))
    # bit-equal (inf) with the same BLAS thread count as `generate`; OPENBLAS_NUM_THREADS=1 in the ranks alone
    # gave 84-89 dB (sums split differently): the stated tolerance
    assert worst >= 40
    p = launch(tiny, tmp_path / "jobs.jsonl", tmp_path / "out")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "0 rendered, 10 skipped (done before), 0 failed; pipelines loaded: 0" in err and out == "", err
    assert len(manifest(tmp_path / "out")) == 10


def test_killed_rank_jobs_are_done_on_rerun(tiny, tmp_path, launcher):
    """Rank 1 killed after its first job (mlx.launch then stops rank 0 too): the rerun renders exactly the jobs
    without a done line, and leaves no temp file."""
    write_jobs(tmp_path / "jobs.jsonl", [{"prompt": f"job {n}", "seed": n, "steps": 8} for n in range(12)])
    p = launch(tiny, tmp_path / "jobs.jsonl", tmp_path / "out")
    victim, deadline = None, time.monotonic() + 300
    while victim is None and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        if (tmp_path / "out" / "manifest.jsonl").is_file():
            victim = next((e["pid"] for e in manifest(tmp_path / "out") if e["rank"] == 1), None)
    assert victim is not None, p.communicate()[1]
    os.kill(victim, signal.SIGKILL)
    p.communicate(timeout=300)
    first = [e["line"] for e in manifest(tmp_path / "out")]
    assert len(first) < 12, "the batch ended before the kill"
    code = main(["batch", str(tmp_path / "jobs.jsonl"), "--output-dir", str(tmp_path / "out"),
                 "--model", str(tiny / "model"), *BASE])
    assert code == 0
    second = [e["line"] for e in manifest(tmp_path / "out")][len(first):]
    assert sorted(first + second) == list(range(1, 13))  # each job once over the two runs
    assert len(list((tmp_path / "out").glob("0*.png"))) == 12 and not list((tmp_path / "out").rglob("*.tmp.png"))


def test_ranks_without_a_shared_folder_split_statically(tiny, tmp_path, launcher):
    """Ranks that do not see one folder (separate Macs without a shared mount; here $MLX_RANK in the path): job
    i goes to rank i % 2, each writing into its own folder."""
    write_jobs(tmp_path / "jobs.jsonl", [{"prompt": f"job {n}", "seed": n} for n in range(4)])
    p = launch(tiny, tmp_path / "jobs.jsonl", str(tmp_path / "out-$MLX_RANK"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "job i to rank i % size: the ranks do not share the folder" in err, err
    for rank in (0, 1):
        entries = manifest(tmp_path / f"out-{rank}")
        assert [(e["line"], e["rank"]) for e in entries] == [(n, rank) for n in (1, 2, 3, 4) if (n - 1) % 2 == rank]


def test_loras_swap_between_jobs(mlx_dir, tmp_path, capsys, request):
    """LoRAs change in place between jobs (the model loads once): each picture equals `generate`'s with the same
    --lora flags, none before it leaking into the next."""
    pytest.importorskip("torch", reason="the LoRA files are written from torch layers")
    from ipadapter_mlx import pipeline

    style, locon = request.getfixturevalue("lora_files")
    jobs = [{"lora": [f"{style}:0.8"]}, {}, {"lora": [str(locon)]}, {"lora": [f"{style}:0.8", str(locon)]}, {}]
    flags = [["--lora", f"{style}:0.8"], [], ["--lora", str(locon)], ["--lora", f"{style}:0.8", "--lora", str(locon)],
             []]
    base = ["--model", str(mlx_dir), "--prompt", "a fox", "--seed", "7", "--steps", "2", "--height", "32",
            "--width", "32", "--dtype", "float32"]
    want = []
    for n, f in enumerate(flags):
        assert main(["generate", *base, *f, "--output", str(tmp_path / f"g{n}.png")]) == 0
        want.append(pixels(tmp_path / f"g{n}.png"))
    loads = []
    original = pipeline.StableDiffusion.from_pretrained.__func__
    request.getfixturevalue("monkeypatch").setattr(
        pipeline.StableDiffusion, "from_pretrained", classmethod(lambda *a, **k: loads.append(1) or original(*a, **k)))
    code = main(["batch", str(write_jobs(tmp_path / "jobs.jsonl", jobs)), "--output-dir", str(tmp_path / "out"), *base])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert len(loads) == 1
    for n in range(len(jobs)):
        assert np.array_equal(pixels(tmp_path / "out" / f"{n + 1:05d}.png"), want[n]), n
    assert not np.array_equal(want[0], want[1])  # the LoRA does change the picture


@pytest.fixture(scope="module")
def lora_files(request):
    return request.getfixturevalue("files")


try:  # kohya LoRA files built from the tiny diffusers pipeline (test_lora's fixtures), where torch is installed
    import torch  # noqa: F401

    from test_lora import files, sd15  # noqa: F401
except ImportError:
    pass


def test_controlnet_groups_are_job_keys():
    """--controlnet's options form their own group, as the IP-Adapter's: "controlnets": [{...}] in a job gives
    what the same command line gives (flags such as --guess-mode as true/false)."""
    from ipadapter_mlx.batch import Options, generate_parser, parse_job

    parser = generate_parser()
    options = Options.of(parser)
    assert "controlnets" in options.groups and "ip_adapters" in options.groups
    defaults = cli.build_parser().parse_args(["generate", "--prompt", "p"])
    job = {"controlnets": [{"controlnet": "canny", "control_image": "a.png", "control_scale": 0.5},
                           {"controlnet": "depth", "control_image": "b.png", "guess_mode": True, "control_end": 0.8}]}
    got = parse_job(job, defaults, parser, options)
    want = cli.build_parser().parse_args(
        ["generate", "--prompt", "p", "--controlnet", "canny", "--control-image", "a.png", "--control-scale", "0.5",
         "--controlnet", "depth", "--control-image", "b.png", "--guess-mode", "--control-end", "0.8"])
    assert vars(got) == vars(want)
    assert [g["controlnet"] for g in cli.option_groups(got.control_args, "controlnet", ("control_image",),
                                                       "ControlNet", "a --controlnet")] == ["canny", "depth"]
