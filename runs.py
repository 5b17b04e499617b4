"""A run folder: the record train.py writes (config.json, final/, checkpoints/, ttt/) and every script reads,
writer beside reader."""
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cli import AUTO, OneLineError, file_mode, read_json, safe_name, signals_held, versions
from data import path_exists, task_fingerprint, task_folder, weighted_dataset
from hub import check_model_name, is_4bit, model_source


RUN_CONFIG, FINAL, BASE, CHECKPOINTS, TTT = "config.json", "final", "base", "checkpoints", "ttt"  # in a run folder

LOSS_PLOT = "loss.png"  # beside config.json

LOCK = "train.lock"  # in a run folder, held by the train.py writing it

REPLACED = ".replaced"  # in a run folder: the finished run --overwrite replaces, kept until the new one finishes

MERGED = "merged"  # in a run folder: --merge's model

TRAIN_OUTPUTS = (RUN_CONFIG, LOSS_PLOT, FINAL, BASE, CHECKPOINTS, TTT, MERGED)  # what train.py writes in a run folder


def model_positions(name):
    """max_position_embeddings of --model from its config, or None (the tiny model, a run, a hub name not cached)."""
    if name == "tiny" or is_run_folder(name):
        return None
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_source(name))
    except Exception:  # offline and not cached: load_base says so with its own error
        return None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def safetensors_complete(path):
    """True when a .safetensors file is as long as its header says: a kill -9 or a full disk cuts it short."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return Path(path).stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def checkpoint_problem(folder):
    """Why `folder` cannot be resumed exactly, or "" when it can: every file the Trainer reads back, whole."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json missing or half-written"
    for name in ("optimizer.pt", "scheduler.pt"):  # torch.save writes a zip: a cut-off one has no directory
        if not zipfile.is_zipfile(folder / name):
            return f"{name} missing or half-written (resuming it would restart the optimizer or the lr schedule)"
    weights = list(folder.glob("*.safetensors"))
    if not weights or not all(map(safetensors_complete, weights)):
        return "weights missing or half-written"
    return ""


def checkpoints(out):
    """The checkpoint folders in out/checkpoints, newest first."""
    return sorted((p for p in (Path(out) / CHECKPOINTS).glob("checkpoint-*") if p.name[len("checkpoint-"):].isdigit()),
                  key=lambda p: int(p.name[len("checkpoint-"):]), reverse=True)


def newest_complete_checkpoint(out):
    return next((c for c in checkpoints(out) if not checkpoint_problem(c)), None)


def resume_checkpoint(out):
    """The newest complete checkpoint in out/checkpoints; each newer one passed over is said, with why."""
    folder = Path(out) / CHECKPOINTS
    found = checkpoints(out)
    if not found:
        raise OneLineError(f"--resume: no checkpoint in {folder}" + replaced_note(out))
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if not problem:
            return checkpoint
        print(f"note: {checkpoint} is incomplete ({problem}; killed while saving, or a full disk?): skipped")
    raise OneLineError(f"--resume: no complete checkpoint in {folder}; start again without --resume")


