"""`python -m ipadapter_mlx batch JOBS.jsonl --output-dir DIR [generate options]`: many generations from one
loaded model, on one process or spread over the ranks of `mlx.launch`.

Each line of JOBS.jsonl is a JSON object whose keys are `generate`'s long options ("-" or "_"; a repeated
option as a list; adapter groups as "ip_adapters": [{"ip_adapter": ..., "image": [...]}, ...]) plus "output", a
file name inside DIR. Keys are read from generate's own parser, so options added to `generate` work in jobs.
The options on the command line are every job's defaults; a job's keys replace them (a job that names adapter
options replaces the default adapters).

Reuse: the pipeline stays loaded while consecutive jobs name the same one; adapter files and image encoders are
read once, reference features encoded once per (encoder, images, fit, negative image): `CachedAdapters`;
ControlNets and T2I-Adapters are read once while consecutive jobs name the same ones (`LoadOrder.keep`; not
in low-memory mode, which loads them after the encoders are freed).

Resume: DIR/manifest.jsonl gets one line per job done or failed. A job counts as finished when the manifest
has a job done with the same key (a hash of its output name and full, merged options) and its PNGs exist; PNGs
are written atomically before their line, so a rerun renders exactly what is missing or changed.

Several ranks (`mx.distributed`): when DIR is one folder for all ranks (one machine, or a shared mount), jobs are
claimed one at a time by creating DIR/.batch/runs/ID/LINE exclusively (O_EXCL): a slow rank simply claims
fewer, and the ranks finish within about one job of each other. When the ranks see different folders (no shared
mount), job i goes to rank i % size. Collectives are used only to agree on the run id, to find whether the
folder is shared, and for the final totals; a rank that finished first sleeps on the folder before that last
collective (the ring backend spins while it waits, which would take a core from a rank still working).
"""

from __future__ import annotations

import argparse
import difflib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .adapters import AdapterSet
from .argparsing import Parser
from .errors import UserError

MANIFEST = "manifest.jsonl"
STATE = ".batch"  # DIR/.batch: the lock, and each run's claim folder
FEATURES_KEPT = 256  # reference encodings kept between jobs (a few MB each at most)
MAX_JOBS_MIB = 64  # a jobs file: a million ordinary jobs fit
MAX_LINE_CHARS = 1 << 20  # one job's line (a longer one fails alone)
NO_PARALLEL = ("--parallel cfg is for one generate; batch spreads whole jobs over the ranks of mlx.launch (each "
               "rank a picture at a time)")
MAX_OUTPUT_CHARS = 200  # an "output" name (file systems allow 255 bytes a name)
TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp\.png$")  # files.atomic_file's temp names


# ---------------------------------------------------------------------------------------------------
# Jobs file -> generate's options


class _JobParser(Parser):
    """generate's parser for one job: a mistake is that job's error, not the end of the batch."""

    def error(self, message: str):
        raise UserError(message)


class _Bare(Parser):
    """generate's options without -h, for `batch` to inherit (argparse's parents=)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "add_help": False})


def generate_parser(parser_class: type = _JobParser) -> argparse.ArgumentParser:
    """A fresh copy of generate's parser, built by cli._add_generate itself (whatever option groups it has)."""
    from .cli import _add_generate

    root = parser_class(prog="python -m ipadapter_mlx")
    sub = root.add_subparsers(parser_class=parser_class)
    _add_generate(sub)
    return sub.choices["generate"]


@dataclass
class Options:
    """What a job key can name: long option -> action, and option groups (actions of one custom Action class,
    e.g. every IP-Adapter option): the list key ("ip_adapters") -> (head action, its members by key)."""

    actions: dict[str, argparse.Action]
    groups: dict[str, tuple[argparse.Action, dict[str, argparse.Action]]]

    @classmethod
    def of(cls, parser: argparse.ArgumentParser) -> "Options":
        actions, by_class = {}, {}
        for a in parser._actions:
            longs = [s for s in a.option_strings if s.startswith("--") and s != "--help"]
            for s in longs:
                actions[s[2:].replace("-", "_")] = a
            if longs and type(a).__module__ != "argparse":  # a group's own action class keeps its members apart
                by_class.setdefault(type(a), []).append(a)
        groups = {}
        for members in by_class.values():
            head = members[0]  # the first option of a group is its head (--ip-adapter)
            groups[head.option_strings[0][2:].replace("-", "_") + "s"] = (
                head, {k: a for k, a in actions.items() if a in members})
        return cls(actions, groups)

    def member_group(self, action: argparse.Action) -> str | None:
        return next((k for k, (_, members) in self.groups.items() if action in members.values()), None)


