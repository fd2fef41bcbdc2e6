"""Interrupted and concurrent conversions, the umask, and the messages for what is offline, missing or done already.

A `kill -9` is a real SIGKILL: a child process converts and kills itself at a chosen step (so the step is exact),
and the test looks at what the next run finds."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
from ipadapter_mlx.folders import DEBRIS, clean_stale, debris_path, write_mlx_folder
from ipadapter_mlx.loading import MARKER, is_mlx_folder

ROOT = Path(__file__).resolve().parents[1]

# The child: runs `python -m convert ARGS` (or resolves a model into the cache) and SIGKILLs itself at POINT.
CHILD = r"""
import os, shutil, signal, sys
from pathlib import Path
import ipadapter_mlx.folders as sd

point, command, *args = sys.argv[1:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
rename, rmtree, copy = os.rename, shutil.rmtree, sd._copy_folder

def patched_rename(a, b):
    if point == "before-aside" and ".old-" in str(b): die()
    rename(a, b)
    if (point == "after-aside" and ".old-" in str(b)) or (point == "after-rename-in" and ".tmp-" in str(a)): die()

def patched_rmtree(path, *a, **k):
    if point == "mid-delete":  # one file of the old folder gone, then killed
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        die()
    rmtree(path, *a, **k)

def patched_copy(src, dst):
    if point == "mid-write":  # the weights are written, the tokenizer and the marker are not
        die()
    copy(src, dst)

os.rename, shutil.rmtree, sd._copy_folder = patched_rename, patched_rmtree, patched_copy
if command == "convert":
    from convert.__main__ import main
    sys.exit(main(args))
from ipadapter_mlx import cache
print(cache.resolve_model(args[0]))
"""


def child(point: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, point, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def tiny_component():
    import mlx.core as mx

    return {"ip_adapter": ({"n": 1}, {"w": mx.arange(4, dtype=mx.float32)})}


# -- stale temp folders -------------------------------------------------------------------------------------


def test_stale_temp_folders_are_removed_live_ones_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        host, boot = DEBRIS.match(debris_path(tmp_path / "out", "tmp").name).group("host", "boot")
        names = {
            "dead": f".out.tmp-{host}-{boot}-{dead_pid()}-0123abcd",
            "dead-old-elsewhere": f".other.old-{host}-{boot}-{dead_pid()}-0123abcd",  # another name: cleaned too
            "live": f".out.tmp-{host}-{boot}-{live.pid}-0123abcd",
            "other-host": f".out.tmp-ffffff-{boot}-{dead_pid()}-0123abcd",  # its PID means nothing here
            "not-ours": ".out.tmp-notours",
        }
        for name in names.values():
            (tmp_path / name / "unet").mkdir(parents=True)
            (tmp_path / name / "unet" / "model.safetensors").write_bytes(b"x" * 1000)
        write_mlx_folder(tmp_path / "out", tiny_component(), "test")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"out", names["live"], names["other-host"], names["not-ours"]}
    finally:
        live.kill()
        live.wait()
    clean_stale(tmp_path)  # its writer is gone now
    assert names["live"] not in {p.name for p in tmp_path.iterdir()}


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").is_file(), reason="boot id: Linux only")
def test_temp_folder_from_before_a_reboot_is_stale_even_if_its_pid_is_reused(tmp_path):
    host = DEBRIS.match(debris_path(tmp_path / "out", "tmp").name)["host"]
    (tmp_path / f".out.tmp-{host}-000000-{os.getpid()}-0123abcd").mkdir()  # a live PID, from another boot
    clean_stale(tmp_path)
    assert debris(tmp_path) == []


def test_kill_9_while_converting_then_the_next_run_cleans_up(diffusers_dir, tmp_path):
    """In the output folder (`python -m convert`) and in the cache (generate's first use)."""
    out = tmp_path / "out"
    r = child("mid-write", "convert", str(diffusers_dir), str(out))
    assert r.returncode == -signal.SIGKILL, r.stderr
    (tmp,) = debris(tmp_path)
    assert not out.exists() and (tmp_path / tmp / "unet" / "model.safetensors").stat().st_size > 0
    from convert.__main__ import main

    assert main([str(diffusers_dir), str(out)]) == 0
    assert debris(tmp_path) == [] and is_mlx_folder(out)

    cache = tmp_path / "cache"
    r = child("mid-write", "resolve", str(diffusers_dir), env={"IPADAPTER_MLX_CACHE": str(cache)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(debris(cache / "converted")) == 1
    r = child("none", "resolve", str(diffusers_dir), env={"IPADAPTER_MLX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert debris(cache / "converted") == [] and is_mlx_folder(r.stdout.strip().splitlines()[-1])


# -- convert --force replaces atomically -----------------------------------------------------------------------

# where the child dies -> which folder the name holds once the next run has cleaned up
FORCE_POINTS = {"mid-write": "old", "before-aside": "old", "after-aside": "old", "after-rename-in": "new",
                "mid-delete": "new"}


@pytest.fixture(scope="module")
def old_and_new(diffusers_dir, tmp_path_factory):
    import mlx.core as mx

    root = tmp_path_factory.mktemp("force")
    old = convert_diffusers_folder(diffusers_dir, root / "old")
    new = convert_diffusers_folder(diffusers_dir, root / "new", mx.float16)
    assert contents(old) != contents(new)
    return old, new


@pytest.mark.parametrize("point", FORCE_POINTS)
def test_force_killed_at_any_step_leaves_a_whole_folder(diffusers_dir, old_and_new, tmp_path, point):
    import shutil

    snapshots = {"old": contents(old_and_new[0]), "new": contents(old_and_new[1])}
    out = tmp_path / "out"
    shutil.copytree(old_and_new[0], out)
    r = child(point, "convert", str(diffusers_dir), str(out), "--force", "--dtype", "float16")
    assert r.returncode == -signal.SIGKILL, r.stderr
    if point != "after-aside":  # the one instant between the two renames: the name is empty, the old folder aside
        assert contents(out) == snapshots[FORCE_POINTS[point]]
    clean_stale(tmp_path)  # what the next run does first
    assert contents(out) == snapshots[FORCE_POINTS[point]]
    assert debris(tmp_path) == []


def test_force_replaces_a_folder(diffusers_dir, old_and_new, tmp_path):
    import shutil

    from convert.__main__ import main

    out = tmp_path / "out"
    shutil.copytree(old_and_new[0], out)
    assert main([str(diffusers_dir), str(out), "--force", "--dtype", "float16"]) == 0
    assert contents(out) == contents(old_and_new[1]) and debris(tmp_path) == []


# -- concurrent first use ------------------------------------------------------------------------------------

RACER = r"""
import os, sys, time
from pathlib import Path
from ipadapter_mlx import cache
from ipadapter_mlx.argparsing import show_log
from ipadapter_mlx.loading import load_component

show_log()  # the library logs its progress ("converting unet ..."); shown on stdout as the commands do
model, ready = sys.argv[1], Path(sys.argv[2])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 4:  # all four start converting together
    time.sleep(0.01)
folder = cache.resolve_model(model)
for name in ("text_encoder", "unet", "vae"):
    load_component(folder, name)
print(folder)
"""


def test_four_processes_converting_into_a_fresh_cache(diffusers_dir, tmp_path):
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "IPADAPTER_MLX_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(diffusers_dir), str(ready)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    assert all(code == 0 for _, code in results), [err for (_, err), _ in results]
    folders = {out.strip().splitlines()[-1] for (out, _), _ in results}
    assert len(folders) == 1
    conversions = sum(out.count("converting unet") for (out, _), _ in results)
    assert conversions == 1  # one converted, the other three waited and used its folder
    assert debris(cache / "converted") == []
    reference = convert_diffusers_folder(diffusers_dir, tmp_path / "reference")
    assert contents(Path(folders.pop())) == contents(reference)


# -- the umask -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_folders_honour_the_umask(diffusers_dir, tmp_path, umask):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(diffusers_dir, src)
    for f in (src / "tokenizer").iterdir():  # the source's modes must not carry over
        f.chmod(0o600 if umask == 0o022 else 0o644)
    previous = os.umask(umask)
    try:
        out = convert_diffusers_folder(src, tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    want = {k: (0o777 if (out / k).is_dir() else 0o666) & ~umask for k in modes}
    assert modes == want and "tokenizer/tokenizer_config.json" in modes


# -- offline, missing, already converted -----------------------------------------------------------------------


@pytest.fixture
def ref_png(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "ref.png")
    return str(tmp_path / "ref.png")


def generate(mlx_dir, tmp_path, capsys, *args):
    from ipadapter_mlx.cli import main

    capsys.readouterr()
    code = main(["generate", "--model", str(mlx_dir), "--prompt", "a cat", "--steps", "1", "--height", "32",
                 "--width", "32", *args, "--output", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not (tmp_path / "out.png").exists(), err
    return err[0]


def no_retries(monkeypatch):
    """huggingface_hub waits between retries with time.sleep: any wait means it did not fail at once."""
    import time

    def sleep(seconds):
        raise AssertionError(f"huggingface_hub retried (sleep {seconds})")

    monkeypatch.setattr(time, "sleep", sleep)


def test_offline_adapter_not_cached_fails_at_once(mlx_dir, tmp_path, capsys, monkeypatch, ref_png):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    no_retries(monkeypatch)
    line = generate(mlx_dir, tmp_path, capsys, "--ip-adapter", "sd15-plus", "--image", ref_png)
    assert line == ("error: h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors: not in the local Hub cache "
                    "and the Hub cannot be reached (HF_HUB_OFFLINE is set)")


def test_no_network_adapter_fails_at_once(tmp_path):
    """Not offline, but the Hub unreachable (a closed local port): one request, no ~25 s of retries."""
    script = ("import time\n"
              "def sleep(s): raise SystemExit(f'huggingface_hub retried (sleep {s})')\n"
              "time.sleep = sleep\n"
              "from ipadapter_mlx import discovery\n"
              "from ipadapter_mlx.errors import UserError\n"
              "try: discovery.resolve_ip_adapter('sd15-plus')\n"
              "except UserError as e: print(e)\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"h94/IP-Adapter:models/ip-adapter-plus_sd15\.safetensors: not in the local Hub cache and "
                        r"the Hub cannot be reached \(\w+: .+\)\n", r.stdout), r.stdout


def test_paths_that_do_not_exist_are_not_found(mlx_dir, torch_pipe, tmp_path, capsys, ref_png):
    from convert.__main__ import main
    from ip_fixtures import VARIANTS, make_adapter_repo

    repo = make_adapter_repo(tmp_path / "h94", torch_pipe.unet, variants={"base": VARIANTS["base"]})
    adapter = str(repo / "models" / VARIANTS["base"][0])
    assert generate(mlx_dir, tmp_path, capsys, "--ip-adapter", adapter, "--image", ref_png,
                    "--image-encoder", "./nope") == "error: image encoder not found: ./nope"
    line = generate(mlx_dir, tmp_path, capsys, "--model", "./nope")
    assert line.startswith("error: model not found: ./nope ")
    for source in ("./nope", "../nope/model.safetensors", "~/nope", "nope.ckpt", "org/nope.safetensors"):
        assert main([source, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: not found: {source} "), err
    assert not (tmp_path / "out").exists()


def test_convert_an_already_converted_folder(mlx_dir, tmp_path, capsys):
    from convert.__main__ import main

    assert main([str(mlx_dir), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {mlx_dir} is already a converted MLX folder; nothing to do (use it as it is)\n"
    assert not (tmp_path / "out").exists()


# -- the convert command line ---------------------------------------------------------------------------------


def test_argparse_mistakes_are_one_line(capsys):
    from convert.__main__ import main
    from ipadapter_mlx.argparsing import Parser

    for argv in ([], ["a", "b", "--quantize", "3"], ["a", "b", "--no-such-flag"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert err.endswith("(see python -m convert --help)\n")
    p = Parser(prog="tool")
    p.add_subparsers(dest="command").add_parser("run").add_argument("--n", type=int)
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--n", "x"])
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x' (see tool run --help)\n"


def test_convert_help_covers_adapters(capsys):
    from convert.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for words in ("REPO:PATH", "sd15-plus", ".bin / .safetensors", "ip_adapter/config.json",
                  "ip_adapter/model.safetensors", "--image-encoder", "(default: 64)"):
        assert words in text, words
    assert MARKER in text