@dataclass
class Run:
    """What a run folder holds, as infer.py loads it."""
    folder: Path
    final: Path           # the adapter, or the whole model after a full fine-tune
    base: str             # the model the adapter sits on (name or folder); `final` itself for a full model
    adapter: Path | None  # None for a full model
    format: str           # data.FORMATS key the run was trained with
    max_seq_len: int
    load_in_4bit: bool
    backend: str          # "unsloth" or "transformers": how it was trained, so how to load it
    fingerprints: list = field(default_factory=list)  # data.task_fingerprint of every task it was trained on
    trained_on: list = field(default_factory=list)    # one dict per dataset x split: dataset, split, tasks, ...
    ttt_mode: str = None  # a test-time-training run: per-task (adapters in folder/ttt/<task>/) or shared
    keep_ids: list = None  # --vocab arc: the base's token ids kept, in their new order; cut the base to them
    status: str = "finished"  # or "interrupted" (stopped by a signal after saving), "unfinished" (no final/ yet)
    flags: dict = field(default_factory=dict)  # the Config it was trained with
    summary: dict = None  # training's figures, written when it ends
    ttt_key: dict = None  # what a test-time run's adapters depend on (test_time_key)
    tiny: bool = False  # train.py's tiny model, random weights: it proves the pipeline, it solves nothing

    def ttt_adapter(self, task_id, task):
        """The adapter folder of one task of a per-task test-time run: its own (ttt_folder: by its id and grids),
        else one trained under another id for the same grids (train.py keeps identical grids once), else its own
        name, which does not exist."""
        own = ttt_folder(self.folder, task_id, task)
        if own.is_dir():
            return own
        return next(iter(sorted((self.folder / TTT).glob(f"*.{task_fingerprint(task)}"))), own)

    def base_changed(self):
        """True when a test-time run's base run has other weights than its adapters were trained on."""
        return bool(self.ttt_key) and self.ttt_key.get("base_weights") != base_weights(self.base)

    def ttt_adapters(self):
        """The per-task adapter folders of a test-time run, by task folder name."""
        return {p.name: p for p in (self.folder / TTT).glob("*") if p.is_dir() and not p.name.startswith(".")}

    def weight_folders(self):
        """Every folder the model's weights come from: the final folder, adapter and base; a base that is itself a
        run (test-time training starts from one) through its own folders; a per-task run's task adapters."""
        folders = [self.final, self.adapter, self.base]
        if is_run_folder(self.base):
            folders += read_run(self.base).weight_folders()
        if self.ttt_mode == "per-task":
            folders += list(self.ttt_adapters().values())
        return {Path(p).resolve() for p in folders if p and Path(p).is_dir()}

    def files(self):
        """Every file the model is read from: config.json (of a run folder) and its weight folders' files."""
        files = {f for folder in self.weight_folders() for f in folder.iterdir() if f.is_file()}
        return files | ({run_config_path(self.folder)} if self.final is not None else set())


def run_config_path(folder):
    return Path(folder) / RUN_CONFIG


def rope_scaling(cfg, backend):
    """What Unsloth does to a model whose positions are fewer than --max-seq-len: linear RoPE scaling by the ratio
    (transformers scales nothing). None when nothing is scaled."""
    positions = model_positions(cfg.model)
    if backend != "unsloth" or not positions or cfg.max_seq_len <= positions:
        return None
    return {"type": "linear", "factor": round(cfg.max_seq_len / positions, 4), "positions": positions}


def run_info(cfg, fmt, setup, base, trained_on, fingerprints, ttt=None, keep=None):
    """config.json as written at the start of training; the summary is added at the end. trained_on and
    fingerprints say which tasks' answers the weights have seen (infer.py's contamination guard reads them);
    ttt: what a test-time-training run trained on, demonstrations only; keep_ids: the base model's token ids that
    --vocab arc kept (final/ holds the tokenizer rewritten to them). load_in_4bit: whether the base was loaded in 4
    bits (either backend; never under a full fine-tune), so infer.py reloads it as it was trained."""
    backend = setup.backend
    return dict(config=dataclasses.asdict(cfg), format=fmt, max_seq_len=cfg.max_seq_len, lora=not cfg.full_finetune,
                vocab=cfg.vocab, keep_ids=keep,
                base_model=base, load_in_4bit=bool(cfg.load_in_4bit) and not cfg.full_finetune,
                backend=backend, why=setup.backend_why, rope_scaling=rope_scaling(cfg, backend),
                device=dict(device=setup.device, gpus=setup.gpus, driver=setup.driver, torch=setup.torch,
                            dtype=str(setup.dtype).split(".")[1], why=setup.dtype_why),
                trained_on=trained_on, fingerprints=fingerprints, ttt=ttt, versions=versions(), summary=None)


def is_run_folder(folder):
    """True when `folder` holds a config.json written by train.py (a model folder's config.json is not one)."""
    try:
        info = read_json(run_config_path(folder))
    except OneLineError:
        return False
    return isinstance(info, dict) and {"format", "lora", "base_model", "backend"} <= set(info)


RENAMED = {"limit_tasks": "limit"}  # flags saved under an old name: config.json key -> Config field