def _tokens(key: str, action: argparse.Action, value) -> list[str]:
    """One job value -> command-line tokens for its option."""
    opt = next(s for s in action.option_strings if s.startswith("--"))
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise UserError(f"{key!r} is a flag: give true or false, got {json.dumps(value)[:40]}")
        return [opt] if value else []
    if isinstance(action.nargs, int):
        if not isinstance(value, list) or len(value) != action.nargs:
            raise UserError(f"{key!r} takes a list of {action.nargs} values, got {json.dumps(value)[:40]}")
        return [opt, *map(_text, value)]
    if isinstance(value, list):
        if type(action) is argparse._StoreAction:
            raise UserError(f"{key!r} takes one value, got a list")
        return [t for v in value for t in _tokens(key, action, v)]
    return [f"{opt}={_text(value)}"]  # '=': a value starting with '-' stays a value


def _text(value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, list):
        raise UserError(f"expected a string or a number, got {json.dumps(value)[:40]}")
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _unknown(key: str, known) -> UserError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else " (keys are generate's long options and \"output\")"
    return UserError(f"unknown option {key!r}{hint}")


def job_argv(job: dict, options: Options) -> tuple[list[str], dict]:
    """A job's keys -> (generate's command-line tokens, options put back to generate's default: null, or a flag
    set to false)."""
    argv, reset, top = [], {}, {}
    for key, value in job.items():
        name = key.replace("-", "_")
        if name in options.groups:
            head, members = options.groups[name]
            if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
                raise UserError(f"{key!r} takes a list of objects, one per {head.option_strings[0]}")
            for g in value:
                g = {k.replace("-", "_"): v for k, v in g.items()}
                head_key = head.option_strings[0][2:].replace("-", "_")
                if head_key not in g:
                    raise UserError(f"each object in {key!r} needs {head_key!r}")
                for k in [head_key, *(k for k in g if k != head_key)]:
                    if k not in members:
                        raise _unknown(k, members) if k not in options.actions else UserError(
                            f"{k!r} is not an option of {key!r}; give it outside the list")
                    argv += _tokens(k, members[k], g[k])
        elif name in options.actions:
            top[name] = value
        else:
            raise _unknown(key, [*options.actions, *options.groups])
    for name, value in top.items():
        if options.member_group(options.actions[name]) is None:
            if value is None or value is False and options.actions[name].nargs == 0:
                reset[options.actions[name].dest] = options.actions[name].default  # whatever the command line says
            else:
                argv += _tokens(name, options.actions[name], value)
    for group, (head, members) in options.groups.items():  # one group at the top level: its head first
        given = {k: v for k, v in top.items() if k in members}
        if not given:
            continue
        head_key = head.option_strings[0][2:].replace("-", "_")
        if head_key not in given:
            raise UserError(f"{next(iter(given))!r} is an option of {head.option_strings[0]}: give "
                            f"\"{group}\": [{{\"{head_key}\": ..., ...}}], or {head_key!r} in the same job")
        if group in {k.replace("-", "_") for k in job}:
            raise UserError(f"give {head.option_strings[0]} options either in {group!r} or at the top level")
        for k in [head_key, *(k for k in given if k != head_key)]:
            argv += _tokens(k, members[k], given[k])
    return argv, reset


