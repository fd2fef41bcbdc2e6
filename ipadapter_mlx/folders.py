"""Writing converted MLX folders whole: into a temp folder, then renamed into place; debris of killed writers
cleaned; one writer at a time per cached folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .loading import FORMAT_VERSION, MARKER, is_mlx_folder

log = logging.getLogger(__name__)

# Writing folders. Every writer works in `.NAME.tmp-HOST-BOOT-PID-RANDOM` beside its destination, and `--force`
# sets the old folder aside as `.NAME.old-...` until the new one has the name: a writer killed at any point leaves
# the name holding a complete folder (old or new) plus debris whose PID says whose it is, which the next writer
# in that folder (or the next cache lookup) removes once that process is gone. Never a live writer's.
DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<boot>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}$")


def _machine() -> tuple[str, str]:
    """(host, boot) tags: a PID means something only on its own host, and only until that host reboots."""
    import hashlib
    import socket

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()  # Linux; elsewhere PIDs alone decide
    except OSError:
        boot = ""
    return tuple(hashlib.sha256(s.encode()).hexdigest()[:6] for s in (socket.gethostname(), boot))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False
    return True


def debris_path(dst: Path, kind: str) -> Path:
    """A fresh name beside `dst` for this process's temp (`kind="tmp"`) or set-aside (`"old"`) folder."""
    host, boot = _machine()
    return dst.parent / f".{dst.name}.{kind}-{host}-{boot}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        (path / MARKER).unlink(missing_ok=True)  # first: a half-deleted folder must never look complete
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(parent: Path) -> None:
    """Remove the temp folders of dead writers in `parent`; an old folder set aside by a `--force` replace that
    died before the new folder took the name is put back instead."""
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return
    host, boot = _machine()
    for path in entries:
        m = DEBRIS.match(path.name)
        pid = int(m["pid"]) if m else 0
        if not m or pid <= 0 or m["host"] != host or (m["boot"] == boot and _alive(pid)):
            continue  # not ours, another host's (its PIDs mean nothing here), or its writer is still running
        dst = path.parent / m["name"]
        try:
            if m["kind"] == "old" and is_mlx_folder(path) and not (dst.exists() or dst.is_symlink()):
                os.rename(path, dst)
                continue
        except OSError:
            pass  # another cleaner or writer got there first
        _remove(path)


def _copy_folder(src: Path, dst: Path) -> None:
    """Copy the files of `src` (following the Hub cache's symlinks) as new files: they get the umask's mode, not
    the source's, unlike shutil.copytree."""
    for root, _, files in os.walk(src, followlinks=True):
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(Path(root) / f, out / f)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the complete `tmp` to `dst`. An existing `dst` is renamed aside first and deleted after, so the name
    holds a complete folder throughout but for the instant between the two renames (which clean_stale undoes)."""
    aside = []
    while True:
        if dst.exists() or dst.is_symlink():
            aside.append(debris_path(dst, "old"))
            try:
                os.rename(dst, aside[-1])
            except FileNotFoundError:
                aside.pop()  # another writer moved it meanwhile
        try:
            os.rename(tmp, dst)
            break
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # else another writer took the name meanwhile: set theirs aside too
    for path in aside:
        _remove(path)


def write_mlx_folder(
    dst: Path,
    components: dict[str, tuple[dict, dict[str, mx.array]]],
    source: str,
    kind: str = "stable-diffusion",
    json_files: dict[str, dict] | None = None,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write into a temp folder beside `dst`, then rename it into place (replacing an existing `dst`): never a
    half-written folder under the name. Files and folders get the mode the umask gives.

    `components`: sub-folder -> (config.json, MLX weights); `json_files`: relative path -> content;
    `folders`: sub-folder -> a folder copied as it is (the tokenizer)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst.parent)
    tmp = debris_path(dst, "tmp")
    try:
        tmp.mkdir()
        for name, (config, weights) in components.items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
            mx.save_safetensors(str(tmp / name / "model.safetensors"), weights)
        for rel, content in (json_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2))
        for name, folder in (folders or {}).items():
            _copy_folder(Path(folder), tmp / name)
        marker = {"format": "ipadapter-mlx", "version": FORMAT_VERSION, "kind": kind, "source": source}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))  # last: marks the folder complete
        _move_into_place(tmp, dst)
    finally:
        if tmp.exists():
            _remove(tmp)
    return dst


def convert_once(dst: Path, convert: Callable[[], Path]) -> Path:
    """`dst` in the cache, converting it first unless it is there. Concurrent first uses of one model are safe:
    a lock file lets one process convert while the others wait, then find its complete folder."""
    import fcntl

    clean_stale(dst.parent)  # what killed conversions left
    if is_mlx_folder(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "a") as lock:  # stays: deleting it would race with a waiter
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting into %s ...", dst)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_mlx_folder(dst):  # the other process finished it
            return dst
        return convert()