def legacy_flags(flags):
    """A run's saved flags under today's names, with the values of flags added since it was trained where they
    changed a default: a run saved without `loss` was trained with `answer`, then the only loss (a --resume keeps
    it)."""
    flags = {RENAMED.get(k, k): v for k, v in flags.items()}
    return {"loss": "answer", **flags} if flags and "loss" not in flags else flags


def replaced_note(folder):
    """The end of an error about `folder` when train.py --overwrite left the finished run it was replacing in
    .replaced/ (killed before the new run saved anything): where that run is and the command that restores it."""
    folder = Path(folder)
    replaced = folder / REPLACED
    if not replaced.is_dir():
        return ""
    left = [str(folder / n) for n in TRAIN_OUTPUTS if (folder / n).exists()]
    return (f"; {replaced} holds the finished run that a train.py --overwrite stopped before saving anything was "
            "replacing: restore it with `" + (f"rm -r {' '.join(left)} && " if left else "")
            + f"mv {replaced}/* {folder}/ && rmdir {replaced}`")


def read_run(folder, finished=True):
    """The Run in `folder`: every field of config.json a script needs. OneLineError when it is not a run folder, or
    (with `finished`) when its training has not ended."""
    folder = Path(folder)
    if not is_run_folder(folder):
        raise OneLineError(f"{folder}: no {RUN_CONFIG} written by train.py, not a run folder" + replaced_note(folder))
    info = read_json(run_config_path(folder))
    final = folder / FINAL
    summary = info.get("summary")
    status = "unfinished" if not isinstance(summary, dict) or not final.is_dir() else \
        "interrupted" if summary.get("interrupted") else "finished"
    if finished and not final.is_dir():
        raise OneLineError(f"{final}: missing; the run is still training or failed (train.py writes it last), "
                           "pick a finished one with --model" + replaced_note(folder))
    base = info["base_model"]
    if finished and info["lora"] and base == BASE and not (folder / BASE).is_dir():
        raise OneLineError(f"{folder / BASE}: missing; this LoRA's base model (random weights, saved nowhere else) was "
                           "deleted: train the run again")
    if info["lora"] and (folder / base).exists():  # the tiny model's random base travels inside the run
        base = str(folder / base)
    elif info["lora"] and finished:
        base = model_source(base)
    ttt = info.get("ttt") or {}
    return Run(folder=folder, final=final, base=base if info["lora"] else str(final),
               adapter=final if info["lora"] and ttt.get("mode") != "per-task" else None, format=info["format"],
               max_seq_len=info["max_seq_len"], load_in_4bit=info["load_in_4bit"],
               backend=info["backend"],
               fingerprints=info.get("fingerprints") or [], trained_on=info.get("trained_on") or [],
               ttt_mode=ttt.get("mode"), keep_ids=info.get("keep_ids"), status=status,
               flags=legacy_flags(info.get("config") or {}), summary=summary, ttt_key=ttt.get("key"),
               tiny=info["base_model"] in ("tiny", BASE))


def find_run(model="", adapter="", max_seq_len=AUTO, base_model=""):
    """The Run infer.py loads: --model RUN_FOLDER (default: the newest finished run), or a base --model (+ --adapter):
    a Run of its own kind, with no folder, format or tasks of its own. OneLineError when there is nothing to load."""
    if model:
        check_model_name(model)
    if model and Path(model).is_dir() and not (Path(model) / "config.json").exists():
        raise OneLineError(f"--model {model}: no config.json, neither a run folder nor a model folder"
                           + replaced_note(model))
    if model and not is_run_folder(model):
        if adapter and not Path(adapter).is_dir():
            raise OneLineError(f"--adapter {adapter}: no such folder")
        adapter = Path(adapter) if adapter else None
        return Run(folder=adapter or Path("."), final=None, base=model_source(model), adapter=adapter, format=None,
                   max_seq_len=max_seq_len or 8192, load_in_4bit=is_4bit(model), backend="unsloth")
    if adapter:
        raise OneLineError(f"--adapter goes with a base --model; {model or 'the latest run'} is a run folder "
                           "that names its own adapter")
    folder = Path(model) if model else latest_run(finished=True)
    if folder is None:
        raise OneLineError("no trained run: runs/ has no */config.json of a run that finished training; " +
                           unfinished_run())
    if not model:
        newer = [str(r) for r in [latest_run()] if r and r != folder]
        print(f"model: {folder} (the newest finished run" + (f"; {newer[0]} is newer but "
                                                             f"{run_status(newer[0])}" if newer else "") + ")")
    elif run_status(folder) == "interrupted":
        print(f"note: {folder} was interrupted (Ctrl-C or SIGTERM): its weights are those of the step it stopped at")
    run = read_run(folder)
    return dataclasses.replace(run, max_seq_len=max_seq_len or run.max_seq_len, base=local_base(run, base_model))