def parse_job(job: dict, defaults: argparse.Namespace, parser: argparse.ArgumentParser,
              options: Options) -> argparse.Namespace:
    """The job's options over the defaults: what it names replaces them, the rest stays."""
    argv, reset = job_argv(job, options)
    # every option starts as None, so argparse fills in no default and appending actions start a fresh list:
    # what is not None afterwards, the job gave (a given value is never None: JSON null is a reset)
    ns = argparse.Namespace(**{a.dest: None for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=ns)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    return argparse.Namespace(**{**vars(defaults), **given, **reset})


@dataclass
class Job:
    line: int  # 1-based line in the jobs file
    options: dict | None  # the object as written
    args: argparse.Namespace | None  # generate's options, merged with the defaults
    output: str  # the first PNG's name inside DIR
    key: str  # hash of everything that decides the pictures
    error: str | None = None  # a line that cannot run (malformed, unknown option, ...)

    def outputs(self) -> list[str]:
        from .cli import output_paths

        n = self.args.num_images if self.args else 1
        return [str(p) for p in output_paths(self.output, max(1, min(n, 10_000)))]


def _output_name(value, line: int) -> str:
    if value is None:
        return f"{line:05d}.png"
    if not isinstance(value, str) or not value.lower().endswith(".png"):
        raise UserError(f"\"output\" must be a .png file name, got {json.dumps(value)[:60]}")
    if len(value) > MAX_OUTPUT_CHARS or not value.isprintable():
        raise UserError(f"\"output\" must be a name of printable characters (no control characters or lone "
                        f"surrogates), at most {MAX_OUTPUT_CHARS} long, got {value[:60]!r}{'...' * (len(value) > 60)}")
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UserError(f"\"output\" must be a file name inside --output-dir, got {value!r}")
    return path.as_posix()


def read_jobs(path: str, defaults: argparse.Namespace) -> list[Job]:
    """Every non-blank line (and not a '#' comment) of the jobs file, as a Job: a line that cannot run carries
    its error (naming the line) and the others go on."""
    try:
        info = os.stat(path)  # before open: opening a FIFO would wait for a writer
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"JOBS must be a regular file: {path}")
        if info.st_size > MAX_JOBS_MIB << 20:
            raise UserError(f"{path} is a jobs file of {info.st_size / (1 << 20):.0f} MiB; at most {MAX_JOBS_MIB}")
        with open(path, "rb") as f:
            data = f.read((MAX_JOBS_MIB << 20) + 1)  # bounded even if it grew since the stat
        if len(data) > MAX_JOBS_MIB << 20:
            raise UserError(f"{path} is a jobs file of over {MAX_JOBS_MIB} MiB; at most {MAX_JOBS_MIB}")
        lines = data.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"jobs file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read jobs file {path}: {e}") from None
    parser = generate_parser()
    options = Options.of(parser)
    jobs, taken = [], {}
    for n, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        job = Job(n, None, None, f"{n:05d}.png", "")
        try:
            if len(text) > MAX_LINE_CHARS:
                raise UserError(f"a line of {len(text)} characters; at most {MAX_LINE_CHARS}")
            try:
                job.options = json.loads(text)
                json.dumps(job.options, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") anywhere
            except UnicodeEncodeError as e:
                raise UserError(f"not valid Unicode text: a lone surrogate {e.object[e.start:e.end]!r}") from None
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
                raise UserError(f"malformed JSON: {e}") from None
            if not isinstance(job.options, dict):
                raise UserError(f"a job is a JSON object, got {type(job.options).__name__}")
            options_only = {k: v for k, v in job.options.items() if k != "output"}
            job.output = _output_name(job.options.get("output"), n)
            job.args = parse_job(options_only, defaults, parser, options)
            if job.args.parallel is not None:
                raise UserError(NO_PARALLEL)
            for out in job.outputs():
                if out in taken:
                    raise UserError(f"output {out} is also line {taken[out]}'s")
            taken.update({out: n for out in job.outputs()})
        except UserError as e:
            job.error = f"line {n}: {e}"
        jobs.append(job)
        resolved = {k: v for k, v in sorted(vars(job.args).items())} if job.args else {"text": text}
        job.key = hashlib.sha256(json.dumps([job.output, resolved], sort_keys=True, default=str).encode()
                                 ).hexdigest()[:16]
    if not jobs:
        raise UserError(f"no jobs in {path} (one JSON object per line)")
    return jobs


# ---------------------------------------------------------------------------------------------------
# Reuse between jobs


def image_digest(image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


class CachedAdapters(AdapterSet):
    """An AdapterSet that keeps what jobs share: each adapter file read once per (ref, encoder override), each
    vision tower loaded once (AdapterSet's own), each set of reference images encoded once."""

    def __init__(self, dtype, quantize=None):
        super().__init__(dtype, quantize)
        self.kept: dict[tuple, object] = {}
        self.features: dict[tuple, object] = {}

    def load(self, ref: str, unet, image_encoder: str | None = None, scale: float | dict = 1.0) -> int:
        key = (ref, image_encoder)
        if key not in self.kept:
            index = super().load(ref, unet, image_encoder, scale)
            self.kept[key] = replace(self.loaded[index])  # what a job attaches to its copy stays with the copy
            return index
        self.loaded.append(replace(self.kept[key], scale=scale))
        try:
            self.set_scales(*(la.scale for la in self.loaded))  # the checks load makes on a scale
        except UserError:
            self.loaded.pop()
            raise
        return len(self.loaded) - 1

    def encoder_folder(self, index: int = 0) -> Path:
        folder = super().encoder_folder(index)
        la = self.loaded[index]
        self.kept[(la.ref, la.encoder_ref)].encoder_folder = folder  # found once, for every later job
        return folder

    def encode(self, images, index: int = 0, fit: str = "crop", negative=None):
        if not images:
            return super().encode(images, index, fit, negative)
        hidden = self.loaded[index].adapter.config.image_proj.reads_hidden_states
        key = (self.encoder_folder(index), hidden, fit, tuple(map(image_digest, images)),
               negative and image_digest(negative))
        if key not in self.features:
            if len(self.features) >= FEATURES_KEPT:
                self.features.pop(next(iter(self.features)))
            self.features[key] = super().encode(images, index, fit, negative)
        return self.features[key]


class Renderer:
    """Runs jobs with generate's own steps (cli.check_generate, load_pipeline, prepare_prompts, render,
    save_images), keeping the pipeline while jobs name the same one; LoRAs are swapped in place (unfusing gives
    the original weights back bit for bit), adapters unloaded after each job."""

    def __init__(self):
        self.pipe, self.key, self.loras = None, None, None
        self.nets = None  # the last job's ControlNet and T2I-Adapter refs: their models are kept while jobs repeat them
        self.loads = 0

    def __call__(self, args: argparse.Namespace) -> tuple[list[Path], int]:
        from . import cli
        from .pipeline import release_memory

        checked = cli.check_generate(args)
        key, loras = cli.pipeline_key(args), (tuple(args.lora), args.fast)  # --fast loads a LoRA too
        if key != self.key:
            self.pipe = self.key = None  # one pipeline in memory at a time
            release_memory()
            pipe = cli.load_pipeline(args, checked.dtype)
            pipe.adapters = CachedAdapters(pipe.dtype, pipe.quantize)
            self.nets = None
            self.pipe, self.key, self.loras = pipe, key, loras
            self.loads += 1
        pipe = self.pipe
        pipe.unload_ip_adapter()  # the last job's adapters (a FaceID adapter's LoRA with it); files stay cached
        pipe.unload_t2i_adapter()
        pipe.unload_controlnet()
        if loras != self.loras:
            self.loras = None  # until all are in
            pipe.unload_lora()
            cli.load_loras(pipe, args)
            self.loras = loras
        nets = ([g["controlnet"] for g in checked.control_groups], [r[0] for r in checked.t2i])
        if nets != self.nets and not pipe.low_memory:  # other nets: the kept ones go before the new ones load
            pipe.controlnets.keep, pipe.t2i_adapters.keep = {}, {}
        self.nets = nets
        prompts, controls = cli.prepare_prompts(pipe, checked)
        images, params, _, _ = cli.render(pipe, args, checked, prompts, controls, progress=False)
        release_memory()  # as generate() does: a long batch's memory stays what one job needs
        return cli.save_images(images, params, args.output), checked.seed


# ---------------------------------------------------------------------------------------------------
# Manifest


def read_manifest(folder: Path) -> dict[str, dict]:
    """Job key -> the last line saying that job was done. The key (options and output name) identifies a job:
    lines moved around in the jobs file keep their pictures. A torn last line (a killed writer) is skipped."""
    done = {}
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return done
    except OSError as e:
        raise UserError(f"cannot read {folder / MANIFEST}: {e.strerror or e}") from None
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("status") == "done":
            done[entry.get("key")] = entry
    return done


def append_manifest(folder: Path, entry: dict) -> None:
    """One line, one write, under an exclusive lock: ranks on one folder never interleave."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def finished(job: Job, done: dict, folder: Path) -> bool:
    return job.error is None and job.key in done and all((folder / o).is_file() for o in job.outputs())


# ---------------------------------------------------------------------------------------------------
# Ranks


class Ranks:
    """This process's place among the ranks of `mlx.launch` (one rank alone when not launched)."""

    def __init__(self):
        import mlx.core as mx

        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank, self.size = (self.group.rank(), self.group.size()) if self.group else (0, 1)

    def all_sum(self, values: list[int]) -> list[int]:
        if self.size == 1:
            return list(values)
        import mlx.core as mx

        total = mx.distributed.all_sum(mx.array(values, dtype=mx.int32), group=self.group, stream=mx.cpu)
        return [int(v) for v in total.tolist()]


def _prepare_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --output-dir {folder}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise UserError(f"--output-dir {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --output-dir {folder}: not writable")


def _clean(folder: Path, jobs: list[Job]) -> None:
    """Rank 0, at the start of a run: earlier runs' claims, and temp PNGs of writers killed mid-write."""
    shutil.rmtree(folder / STATE / "runs", ignore_errors=True)
    for sub in {(folder / o).parent for j in jobs for o in j.outputs()}:
        try:
            for f in sub.iterdir():
                if TEMP_FILE.match(f.name):
                    f.unlink(missing_ok=True)
        except OSError:
            pass


def _lock(folder: Path):
    """One batch at a time per output folder (held by rank 0 for the whole run)."""
    (folder / STATE).mkdir(exist_ok=True)
    f = open(folder / STATE / "lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another batch is writing into {folder}; wait for it, or give another --output-dir")
    return f


def _claim(run: Path, job: Job) -> bool:
    try:
        os.close(os.open(run / str(job.line), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return True
    except FileExistsError:
        return False


# ---------------------------------------------------------------------------------------------------
# The command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", parents=[generate_parser(_Bare)], help="many generations from a JSON-lines jobs file, on one "
        "process or several (mlx.launch)",
        description="Run every job of JOBS (one JSON object per line; keys: generate's long options, "
                    "\"ip_adapters\": [{...}], \"output\") with the model loaded once; the options given here are "
                    "every job's defaults. DIR/manifest.jsonl records each job; a rerun skips finished ones. "
                    "Under `mlx.launch` the ranks share the jobs.")
    p.add_argument("jobs", metavar="JOBS", help="a .jsonl file: one job per line")
    p.add_argument("--output-dir", required=True, help="where the PNGs and manifest.jsonl go")
    p.add_argument("--static-split", action="store_true",
                   help="several ranks: job i to rank i %% size, even when they share --output-dir (default there: "
                        "each rank claims the next job when it is free, so a slow host does fewer)")
    p.set_defaults(output=None)
    for action in p._actions:
        if action.dest in ("output", "parallel"):
            action.help = argparse.SUPPRESS  # each job's "output" names its file; the ranks share jobs, not steps


def main_batch(args: argparse.Namespace) -> int:
    if args.output is not None:
        raise UserError("batch names each job's picture with \"output\" in the jobs file (inside --output-dir); "
                        "--output is not a batch option")
    if args.parallel is not None:
        raise UserError(NO_PARALLEL)
    folder = Path(args.output_dir)
    _prepare_folder(folder)
    defaults = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                     if k not in ("command", "jobs", "output_dir", "static_split")})
    jobs = read_jobs(args.jobs, defaults)
    for job in jobs:
        if job.args is not None:
            job.args.output = str(folder / job.output)
    ranks = Ranks()
    previous = signal.signal(signal.SIGTERM, _stop)  # mlx.launch stops every rank when one fails: clean up
    try:
        return _run(jobs, folder, ranks, args.static_split)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: temp files and the lock are released on the way out


def _run(jobs: list[Job], folder: Path, ranks: Ranks, static: bool = False) -> int:
    from tqdm import tqdm

    lock = None
    if ranks.rank == 0:
        lock = _lock(folder)
        _clean(folder, jobs)
    run_id = secrets.randbelow(2**31) if ranks.rank == 0 else 0
    if ranks.rank == 0 and ranks.size > 1:
        (folder / STATE / "runs" / str(run_id)).mkdir(parents=True)
    run_id = ranks.all_sum([run_id])[0]  # rank 0's, to all; and rank 0 is ready
    run = folder / STATE / "runs" / str(run_id)
    shared = ranks.size == 1 or ranks.all_sum([int(run.is_dir())])[0] == ranks.size
    claims = ranks.size > 1 and shared and not static
    done = read_manifest(folder)
    pending = [(i, j) for i, j in enumerate(jobs) if not finished(j, done, folder)]
    skipped = len(jobs) - len(pending)
    if ranks.rank == 0:
        where = "" if ranks.size == 1 else (
            f" over {ranks.size} ranks (" + ("claimed one at a time" if claims else "job i to rank i % size" +
                                           ("" if shared else ": the ranks do not share the folder")) + ")")
        print(f"batch: {len(pending)} of {len(jobs)} jobs to run{where}; {skipped} done before", file=sys.stderr)
    render = Renderer()
    counts = {"done": 0, "failed": 0}
    bar = tqdm(total=len(pending), desc="jobs", unit="job", file=sys.stderr, disable=ranks.rank != 0)
    try:
        for i, job in pending:
            mine = _claim(run, job) if claims else i % ranks.size == ranks.rank
            if not mine:
                bar.update(1)  # another rank has it
                continue
            status = _do(job, render, folder, ranks)
            counts[status] += 1
            bar.update(1)
        if ranks.size > 1 and shared:  # sleep on the folder until every rank is done: all_sum would spin
            (run / f"done-{ranks.rank}").touch()
            while len(list(run.glob("done-*"))) < ranks.size:
                time.sleep(0.2)
        total_done, total_failed, loads = ranks.all_sum([counts["done"], counts["failed"], render.loads])
        if ranks.rank == 0:
            shutil.rmtree(run, ignore_errors=True)  # every rank is past it
    finally:
        bar.close()
        if lock is not None:
            lock.close()
    if ranks.rank == 0:
        print(f"batch: {total_done} rendered, {skipped} skipped (done before), {total_failed} failed"
              + (f" (see {folder / MANIFEST})" if total_failed else "") + f"; pipelines loaded: {loads}",
              file=sys.stderr)
    return 1 if total_failed else 0


def _do(job: Job, render: Renderer, folder: Path, ranks: Ranks) -> str:
    """Run one job and record it; a failure is recorded and printed, never raised."""
    t0 = time.perf_counter()
    entry = {"line": job.line, "key": job.key, "options": job.options, "rank": ranks.rank,
             "host": os.uname().nodename, "pid": os.getpid()}
    error = job.error
    if error is None:
        try:
            paths, seed = render(job.args)
            entry.update(status="done", outputs=[Path(p).relative_to(folder).as_posix() for p in paths],
                         seed=seed, seconds=round(time.perf_counter() - t0, 3))
            append_manifest(folder, entry)
            for p in paths:
                print(p, flush=True)
            return "done"
        except UserError as e:
            error = f"line {job.line}: {e}"
        except Exception as e:  # noqa: BLE001  an unexpected failure is this job's, the batch goes on
            error = f"line {job.line}: {type(e).__name__}: {e}"
    entry.update(status="failed", error=error, seconds=round(time.perf_counter() - t0, 3))
    append_manifest(folder, entry)
    from tqdm import tqdm

    tqdm.write(f"warning: {error}", file=sys.stderr)  # above the progress bar
    return "failed"