def unfinished_run():
    """What to do without a finished run: finish the newest run if there is one (an interrupted run's
    `train.py && infer.py` stops before infer.py), else train one."""
    newest = latest_run()
    run = read_run(newest, finished=False) if newest else None
    if run and run.status == "interrupted":
        return (f"the newest, {newest}, was interrupted at step {run.summary.get('steps')}: finish it with `python "
                f"train.py --out {newest} --resume`, or predict with its weights as they are: --model {newest}")
    if run and run.status == "unfinished":
        return (f"the newest, {newest}, is unfinished (still training, or killed): `python train.py --out {newest} "
                "--resume` continues it from its newest checkpoint")
    return "train one with `python train.py` or pass --model RUN_FOLDER (or a base model with --adapter)"


def local_base(run, base_model):
    """The run's base model: --base-model where given, else the one config.json names, which must be here."""
    if not base_model:
        if Path(run.base).is_absolute() and not Path(run.base).exists():
            raise OneLineError(f"{run.folder}: its base model {run.base} is not on this machine: give a local copy "
                               "with --base-model FOLDER")
        return run.base
    if not (Path(base_model) / "config.json").is_file():
        raise OneLineError(f"--base-model {base_model}: no config.json there, not a model folder")
    if run.adapter is None or run.ttt_mode:
        raise OneLineError(f"--base-model: {run.folder} " + ("is a test-time run: its base is the run it started "
                           "from" if run.ttt_mode else "holds a whole model (a full fine-tune): it has no base"))
    return base_model


def latest_run(root="runs", finished=False):
    """The run folder whose config.json was written last (with `finished`: the newest finished one), or None."""
    configs = sorted(Path(root).glob(f"*/{RUN_CONFIG}"), key=lambda p: p.stat().st_mtime)
    runs = [p.parent for p in configs if not finished or run_status(p.parent) == "finished"]
    return runs[-1] if runs else None


def run_status(folder):
    """"finished", "interrupted" (Ctrl-C or SIGTERM: stopped after saving a checkpoint), "unfinished" (training,
    killed or failed: no summary yet) or None when `folder` holds no run."""
    return read_run(folder, finished=False).status if is_run_folder(folder) else None


def test_time_key(cfg):
    """What a test-time run's adapters depend on: the base run's weights, the tasks' source and every setting that
    shapes training. A rerun into the same --out reuses adapters only under the same key."""
    names = ("dataset", "split", "ttt_mode", "ttt_views", "loss", "lora_r", "lora_alpha", "lora_dropout", "epochs",
             "max_steps", "batch_size", "grad_accum", "lr", "warmup", "scheduler", "optim", "weight_decay", "seed",
             "max_seq_len")
    return dict(base_weights=base_weights(cfg.model), **{n: getattr(cfg, n) for n in names})


def base_weights(run_folder):
    """The digest of a run's weights that test-time adapters trained on it are keyed by (test_time_key): a run
    trained further or replaced has another one."""
    start = read_run(run_folder)
    return weights_digest([start.final, start.base])


def ttt_folder(run_folder, task_id, task):
    """Where a per-task test-time-training run keeps the adapter of one task: a folder named by its id (made safe)
    and its grids (data.task_fingerprint), so that other grids under the same id never get this adapter."""
    return Path(run_folder) / TTT / f"{safe_name(task_id)}.{task_fingerprint(task)}"


def weights_digest(folders):
    """16 hex digits of sha256 over the weight files in `folders` (missing ones and hub names skipped). Files up to
    1 GiB (adapters, small models) are hashed whole; larger ones (an 8B model's shards, minutes to hash) by size
    and modification time, which every rewrite changes."""
    digest = hashlib.sha256()
    for folder in sorted({Path(p).resolve() for p in folders if p and Path(p).is_dir()}):
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            size = f.stat().st_size
            digest.update(f"{f.name} {size}".encode())
            if size > 2**30:
                digest.update(str(f.stat().st_mtime_ns).encode())
                continue
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(2**24), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def model_name(run):
    """How a model is named in output and in the cache's settings: the run folder, or base (+ adapter)."""
    if run.final is not None:
        return str(run.folder)
    return run.base + (f" + {run.adapter}" if run.adapter else "")


def model_key(run):
    """The model as the cache's settings name it: hub names only. Local folders are named by their weights (the
    settings' `weights`), so a run folder renamed or copied (runs/x to runs/best, into a Kaggle dataset) keeps
    its cache."""
    return " + ".join(str(n) for n in (run.base, run.adapter) if n and not Path(n).exists())


def weights_fingerprint(run):
    """A digest of the weight files the model loads from (run, adapter, local base): a cache written by other
    weights, such as a run trained further, is never reused. Files up to 1 GiB (adapters, small models) are
    hashed whole; larger ones (an 8B model's shards, minutes to hash) by size and modification time, which
    every rewrite changes. A hub name has no local files: its name in the settings identifies it."""
    return weights_digest(run.weight_folders())


def tokenizer_folder(run):
    """The run's final folder; for a base model, the adapter folder when it carries a tokenizer."""
    if run.final is not None:
        return str(run.final)
    return str(run.adapter) if run.adapter and (run.adapter / "tokenizer_config.json").exists() else run.base


def missing_adapters(run, tasks):
    """Ids of `tasks` a per-task test-time-training run has no adapter for (none trained for their grids), said in
    one line: they are predicted by the base run as it is."""
    if run.ttt_mode != "per-task":
        return []
    missing = sorted(tid for tid, task in tasks.items() if not run.ttt_adapter(tid, task).is_dir())
    if missing:
        print(f"note: {len(missing)} of {len(tasks)} tasks have no test-time adapter for their grids in "
              f"{run.folder} (first: {', '.join(missing[:5])}): predicted by the run {run.base} as it is; "
              "a task with one demonstration never has one, the others are trained by the same train.py --ttt "
              "command again")
    return missing


def check_ttt_base(run):
    """OneLineError when a test-time-training run's base run has other weights than those its adapters were
    trained on (trained further or replaced since): the adapters would sit on weights they never saw."""
    if run.ttt_mode and run.base_changed():
        given = {k: " ".join(v) if isinstance(v, list) else v for k, v in run.ttt_key.items()}
        raise OneLineError(f"--model {run.folder}: its test-time adapters were trained on {run.base} before it was "
                           f"trained further or replaced: train them again with python train.py --ttt --model "
                           f"{run.base} --dataset {given['dataset']} --split {given['split']} --out {run.folder} "
                           "--overwrite")


def check_out_is_free(cfg, out, ttt_key=None):
    """Refuse to train over a run already in `out` unless --resume or --overwrite says so. A per-task test-time
    run is the exception: the same command again (same base weights, tasks and settings) trains the tasks it lacks."""
    status = run_status(out)
    if status is None and (out / REPLACED).is_dir() and not cfg.overwrite:  # a --resume finds no checkpoint first
        raise OneLineError(f"--out {out}: no run of its own" + replaced_note(out) + "; or --overwrite replaces it")
    if status is None or cfg.resume or cfg.overwrite:
        return
    saved = read_run(out, finished=False).ttt_key
    if cfg.ttt and cfg.ttt_mode == "per-task" and saved == ttt_key:
        return
    if cfg.ttt and isinstance(saved, dict):
        differ = [k for k in ttt_key if saved.get(k) != ttt_key[k]]
        raise OneLineError(f"--out {out}: its test-time adapters were trained with another "
                           f"{', '.join(d.replace('_', ' ') for d in differ)}: --overwrite trains them again, or give "
                           "another --out")
    further = " with a larger --max-steps or more --epochs" if status == "finished" else ""
    raise OneLineError(f"--out {out}: a {status} run is already there: --resume{further} continues it, --overwrite "
                       "replaces it, or give another --out" + replaced_note(out))


def input_paths(cfg):
    """(flag, path) of every file or folder train.py reads that exists here: --model (a run or model folder),
    each --dataset and --val-dataset."""
    named = [("--model", cfg.model)] + [("--dataset", weighted_dataset(d)[0]) for d in cfg.dataset] \
        + [("--val-dataset", d) for d in cfg.val_dataset or []]
    return [(flag, Path(name).resolve()) for flag, name in named if name and path_exists(name)]


def check_out_is_no_input(cfg):
    """Refuse an --out that is, or is inside, the --model folder, or that is a dataset's file, folder or task folder,
    before anything is written or moved: --overwrite would move the input aside, and a dataset would read the run's
    config.json as a task."""
    out = Path(cfg.out).resolve()
    for flag, path in input_paths(cfg):
        task_folders = {task_folder(path, split) for split in cfg.split + cfg.val_split} if path.is_dir() else set()
        if out == path or flag == "--model" and out.is_relative_to(path) or out in task_folders:
            where = "is" if out == path else "is inside" if out.is_relative_to(path) else "is the task folder of"
            raise OneLineError(f"--out {cfg.out}: {where} {flag} {path}, which train.py reads; give another --out "
                               "(nothing was written or moved)")


def already_finished(cfg):
    """The steps of the finished run in cfg.out when --resume would train nothing past them (no larger --max-steps,
    or no more --epochs, than it finished with), else None."""
    run = read_run(cfg.out, finished=False) if is_run_folder(cfg.out) else None
    if cfg.ttt or run is None or run.status != "finished":
        return None
    saved, steps = run.flags, run.summary.get("steps", 0)
    if cfg.max_steps > 0:
        return steps if cfg.max_steps <= steps else None
    return steps if saved.get("max_steps") == -1 and cfg.epochs <= saved.get("epochs", cfg.epochs) else None


def with_earlier_data(out, trained_on, fingerprints):
    """(trained_on, fingerprints) of a resumed run: the sets it was trained on before and this session's, so that
    infer.py's contamination guard sees every task whose answers the weights have seen."""
    run = read_run(out, finished=False)
    read = {(s["dataset"], s["split"]) for s in run.trained_on}
    return (run.trained_on + [s for s in trained_on if (s["dataset"], s["split"]) not in read],
            sorted(set(run.fingerprints) | set(fingerprints)))


def saved_anything(out):
    """True once a run in `out` has something of its own: final/, a checkpoint or a test-time adapter."""
    adapters = (out / TTT).is_dir() and any(not p.name.startswith(".") for p in (out / TTT).iterdir())
    return (out / FINAL).exists() or bool(checkpoints(out)) or adapters


def put_back(out):
    """A replacement that ended (an error, a signal) before it saved anything of its own gives `out` back to the
    finished run it was replacing (clear_run): what it wrote so far goes, the run in .replaced/ returns."""
    replaced = out / REPLACED
    if not replaced.is_dir() or saved_anything(out):
        return
    with signals_held():
        for p in (out / n for n in TRAIN_OUTPUTS):
            if p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in replaced.iterdir():
            os.rename(p, out / p.name)
        replaced.rmdir()
    print(f"overwrite: stopped before the new run saved anything: the finished run is back in {out}", flush=True)


def drop_replaced(out):
    """The run is finished: the one it replaced (clear_run) goes."""
    if (out / REPLACED).is_dir():
        shutil.rmtree(out / REPLACED)
        print(f"overwrite: {out / REPLACED} (the finished run this one replaced) deleted")


def readable(folder):
    """Give every file in `folder` the mode open() would (0644 under umask 022): some libraries write 0600."""
    for f in Path(folder).iterdir():
        if f.is_file():
            f.chmod(file_mode())
