"""Benchmarks of the pipeline's hot paths, one function per section. Each prints absolute figures and ratios
measured side by side in the same run; all of them go to one JSON record with the machine and package versions.

    python bench.py                                    # data, train, generate, estimate on the tiny model -> bench.json
    python bench.py --arch llama3-8b --train-batch-size 2 --max-seq-len 8192 --out gpu.json   # a GPU: the 8B's shape
    python bench.py --sections modes                   # writeup / vote / poe / dfs, with and without TTT, side by side
    python bench.py --sections scoring                 # candidates scored by full forwards vs one prefill per view
    python bench.py --sections dfsbatch                # dfs's decode step: 1 view a forward vs 2 and 4 views batched
    python bench.py --sections dfs --max-seq-len 1024  # dfs before, with drafts, speculation, views batched (SmolLM2)
    python bench.py --sections vocab --train-batch-size 2 --train-batches 4 --max-seq-len 512   # --vocab arc vs full
    python bench.py --sections loss                    # --loss answer vs outputs on the family, 3 seeds
"""
import cli  # first: a Ctrl-C while the imports below load (torch takes seconds) ends in one line too
if __name__ == "__main__":
    cli.stop_while_loading()
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import data
import infer
import train
from cli import (OneLineError, check_writable, line_buffered, opt, parse_config, peak_memory_gb, quiet_libraries,
                 read_json, run_command, shared, versions, write_json)
from models import (LOSSES, count_params, encode_completion, encode_prompt, llama3_hf_tokenizer, load_base, make_setup,
                    pad_id)
from decode import SPECULATE, answer_tokens, completion_logprobs, generate, logits_kept

# Published shapes as LlamaConfig fields, built with random weights: speed and memory depend on the shape only, so
# an 8B can be timed where its weights cannot be downloaded. "tokenizer": what turns the ARC text into tokens.
ARCHS = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                      tokenizer="llama3"),
    # SmolLM2 writes one token per digit like the tiny tokenizer, whose ids fit in its vocabulary
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         tokenizer="tiny"),
}
WRITEUP_TIMINGS = dict(gpu="H100", train_s=8243, predict_s=7688, epochs=3)  # the write-up: 8243 s training, 7688 s predicting the 400 eval tasks, on one H100


@dataclass
class Config:
    sections: list = opt(["data", "train", "generate", "estimate"], "benchmark",
                         "sections to run, in the order given: data, train, generate, estimate (estimate uses the "
                         "figures of the other three, so it comes last), modes (a few minutes more), vocab (--vocab full "
                         "against arc, about 15 minutes), loss (--loss answer against outputs), scoring (full "
                         "forward against prefix-cached scoring, SmolLM2), dfsbatch (dfs's one-token step for one view "
                         "against several views in one batch, SmolLM2), dfs (the search with drafts against without, SmolLM2 "
                         "trained briefly)")
    out: str = opt("bench.json", "benchmark", "JSON record: machine, package versions and every figure")
    dataset: str = opt("arc1", "data", "tasks measured (see infer.py --dataset)")
    split: str = opt("eval", "data", "split whose prompts generate measures")
    prompts: int = opt(16, "data", "prompts generate measures: neighbours in length order, as infer.py batches them")
    model: str = opt("tiny", "model", "model train and generate measure: tiny, smollm2, a local folder or a Hugging "
                                      "Face name")
    arch: str = opt("", "model", "train measures a random-weight model of this shape instead of --model",
                    choices=["", *ARCHS])
    device: str = shared("device")
    max_seq_len: int = opt(2048, "model", "prompt + answer token limit; tasks are trimmed to fit as in train.py")
    train_batch_size: int = opt(8, "train", "sequences per training batch")
    train_batches: int = opt(3, "train", "batches timed, each padded and packed in turn")
    batch_size: int = opt(16, "sampling", "prompts per forward pass for the batched generation")
    max_new_tokens: int = opt(64, "sampling", "tokens generated per prompt, EOS suppressed so every prompt "
                                              "generates exactly this many")
    seed: int = opt(0, "sampling", "torch seed")
    modes_steps: int = opt(350, "modes", "training steps of the tiny model on the synthetic family (few: it should "
                                         "stay imperfect, so that the modes differ)")
    modes_tasks: int = opt(12, "modes", "held-out tasks of the family scored by every mode")
    modes_views: int = opt(8, "modes", "--views of vote and poe")
    modes_samples: int = opt(1, "modes", "--samples of vote and poe")
    modes_dfs: list = opt(["8:0.1", "2:0.1", "8:0.02"], "modes", "dfs runs, each a row, as VIEWS:MIN_PROB")
    modes_ttt: bool = opt(True, "modes", "the same rows again after per-task test-time training")
    scoring_model: str = opt("smollm2", "scoring", "model the scoring section measures (loaded in float32)")
    scoring_inputs: int = opt(4, "scoring", "test inputs scored, from the smallest tasks whose views all fit")
    scoring_views: int = opt(8, "scoring", "views each candidate is scored under")
    scoring_candidates: int = opt(6, "scoring", "candidates per test input")
    dfsbatch_model: str = opt("smollm2", "dfsbatch", "model the dfsbatch section measures (loaded in float32)")
    dfsbatch_inputs: int = opt(3, "dfsbatch", "test inputs, from the smallest tasks whose views all fit")
    dfsbatch_rows: list = opt(["2", "4"], "dfsbatch", "batch sizes compared with one view a forward: views per batch")
    dfsbatch_steps: int = opt(20, "dfsbatch", "one-token steps timed per view after its prompt")
    dfs_run: str = opt("", "dfs", "run folder the dfs section searches with (default: SmolLM2 trained briefly here)")
    dfs_train_steps: int = opt(60, "dfs", "training steps of that SmolLM2 on --dataset's train split")
    dfs_inputs: int = opt(20, "dfs", "test inputs searched: every 2nd of the smallest whose views all fit")
    dfs_views: int = opt(8, "dfs", "views searched per test input")
    dfs_min_prob: float = opt(0.1, "dfs", "--min-prob of the searches")
    dfs_max_new_tokens: int = opt(0, "dfs", "tokens a searched answer may have, EOS included (0: infer.py's, a 30x30 "
                                            "grid's; a briefly trained model may repeat rows with confidence)")
    vocab_models: list = opt(["smollm2", "llama3-8b-2l"], "vocab", "models timed: smollm2 and/or llama3-8b-2l (Llama-3-8B's "
                                                                   "vocabulary and width, 2 layers, random weights)")
    vocab_steps: list = opt(["15", "30", "60"], "vocab", "SmolLM2 LoRA runs on the synthetic family, one per step "
                                                         "count and --vocab, 4 sequences a step (0: none)")
    vocab_lr: float = opt(1e-3, "vocab", "their learning rate (at SmolLM2's default 4e-4 neither vocabulary solves a "
                                         "task within 40 steps)")
    vocab_tasks: int = opt(20, "vocab", "held-out tasks of the family that each of those runs predicts")
    loss_models: list = opt(["tiny"], "loss", "models trained with each --loss: tiny (full fine-tune, 16 sequences a "
                                              "step) and/or smollm2 (LoRA, 4 a step, lr 1e-3)")
    loss_steps: list = opt(["150", "300", "500"], "loss", "step counts, a run of its own each (the tiny model "
                                                          "solves the family by 500; SmolLM2 learns it in 15-60)")
    loss_seeds: list = opt(["1", "2", "3"], "loss", "seeds: each step count x --loss is trained once per seed")


def device_name(setup):
    import torch
    if setup.device == "cuda":
        return f"cuda ({setup.gpus[0]})"
    return f"cpu ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"


def busy_note():
    """A warning when other work shares the cores: absolute figures then move, side-by-side ratios less so."""
    return "  (other work shared the cores: timings are noisy)" if os.getloadavg()[0] > os.cpu_count() + 0.5 else ""


def machine(setup):
    import torch
    return dict(host=platform.node(), platform=platform.platform(), cpu=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=device_name(setup),
                gpu=setup.gpus[0] if setup.gpus else None, driver=setup.driver or None, torch=setup.torch,
                dtype=str(setup.dtype).split(".")[1],
                python=platform.python_version(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"))


# ----------------------------------------------------------------------------
# data: rendering every task's 8 views as text, and tokenizing that text

def bench_data(cfg, setup):
    """Seconds to render all tasks of both splits x 8 views (prompt and answer text, all train examples, nothing
    trimmed) in the write-up's llama3 format, and to tokenize them with the Llama-3 tokenizer."""
    tokenizer = data.llama3_tokenizer()
    out = {}
    for split in ("train", "eval"):
        tasks = data.load_tasks(cfg.dataset, split)[0]
        t0 = time.perf_counter()
        pairs = [(k, data.format_prompt(view, i, "llama3"), data.format_completion(test["output"], "llama3"))
                 for task in tasks.values() for k in range(8) for view in [data.view_task(task, k)]
                 for i, test in enumerate(view["test"]) if "output" in test]
        render_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prompt_tokens = sum(data.token_lengths([p for _, p, _ in pairs], tokenizer))
        answer_tokens = data.token_lengths([c for _, _, c in pairs], tokenizer)
        tokenize_s = time.perf_counter() - t0
        tokens = prompt_tokens + sum(answer_tokens) + 2 * len(pairs)  # + BOS and EOS, as trained
        # infer.py writes each test input's answer twice (as given, transposed): the length of the k=0 answer + EOS
        answers = [n + 1 for (k, _, _), n in zip(pairs, answer_tokens) if k == 0]
        out[split] = dict(tasks=len(tasks), sequences=len(pairs), tokens=tokens, render_s=round(render_s, 2),
                          tokenize_s=round(tokenize_s, 2), tokenize_tok_s=round(tokens / tokenize_s),
                          test_inputs=len(answers), answer_tokens=sum(answers))
        print(f"data: {cfg.dataset} {split}: {len(tasks)} tasks x 8 views -> {len(pairs)} sequences, {tokens:,} "
              f"Llama-3 tokens; render {render_s:.2f} s, tokenize {tokenize_s:.2f} s ({tokens / tokenize_s:,.0f} "
              f"tok/s); tokenize / render {tokenize_s / render_s:.1f}x{busy_note()}")
    return out


# ----------------------------------------------------------------------------
# train: forward + backward tokens/s, padded batches against the same batches packed

def arch_model(cfg, setup):
    """(model, tokenizer, what) for --arch: random weights in the setup's dtype, built on the
    device directly so that an 8B never passes through host memory in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    spec = dict(ARCHS[cfg.arch])
    tokenizer = llama3_hf_tokenizer() if spec.pop("tokenizer") == "llama3" else load_base("tiny", setup)[1]
    config = LlamaConfig(**spec, max_position_embeddings=max(cfg.max_seq_len, 8192),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad_id(tokenizer))
    torch.manual_seed(cfg.seed)
    with torch.device(setup.device):
        model = LlamaForCausalLM._from_config(config, dtype=setup.dtype)
    return model, tokenizer, f"{cfg.arch}-shaped, random weights"


def train_model(cfg, setup):
    """(model, tokenizer, what) set up as train.py trains it: the tiny model fully, any other with the write-up's
    rsLoRA and gradient checkpointing (transformers + peft)."""
    if cfg.arch:
        model, tokenizer, what = arch_model(cfg, setup)
    else:
        model, tokenizer = load_base(cfg.model, setup, cfg.max_seq_len, seed=cfg.seed)
        what = "tiny (train.py's), full fine-tune" if cfg.model == "tiny" else cfg.model
    model = model.to(setup.device)
    model.config.use_cache = False  # as the Trainer sets it; a cache would also hide the packed layout
    if cfg.arch or cfg.model != "tiny":
        model.gradient_checkpointing_enable()
        lora = train.Config(vocab="full", full_finetune=False, seed=cfg.seed)
        model, tokenizer, _ = train.prepare_model(lora, setup, model, tokenizer, None)  # untied, rsLoRA, as train.py
        what += ", rsLoRA r=16 + embed_tokens/lm_head, gradient checkpointing"
    return model.train(), tokenizer, what


def train_batches(cfg, tokenizer):
    """cfg.train_batches random batches of cfg.train_batch_size training sequences (random tasks, random views),
    fitted to max_seq_len as train.py fits them."""
    import random
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    tasks = data.load_tasks(cfg.dataset, "train")[0]
    rng = random.Random(cfg.seed)
    picked = rng.sample(sorted(tasks), min(len(tasks), cfg.train_batches * cfg.train_batch_size + 8))
    ds, _ = data.build_dataset({tid: tasks[tid] for tid in picked}, fmt, [rng.randrange(8)], cfg.max_seq_len,
                               data.count_tokens(tokenizer))
    rows = list(train.tokenize(ds, tokenizer, cfg.max_seq_len)[0])
    rng.shuffle(rows)
    n = cfg.train_batch_size
    return [rows[i:i + n] for i in range(0, len(rows) - n + 1, n)][:cfg.train_batches]


def forward_backward(model, batch, optimizer=None):
    """(loss, seconds) of one forward + backward pass, and of the optimizer's step when one is given."""
    import torch
    batch = {k: v.to(model.device) for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - t0


def bench_train(cfg, setup):
    """Training tokens/s, padded against packed, on the same batches: timed batch by batch in turn (which one goes
    first alternates), so a machine busy with other work slows both alike. The loss on the first batch must be the
    same both ways. Tokens are real tokens: padding slots are not counted."""
    import torch
    gpu = setup.device == "cuda"
    model, tokenizer, what = train_model(cfg, setup)
    batches = train_batches(cfg, tokenizer)
    modes = {"padded": train.batch_collator(tokenizer), "packed": train.batch_collator(tokenizer, packing=True)}
    real = sum(len(r["input_ids"]) for b in batches for r in b)
    slots = sum(modes["padded"](b)["input_ids"].numel() for b in batches)
    print(f"train: {what} on {device_name(setup)}; {len(batches)} batches of {cfg.train_batch_size} {cfg.dataset} train "
          f"sequences, {real:,} tokens ({1 - real / slots:.0%} of the padded batches is padding); forward + backward")
    first = {name: forward_backward(model, collate(batches[0]))[0] for name, collate in modes.items()}  # + warm-up
    seconds, peaks = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0.0)
    for i, batch in enumerate(batches):
        for name in (list(modes) if i % 2 == 0 else list(modes)[::-1]):
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            seconds[name] += forward_backward(model, modes[name](batch))[1]
            peaks[name] = max(peaks[name], peak_memory_gb()[1])
    out = dict(model=what, device=device_name(setup), batches=len(batches), batch_size=cfg.train_batch_size,
               max_seq_len=cfg.max_seq_len, tokens=real, padded_slots=slots,
               loss_padded=first["padded"], loss_packed=first["packed"],
               loss_abs_diff=abs(first["padded"] - first["packed"]))
    for name in modes:
        out[f"{name}_tok_s"] = round(real / seconds[name], 1)
        # a process's peak RSS never goes down, so on a CPU there is one figure for both modes
        memory = f"peak GPU memory {peaks[name]:.2f} GB" if gpu else ""
        if gpu:
            out[f"{name}_peak_gb"] = round(peaks[name], 2)
        print(f"  {name:<8} {real:>8,} tokens in {seconds[name]:>7.2f} s  {real / seconds[name]:>10,.1f} tok/s  "
              f"{memory}".rstrip())
    if not gpu:
        out["peak_rss_gb"] = round(peak_memory_gb()[1], 2)
        print(f"  peak RAM (max RSS of the whole bench process so far) {out['peak_rss_gb']:.2f} GB")
    out["packed_over_padded"] = round(seconds["padded"] / seconds["packed"], 3)
    print(f"  packed / padded: {out['packed_over_padded']:.2f}x; loss on batch 1: padded {first['padded']:.6f}, "
          f"packed {first['packed']:.6f} (difference {out['loss_abs_diff']:.1e}){busy_note()}")
    return out


# ----------------------------------------------------------------------------
# generate: batched against one prompt at a time, at the real prompt lengths

def generate_setup(cfg, setup):
    """(model, tokenizer, prompts): --model (the tiny model with random weights by default) and real ARC prompts as
    token ids in the model's format. infer.py sorts all prompts by length before batching, so its batches hold
    prompts of about the same length: the prompts here are `cfg.prompts` neighbours from the middle of that order
    (guess 1, first test input)."""
    model, tokenizer = load_base(cfg.model, setup, cfg.max_seq_len, seed=cfg.seed)
    model = model.eval().to(setup.device)
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    tasks, _ = data.load_tasks(cfg.dataset, cfg.split)
    prompts = []
    for tid in sorted(tasks):
        fitted, _ = data.fit_task(data.strip_outputs(tasks[tid]), 0, fmt, cfg.max_seq_len,
                                  data.count_tokens(tokenizer))
        if fitted is not None:
            prompts.append(encode_prompt(tokenizer, data.format_prompt(fitted, 0, fmt)))
    prompts.sort(key=len, reverse=True)
    start = max(0, (len(prompts) - cfg.prompts) // 2)
    return model, tokenizer, prompts[start:start + cfg.prompts]


def timed_generation(model, tokenizer, prompts, cfg, batch_size):
    """Seconds to generate cfg.max_new_tokens tokens for each prompt through decode.generate, `batch_size` prompts
    per call."""
    gen_cfg = replace(infer.Config(), temperature=1.0, top_k=50, max_new_tokens=cfg.max_new_tokens)
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        generate(model, tokenizer, prompts[start:start + batch_size], gen_cfg, min_new_tokens=cfg.max_new_tokens)
    return time.perf_counter() - t0


def bench_generate(cfg, setup):
    """Generated tokens/s batched vs one prompt at a time: same model, prompts and number of tokens. The two are
    timed batch by batch in turn, so a machine busy with other work slows both alike."""
    import torch
    model, tokenizer, prompts = generate_setup(cfg, setup)
    lengths = sorted(map(len, prompts))
    what = "tiny model (train.py's)" if cfg.model == "tiny" else cfg.model
    print(f"generate: {what} on {device_name(setup)}, {len(prompts)} "
          f"{cfg.dataset} {cfg.split} prompts of {lengths[0]}..{lengths[-1]} tokens (median "
          f"{int(statistics.median(lengths))}), {cfg.max_new_tokens} new tokens each")
    torch.manual_seed(cfg.seed)
    timed_generation(model, tokenizer, prompts[:2], replace(cfg, max_new_tokens=2), 2)  # warm-up
    batched = single = 0.0
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start:start + cfg.batch_size]
        batched += timed_generation(model, tokenizer, chunk, cfg, cfg.batch_size)
        single += timed_generation(model, tokenizer, chunk, cfg, 1)
    tokens = len(prompts) * cfg.max_new_tokens
    for label, seconds in ((f"batched ({cfg.batch_size}/pass)", batched), ("one at a time", single)):
        print(f"  {label:<22} {tokens:>6} tokens in {seconds:>7.2f} s  {tokens / seconds:>9.1f} tok/s")
    print(f"  batched / one at a time: {single / batched:.1f}x{busy_note()}")
    return dict(model=what, device=device_name(setup), prompts=len(prompts),
                prompt_tokens_median=int(statistics.median(lengths)), new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size, batched_tok_s=round(tokens / batched, 1),
                single_tok_s=round(tokens / single, 1), ratio=round(single / batched, 2))


# ----------------------------------------------------------------------------
# estimate: the write-up's whole run at the rates measured above

def bench_estimate(cfg, setup):
    """Seconds for the write-up's run (train 3 epochs of arc1 train x 8 views, predict two guesses for every test
    input of the 400 eval tasks) at the tokens/s this record measured, next to the write-up's H100 seconds. An
    extrapolation: the measured model on the measured machine, token counts of the Llama-3 tokenizer."""
    record = read_json(cfg.out) if os.path.exists(cfg.out) else {}
    missing = [s for s in ("data", "train", "generate") if s not in record]
    if missing:
        raise SystemExit(f"error: --sections estimate needs the {', '.join(missing)} figures in {cfg.out}: "
                         "run --sections data train generate estimate")
    train_tokens = WRITEUP_TIMINGS["epochs"] * record["data"]["train"]["tokens"]
    answer_tokens = 2 * record["data"]["eval"]["answer_tokens"]  # two guesses per test input
    t, g = record["train"], record["generate"]
    rows = [("train, padded", train_tokens, t["padded_tok_s"], WRITEUP_TIMINGS["train_s"]),
            ("train, packed", train_tokens, t["packed_tok_s"], WRITEUP_TIMINGS["train_s"]),
            ("predict, batched", answer_tokens, g["batched_tok_s"], WRITEUP_TIMINGS["predict_s"]),
            ("predict, one at a time", answer_tokens, g["single_tok_s"], WRITEUP_TIMINGS["predict_s"])]
    print(f"estimate: an extrapolation, not a measurement: the write-up's run at the rates measured here "
          f"(train: {t['model']}; predict: {g['model']}; {t['device']}), next to the write-up's Llama-3-8B on an "
          f"{WRITEUP_TIMINGS['gpu']}")
    out = {}
    for label, tokens, rate, theirs in rows:
        seconds = tokens / rate
        out[label] = dict(tokens=tokens, tok_s=rate, seconds=round(seconds), write_up_s=theirs,
                          write_up_over_estimate=round(theirs / seconds, 3))
        print(f"  {label:<23} {tokens:>11,} tokens at {rate:>9,.1f} tok/s = {seconds:>9,.0f} s   "
              f"write-up {theirs:>5} s   write-up / estimate {theirs / seconds:.2f}x")
    out["weights_gb"] = recipe_weights_gb()
    return out


def recipe_weights_gb():
    """GB of the write-up's Llama-3-8B weights as the default recipe loads them (--load-in-4bit: nf4 projections,
    the rest 16-bit), beside a 16-bit load and beside 4 bits with --vocab arc's cut embeddings: from the shape."""
    spec = ARCHS["llama3-8b"]
    sizes = {"4-bit, full vocab": weight_bytes(spec, True), "16-bit, full vocab": weight_bytes(spec, False),
             "4-bit, vocab arc": weight_bytes(spec, True, vocab=64)}
    print("  weights of the write-up's Llama-3-8B (the recipe loads it in 4 bits): " +
          ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sizes.items()) + "; activations, LoRA and optimizer "
          "state come on top")
    return {k: round(v / 2**30, 2) for k, v in sizes.items()}


def weight_bytes(spec, four_bit, vocab=None, dtype_bytes=2):
    """Bytes of a Llama-shaped model's weights (an ARCHS entry): the linear layers of every block in bitsandbytes
    nf4 with double quantization where `four_bit` (half a byte a weight, one 8-bit scale per 64 weights, one fp32
    scale and offset per 256 of those), else `dtype_bytes`; embed_tokens, lm_head (untied) and the norms stay at
    `dtype_bytes`. vocab: the rows a --vocab arc run keeps."""
    h, layers, inter = spec["hidden_size"], spec["num_hidden_layers"], spec["intermediate_size"]
    kv = h * spec["num_key_value_heads"] // spec["num_attention_heads"]
    linears = [h * h, h * kv, h * kv, h * h, h * inter, h * inter, inter * h]  # q k v o gate up down
    blocks = [math.ceil(n / 64) for n in linears]
    per_layer = sum(n // 2 + b + 4 * math.ceil(b / 256) + 4 for n, b in zip(linears, blocks)) if four_bit \
        else sum(linears) * dtype_bytes
    rows = vocab or spec["vocab_size"]
    heads = 1 if spec["tie_word_embeddings"] else 2
    return layers * (per_layer + 2 * h * dtype_bytes) + (heads * rows * h + h) * dtype_bytes


# ----------------------------------------------------------------------------
# modes: the guess modes and test-time training side by side

def bench_modes(cfg, setup):
    """Every guess mode of infer.MODES side by side (dfs once per --modes-dfs VIEWS:MIN_PROB), with and without
    test-time training, on the same held-out tasks: the tiny model trained briefly on the colour-mapping family of
    --dataset family, then per-task TTT on the held-out tasks' demonstrations. Everything goes through train.main
    and infer.main, as a user runs them."""
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        family, base, ttt = Path(tmp) / "family", Path(tmp) / "base", Path(tmp) / "ttt"
        held_out = sorted(data.colour_family(*data.FAMILY_SIZES)["eval"].items())[:cfg.modes_tasks]
        for tid, task in held_out:  # the first --modes-tasks of --dataset family's eval tasks
            write_json(family / f"{tid}.json", task)
        timed = {}
        t0 = time.time()
        train.main(["--dataset", data.FAMILY, "--max-steps", str(cfg.modes_steps), "--out", str(base),
                    "--logging-steps", "50", "--seed", str(cfg.seed)])
        timed[base] = time.time() - t0
        runs = [(base, f"{cfg.modes_steps} steps")]
        if cfg.modes_ttt:
            t0 = time.time()
            train.main(["--ttt", "--model", str(base), "--dataset", str(family), "--split", "eval", "--out", str(ttt),
                        "--epochs", "2", "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3"])
            timed[ttt] = time.time() - t0
            runs.append((ttt, f"{cfg.modes_steps} steps + TTT per task"))
        variants = [(mode, ["--views", str(cfg.modes_views), "--samples", str(cfg.modes_samples)])
                    for mode in infer.MODES if mode != "dfs"]
        variants += [(f"dfs {v} views P {p}", ["--views", v, "--min-prob", p])
                     for v, p in (spec.split(":") for spec in cfg.modes_dfs)]
        for run, label in runs:
            for i, (name, flags) in enumerate(variants):
                out = run / f"mode{i}" / "submission.json"
                t0 = time.time()
                infer.main(["--model", str(run), "--dataset", str(family), "--split", "eval", "--guesses",
                            name.split()[0], "--seed", str(cfg.seed), "--out", str(out)] + flags)
                seconds = time.time() - t0
                _, cache, results, _ = infer.paths(out, by_mode=False)  # each mode in a folder of its own
                r = json.loads(results.read_text())
                cached = infer.read_cache(cache)
                candidates = [len(c) for rec in cached.values() for c in rec.candidates]
                rows.append(dict(model=label, guesses=name, seconds=round(seconds, 1),
                                 s_per_task=round(seconds / r["tasks"], 2),
                                 candidates=round(statistics.mean(candidates), 1) if candidates else None,
                                 **{k: r[k] for k in ("score", "tasks", "solved_any", "solved_first", "solved_second",
                                                      "correct_pixels", "found")}))
    print(f"\nmodes: tiny model on {cfg.modes_tasks} held-out tasks of the colour-mapping family (--dataset family), "
          f"vote/poe with {cfg.modes_views} views x {cfg.modes_samples} samples; training {timed[base]:.0f} s"
          + (f", TTT {timed[ttt]:.0f} s" if cfg.modes_ttt else ""))
    print("| model | guesses | score | solved by any guess | by guess 1 | by guess 2 | Found | correct pixels | "
          "s / task | candidates / test input |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['guesses']} | {row['score']:.0f} / {row['tasks']} | {row['solved_any']} | "
              f"{row['solved_first']} | {row['solved_second']} | {row['found']} | {row['correct_pixels']:.1%} | "
              f"{row['s_per_task']} | "
              f"{row['candidates'] if row['candidates'] is not None else '-'} |")
    return dict(rows=rows, train_s=round(timed[base], 1), ttt_s=round(timed[ttt], 1) if cfg.modes_ttt else None)


# ----------------------------------------------------------------------------
# scoring: a full forward per (view, candidate) against one prefill per view

def full_forward_logprobs(model, tokenizer, prompt_ids, completion_ids, batch_size):
    """The scorer before prefix caching, the baseline timed here: prompt + completion of every pair in one forward
    pass, longest first in right-padded batches, logits only where a completion token is predicted."""
    import torch
    pairs = list(zip(prompt_ids, completion_ids))
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    pad, out = pad_id(tokenizer), [0.0] * len(pairs)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            first = min(len(pairs[i][0]) for i in batch) - 1
            logits = model(input_ids=ids, attention_mask=mask, **logits_kept(model, width - first)).logits
            offset = width - logits.shape[1]
            for row, i in enumerate(batch):
                p, c = len(pairs[i][0]), len(pairs[i][1])
                rows = logits[row, p - 1 - offset:p - 1 + c - offset].float().log_softmax(-1)
                out[i] = rows.gather(-1, torch.tensor(pairs[i][1])[:, None]).sum().item()
    return out


def scoring_candidates(grid, n, rng):
    """`n` distinct candidate grids for a test input: its right answer, its transpose (another shape when not
    square), then copies with one to three cells recoloured: the near misses a sampling run proposes."""
    out = [grid, [list(r) for r in zip(*grid)]]
    while len({infer.grid_key(g) for g in out}) < n:
        g = [list(r) for r in grid]
        for _ in range(rng.randint(1, 3)):
            i, j = rng.randrange(len(g)), rng.randrange(len(g[0]))
            g[i][j] = (g[i][j] + rng.randint(1, 9)) % 10
        out.append(g)
    return list({infer.grid_key(g): g for g in out}.values())[:n]


def bench_scoring(cfg, setup):
    """Scoring every candidate of a test input under every view, as poe and dfs do: a full forward pass per (view,
    candidate) against decode.completion_logprobs (one prefill per view, its cache shared by the candidates), on
    real prompts of the smallest --dataset --split tasks whose 8 views fit --max-seq-len. Tokens forwarded count
    every position a forward pass computes (padding included); the two run in turn per test input, so other work
    on the machine slows both alike."""
    import random
    model, tokenizer = load_base(cfg.scoring_model, setup, cfg.max_seq_len)
    model = model.float().eval().to(setup.device)
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    views = data.views(cfg.scoring_views)
    tasks, _ = data.load_tasks(cfg.dataset, cfg.split)
    inputs = [(tid, i, [prompt for prompt, _ in pairs])  # (task id, test input, prompt ids per view)
              for tid, i, pairs in smallest_view_prompts(cfg, tokenizer, cfg.scoring_views, cfg.scoring_inputs)]
    forwarded = []
    model.register_forward_pre_hook(lambda m, args, kw: forwarded.append(kw["input_ids"].numel()), with_kwargs=True)
    rng, rows = random.Random(cfg.seed), []
    encode = lambda g, k, p: encode_completion(tokenizer, data.format_completion(data.apply_view(g, k, p), fmt))  # noqa: E731
    completion_logprobs(model, tokenizer, inputs[0][2][:1], [[tokenizer.eos_token_id]])  # warm-up
    for tid, i, prompts in inputs[:cfg.scoring_inputs]:
        grids = scoring_candidates(tasks[tid]["test"][i]["output"], cfg.scoring_candidates, rng)
        pairs = [(ids, encode(g, k, p)) for (k, p), ids in zip(views, prompts) for g in grids]
        row = dict(task=tid, test=i, prompt_tokens=int(statistics.median(map(len, prompts))), candidates=len(grids))
        for name, scorer in (("full", full_forward_logprobs), ("cached", completion_logprobs)):
            forwarded.clear()
            t0 = time.perf_counter()
            row[name] = scorer(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], cfg.batch_size)
            row[f"{name}_s"], row[f"{name}_tokens"] = time.perf_counter() - t0, sum(forwarded)
        row["max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(row.pop("cached"), row.pop("full")))
        rows.append(row)
    n = len(rows)
    total = {k: sum(r[k] for r in rows) for k in ("full_s", "cached_s", "full_tokens", "cached_tokens")}
    worst = max(r["max_rel_diff"] for r in rows)
    print(f"\nscoring: {cfg.scoring_model} (float32) on {device_name(setup)}, {n} test inputs of the smallest "
          f"{cfg.dataset} {cfg.split} tasks (prompts of {min(r['prompt_tokens'] for r in rows)}.."
          f"{max(r['prompt_tokens'] for r in rows)} tokens), {cfg.scoring_views} views x {cfg.scoring_candidates} "
          f"candidates each (the answer, its transpose, near misses), batch {cfg.batch_size}")
    print("| scorer | tokens forwarded / test input | s / test input | largest relative score difference |")
    print("|---|---|---|---|")
    print(f"| full forward per (view, candidate) | {total['full_tokens'] / n:,.0f} | {total['full_s'] / n:.2f} | "
          "(reference) |")
    print(f"| one prefill per view, cache shared | {total['cached_tokens'] / n:,.0f} | {total['cached_s'] / n:.2f} | "
          f"{worst:.1e} |")
    print(f"  {total['full_tokens'] / total['cached_tokens']:.1f}x fewer tokens, "
          f"{total['full_s'] / total['cached_s']:.1f}x less time{busy_note()}")
    return dict(model=cfg.scoring_model, device=device_name(setup), views=cfg.scoring_views,
                candidates=cfg.scoring_candidates, rows=[{k: (round(v, 3) if isinstance(v, float) else v)
                                                          for k, v in r.items()} for r in rows],
                tokens_ratio=round(total["full_tokens"] / total["cached_tokens"], 2),
                time_ratio=round(total["full_s"] / total["cached_s"], 2), max_rel_diff=worst)


# ----------------------------------------------------------------------------
# dfsbatch: dfs's one-token step for one view a forward against several views in one batch

def smallest_view_prompts(cfg, tokenizer, n_views, n_inputs, varied=False):
    """[(task id, test index, [(prompt ids, right answer's completion ids) per view])] of the smallest --dataset
    --split tasks whose first `n_views` views all fit --max-seq-len untrimmed, the test inputs of whole tasks until
    there are `n_inputs`; with `varied`, only those whose views differ in prompt length (a square task's do not), so
    that a batch of them needs padding."""
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    count, views = data.count_tokens(tokenizer), data.views(n_views)
    tasks, _ = data.load_tasks(cfg.dataset, cfg.split)
    out = []
    for tid in sorted(tasks, key=lambda t: len(json.dumps(tasks[t]))):
        for i, test in enumerate(tasks[tid]["test"]):
            fitted = [data.fit_task(data.prompt_view(tasks[tid], k, p), i, fmt, cfg.max_seq_len, count)
                      for k, p in views]
            if not all(f is not None and not trimmed for f, trimmed in fitted):
                continue
            pairs = [(encode_prompt(tokenizer, data.format_prompt(f, i, fmt)), encode_completion(
                tokenizer, data.format_completion(data.apply_view(test["output"], k, p), fmt)))
                     for (f, _), (k, p) in zip(fitted, views)]
            if not varied or len({len(prompt) for prompt, _ in pairs}) > 1:
                out.append((tid, i, pairs))
        if len(out) >= n_inputs:
            break
    return out


def decode_steps(model, prompts, tokens, pad, device):
    """(prefill seconds, [seconds of each one-token step], log-probs [row][step]) of prompts (token ids) prefilled
    in one forward, then tokens[row][s] fed to every row at step s on the growing cache, as dfs_search's inner loop
    feeds its branch. Several prompts are left-padded, with an attention mask and each row's own positions."""
    import torch
    from transformers import DynamicCache
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, logprobs = DynamicCache(), []
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, **logits_kept(model, 1)).logits[:, -1]
        sync()
        prefill, steps = time.perf_counter() - t0, []
        logprobs.append(logits.float().log_softmax(-1))
        for s in range(len(tokens[0])):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], -1)
            positions = positions[:, -1:] + 1
            t0 = time.perf_counter()
            logits = model(input_ids=torch.tensor([[t[s]] for t in tokens], device=device), attention_mask=mask,
                           position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
            sync()
            steps.append(time.perf_counter() - t0)
            logprobs.append(logits.float().log_softmax(-1))
    return prefill, steps, [[lp[r] for lp in logprobs] for r in range(len(prompts))]


def batched_against_alone(model, views, rows, n_steps, pad, device):
    """One test input's first `rows` views decoded one a batch and all in one batch, each order once (other work on
    the machine then slows both alike): summed prefill seconds, every step's seconds, and the largest log-prob
    differences between the two."""
    prompts = [p for p, _ in views[:rows]]
    tokens = [(c * n_steps)[:n_steps] for _, c in views[:rows]]  # the answer's tokens, again when it is shorter
    out = dict(alone_prefill_s=0.0, alone_steps=[], batch_prefill_s=0.0, batch_steps=[])
    for batch_first in (False, True):
        for batched in (batch_first, not batch_first):
            runs = [decode_steps(model, prompts, tokens, pad, device)] if batched else \
                [decode_steps(model, [p], [t], pad, device) for p, t in zip(prompts, tokens)]
            name = "batch" if batched else "alone"
            out[f"{name}_prefill_s"] += sum(r[0] for r in runs)
            out[f"{name}_steps"] += [t for r in runs for t in r[1]]
            out[name] = [row for r in runs for row in r[2]]
    # every next-token log-prob, and the summed log-prob of the path fed (what dfs compares with -log(min_prob))
    out["max_abs_diff"] = max((a - b).abs().max().item() for ra, rb in zip(out["alone"], out["batch"])
                              for a, b in zip(ra, rb))
    path = lambda lps, t: sum(lp[x].item() for lp, x in zip(lps, t))  # noqa: E731
    out["max_rel_diff"] = max(abs(path(ra, t) - path(rb, t)) / abs(path(ra, t))
                              for ra, rb, t in zip(out.pop("alone"), out.pop("batch"), tokens))
    return out


def bench_dfsbatch(cfg, setup):
    """What dfs would gain by searching several views of a test input in one batch (NVARC's turbo DFS runs 4):
    the one-token step that dfs_search's inner loop makes, for each view alone (batch 1, as decode.dfs_search does)
    against --dfsbatch-rows views in one left-padded batch, and the prompts' prefill the same two ways, on real
    prompts of the smallest --dataset --split tasks; with the largest log-prob difference the padding brings."""
    if not all(n.isdigit() and int(n) >= 2 for n in cfg.dfsbatch_rows):
        raise SystemExit(f"error: --dfsbatch-rows {' '.join(cfg.dfsbatch_rows)}: give batch sizes of 2 or more")
    sizes = [int(n) for n in cfg.dfsbatch_rows]
    model, tokenizer = load_base(cfg.dfsbatch_model, setup, cfg.max_seq_len)
    model = model.float().eval().to(setup.device)
    inputs = smallest_view_prompts(cfg, tokenizer, max(sizes), cfg.dfsbatch_inputs, varied=True)
    if not inputs:
        raise SystemExit(f"error: --dataset {cfg.dataset} --split {cfg.split}: no test input whose {max(sizes)} "
                         f"views fit --max-seq-len {cfg.max_seq_len}")
    pad = pad_id(tokenizer)
    for size in [1, *sizes]:  # warm-up: a batch's first forward of its shape is slower
        decode_steps(model, [p for p, _ in inputs[0][2][:size]], [[pad]] * size, pad, setup.device)
    rows = []
    for size in sizes:
        runs = [batched_against_alone(model, views, size, cfg.dfsbatch_steps, pad, setup.device)
                for _, _, views in inputs]
        # medians: a step another process preempts takes many times its cost, and there are many steps
        alone, batch = (statistics.median(t for r in runs for t in r[f"{k}_steps"]) for k in ("alone", "batch"))
        prefill = {k: sum(r[f"{k}_prefill_s"] for r in runs) for k in ("alone", "batch")}
        rows.append(dict(rows=size, alone_step_ms=1000 * alone, batch_step_ms=1000 * batch,
                         step_ratio=size * alone / batch, prefill_ratio=prefill["alone"] / prefill["batch"],
                         max_abs_diff=max(r["max_abs_diff"] for r in runs),
                         max_rel_diff=max(r["max_rel_diff"] for r in runs)))
    lengths = [len(p) for _, _, views in inputs for p, _ in views]
    print(f"\ndfsbatch: {cfg.dfsbatch_model} (float32) on {device_name(setup)}, {len(inputs)} test inputs of the "
          f"smallest {cfg.dataset} {cfg.split} tasks (prompts of {min(lengths)}..{max(lengths)} tokens, left-padded "
          f"in a batch), {cfg.dfsbatch_steps} one-token steps per view, each order once")
    print("| views a batch | ms / step, 1 view a batch | ms / step, the batch | cost per view, batched / alone | "
          "prefill, batched / one by one | largest log-prob difference | largest path relative difference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['alone_step_ms']:.1f} | {r['batch_step_ms']:.1f} | {1 / r['step_ratio']:.2f} | "
              f"{1 / r['prefill_ratio']:.2f} | {r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} |")
    print(f"  per view a batched step is {rows[-1]['step_ratio']:.2f}x cheaper at {rows[-1]['rows']} views"
          f"{busy_note()}")
    return dict(model=cfg.dfsbatch_model, device=device_name(setup), steps=cfg.dfsbatch_steps,
                inputs=[f"{tid}:{i}" for tid, i, _ in inputs],
                rows=[{k: (round(v, 3) if isinstance(v, float) and k not in ("max_abs_diff", "max_rel_diff") else v)
                       for k, v in r.items()} for r in rows])


# ----------------------------------------------------------------------------
# dfs: the depth-first search of every view with drafts against the search with only the best answer so far known

def dfs_run(cfg, tmp):
    """--dfs-run, or SmolLM2 trained for --dfs-train-steps on --dataset's train split into `tmp` (LoRA, lr 1e-3,
    prompts cut to --max-seq-len): a model that writes grids, so the search follows answers, not noise."""
    if cfg.dfs_run:
        return cfg.dfs_run
    train.main(["--model", "smollm2", "--dataset", cfg.dataset, "--max-steps", str(cfg.dfs_train_steps),
                "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--max-seq-len", str(cfg.max_seq_len),
                "--seed", str(cfg.seed), "--out", str(tmp), "--logging-steps", "20"])
    return str(tmp)


# (name, label, drafts, tokens speculated (None: decode.SPECULATE), views a batch, the adapter merged (infer.py's
# load_model) or on top of the base, as infer.py loaded a LoRA run before)
DFS_SEARCHES = (("before", "best answer so far known, one view at a time (before)", False, 0, 1, False),
                ("drafts", "drafts verified in one pass", True, 0, 1, False),
                ("speculate", "drafts, and tokens speculated where a branch leaves them", True, None, 1, False),
                ("batched", "and the 8 views in one batch", True, None, 8, False),
                ("merged", "and the adapter merged into the base (infer.py's default)", True, None, 8, True))


def searched_views(model, tokenizer, fmt, task, test, views, cfg, drafts, speculate, together):
    """Each view's dfs search of one test input as infer's dfs runs them, with every draft (infer.dfs_drafts) or,
    as before drafts, only the best answer found so far known, `speculate` tokens run on where a branch leaves
    them (None: decode.SPECULATE, as infer.py), `together` views in one batch (infer.view_groups):
    (per view [(tokens, nll)], forward passes asked for)."""
    from decode import answer_ids
    allowed, eos = answer_ids(tokenizer, fmt), tokenizer.eos_token_id
    encode = lambda g: encode_completion(tokenizer, data.format_completion(g, fmt))  # noqa: E731
    longest = lambda ids: min(cfg.dfs_max_new_tokens or answer_tokens(tokenizer, fmt),  # noqa: E731
                              cfg.max_seq_len - len(ids))
    found, per_view, forwards = [], [], 0
    for group in infer.view_groups(views, together):
        ranked = [g for g, _ in sorted(found, key=lambda f: f[1])]
        searches = [(ids, longest(ids), infer.dfs_drafts(ranked if drafts else ranked[:1], task if drafts else None,
                                                         test, k, perm, encode)) for k, perm, ids in group]
        for (k, perm, _), (out, _, n) in zip(group, infer.dfs_views(model, searches, eos, cfg.dfs_min_prob, allowed,
                                                                     speculate=speculate)):
            per_view.append(out)
            forwards += n
            for tokens, nll in out:
                grid = data.parse_output(tokenizer.decode(tokens), fmt)
                if grid is not None:
                    found.append((data.undo_view(grid, k, perm), nll))
    return per_view, forwards


def bench_dfs(cfg, setup):
    """infer's dfs on --dfs-inputs test inputs of mixed sizes (every 2nd of the smallest --dataset --split ones
    whose --dfs-views views fit --max-seq-len), each searched each way of DFS_SEARCHES in turn, the order reversed
    every other input (other work on the machine slows all alike): before (only the best answer so far known, one
    view at a time, a LoRA run's adapter on top of its base as infer.py loaded it), with drafts (the answers of
    earlier views, the test input, the demonstration outputs), with speculated tokens too, with the views in one
    batch, and with the adapter merged: forward passes (after the prefills, a batched one
    counted once), tokens forwarded (every position of every pass, prompts and padding included), seconds,
    answers found and the largest relative nll difference against before."""
    import tempfile
    from runs import read_run
    from models import build_model, load_model
    forwarded, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = read_run(dfs_run(cfg, Path(tmp) / "run"))
        model, tokenizer = load_model(run, setup)
        models = {True: model, False: build_model(run.base, setup, run.keep_ids, run.adapter, False, run.max_seq_len,
                                                  run.load_in_4bit) if run.adapter else model}
    for model in models.values():
        model.float().eval().register_forward_pre_hook(
            lambda m, args, kw: forwarded.append(kw["input_ids"].numel()), with_kwargs=True)
    fmt, tasks = run.format, data.load_tasks(cfg.dataset, cfg.split)[0]
    views = data.views(cfg.dfs_views)
    chosen = smallest_view_prompts(cfg, tokenizer, cfg.dfs_views, 2 * cfg.dfs_inputs)[::2][:cfg.dfs_inputs]
    for n, (tid, i, pairs) in enumerate(chosen):
        shown = [(k, p, ids) for (k, p), (ids, _) in zip(views, pairs)]
        answer = tasks[tid]["test"][i]["output"]
        row = dict(task=tid, test=i, shape=f"{len(answer)}x{len(answer[0])}",
                   prompt_tokens=int(statistics.median(len(ids) for _, _, ids in shown)))
        for name, _, drafts, speculate, together, merged in DFS_SEARCHES[::1 if n % 2 == 0 else -1]:
            forwarded.clear()
            t0 = time.perf_counter()
            row[name], row[f"{name}_forwards"] = searched_views(models[merged], tokenizer, fmt, tasks[tid], i, shown,
                                                                cfg, drafts, speculate, together)
            row[f"{name}_s"], row[f"{name}_tokens"] = time.perf_counter() - t0, sum(forwarded)
            row[f"{name}_asked"], row[f"{name}_forwards"] = row[f"{name}_forwards"], len(forwarded) - len(shown)
            row[f"{name}_answers"] = sum(map(len, row[name]))
        before, others = row.pop("before"), [row.pop(name) for name, *_ in DFS_SEARCHES[1:]]
        row["same_answers"] = all([[c for c, _ in v] for v in before] == [[c for c, _ in v] for v in after]
                                  for after in others)
        row["max_rel_diff"] = max([abs(a - b) / abs(b) for after in others for vb, va in zip(before, after)
                                   for (_, b), (_, a) in zip(vb, va)], default=0.0)
        rows.append(row)
        print(f"  {tid}:{i} {row['shape']}: " + ", ".join(
            f"{what} {' -> '.join(str(round(row[f'{name}_{what}'], 1)) for name, *_ in DFS_SEARCHES)}"
            for what in ("forwards", "tokens", "s", "answers"))
            + f", largest difference {row['max_rel_diff']:.1e}"
            + ("" if row["same_answers"] else ", NOT the same answers"))
    return dfs_table(cfg, setup, rows)


def dfs_table(cfg, setup, rows):
    """bench_dfs's table: per test input and per view, each search of DFS_SEARCHES against before."""
    n, views = len(rows), cfg.dfs_views
    total = {f"{name}_{what}": sum(r[f"{name}_{what}"] for r in rows) for name, *_ in DFS_SEARCHES
             for what in ("forwards", "tokens", "s", "answers")}
    worst = max(r["max_rel_diff"] for r in rows)
    print(f"\ndfs: {cfg.dfs_run or f'SmolLM2 trained {cfg.dfs_train_steps} steps'} (float32) on {device_name(setup)}, "
          f"{n} {cfg.dataset} {cfg.split} test inputs (answers {', '.join(sorted({r['shape'] for r in rows}))}), "
          f"{views} views, --min-prob {cfg.dfs_min_prob}"
          + (f", answers of at most {cfg.dfs_max_new_tokens} tokens" if cfg.dfs_max_new_tokens else ""))
    print("| search | forward passes / view | tokens forwarded / view | s / test input | answers found | "
          "largest relative nll difference |")
    print("|---|---|---|---|---|---|")
    for name, label, *_ in DFS_SEARCHES:
        print(f"| {label} | {total[f'{name}_forwards'] / n / views:.1f} | {total[f'{name}_tokens'] / n / views:,.0f} | "
              f"{total[f'{name}_s'] / n:.2f} | {total[f'{name}_answers']} | "
              f"{'(reference)' if name == 'before' else f'{worst:.1e}'} |")
    same = all(r["same_answers"] for r in rows)
    ratios = {name: (total["before_forwards"] / max(total[f"{name}_forwards"], 1),
                     total["before_s"] / total[f"{name}_s"]) for name, *_ in DFS_SEARCHES[1:]}
    print("  against before: " + "; ".join(f"{name}: {f:.1f}x fewer forward passes, {t:.1f}x less time"
                                           for name, (f, t) in ratios.items())
          + f"; {'the same' if same else 'NOT the same'} answers{busy_note()}")
    return dict(device=device_name(setup), views=views, min_prob=cfg.dfs_min_prob, same_answers=same,
                speculate=SPECULATE, forwards_ratio=round(ratios[DFS_SEARCHES[-1][0]][0], 2),
                time_ratio=round(ratios[DFS_SEARCHES[-1][0]][1], 2), max_rel_diff=worst,
                ratios={name: [round(f, 2), round(t, 2)] for name, (f, t) in ratios.items()},
                rows=[{k: (round(v, 3) if isinstance(v, float) and k != "max_rel_diff" else v) for k, v in r.items()}
                      for r in rows])


# ----------------------------------------------------------------------------
# vocab: train.py --vocab full against --vocab arc

def vocab_models(name, seed, setup, vocabs=train.VOCABS):
    """{vocab: (model, tokenizer)} for "smollm2" (float32, as train.py loads it on a CPU) or "llama3-8b-2l": Llama-3-8B's
    vocabulary and width with 2 layers and random weights (bf16, as on a GPU), set up as train.py trains them:
    --vocab arc cut, embeddings untied, rsLoRA + embed_tokens/lm_head as full matrices."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    out = {}
    for vocab in vocabs:
        if name == "smollm2":
            model, tokenizer = load_base("smollm2", setup, 8192)
        else:
            spec = {k: v for k, v in ARCHS["llama3-8b"].items() if k != "tokenizer"}
            tokenizer = llama3_hf_tokenizer()
            torch.manual_seed(seed)
            model = LlamaForCausalLM._from_config(
                LlamaConfig(**dict(spec, num_hidden_layers=2), max_position_embeddings=8192,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                dtype=torch.bfloat16)
        model.config.use_cache = False
        fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
        lora = train.Config(vocab=vocab, full_finetune=False, seed=seed)
        model, tokenizer, _ = train.prepare_model(lora, setup, model, tokenizer, fmt)  # cut, untied, rsLoRA
        out[vocab] = model.train().to(setup.device), tokenizer
    return out


def training_state_gb(model):
    """GB held by the weights, their gradients and AdamW's two fp32 moments of every trainable weight."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return (weights + sum(p.numel() * p.element_size() for p in trainable) + 8 * sum(p.numel() for p in trainable)) / 2**30


def adamw(model):
    """The optimizer the vocab section times and measures: AdamW over the trainable weights (train.py's CPU one)."""
    import torch
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def peak_rss_gb(cfg, setup, name, vocab):
    """Peak RSS (GB) of training `vocab`'s model alone on the benchmark's batches, run in a process of its own (on a
    CPU the only way to see each vocabulary's memory apart: a process's peak never falls)."""
    quiet_libraries()
    (model, tok), = vocab_models(name, cfg.seed, setup, [vocab]).values()
    optimizer = adamw(model)
    for batch in train_batches(cfg, tok):
        forward_backward(model, train.batch_collator(tok)(batch), optimizer)
    return peak_memory_gb()[1]


def bench_vocab_model(cfg, setup, name):
    """Trainable parameters, adapter size, memory and training tokens/s (forward, backward and an AdamW step, as
    train.py's CPU path; adamw_8bit on a GPU would keep smaller moments) of --vocab full and arc on the same
    training sequences, timed batch by batch in turn."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    import torch
    gpu = setup.device == "cuda"
    peak_rss = {}
    for vocab in ([] if gpu else train.VOCABS):  # first: this process will hold both models
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            peak_rss[vocab] = round(pool.submit(peak_rss_gb, cfg, setup, name, vocab).result(), 2)
    models = vocab_models(name, cfg.seed, setup)
    batches = {v: train_batches(cfg, tok) for v, (_, tok) in models.items()}
    assert [[len(r["input_ids"]) for r in b] for b in batches["full"]] == \
        [[len(r["input_ids"]) for r in b] for b in batches["arc"]]  # the same text, the same token count
    tokens = sum(len(r["input_ids"]) for b in batches["full"] for r in b)
    out = dict(model=name, device=device_name(setup), batches=len(batches["full"]), batch_size=cfg.train_batch_size,
               tokens=tokens)
    optimizers = {}
    for vocab, (model, tok) in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.suffix == ".safetensors")
        out[vocab] = dict(vocab_size=model.get_input_embeddings().weight.shape[0],
                          trainable_params=count_params(model)[0], adapter_mb=round(size / 2**20, 2),
                          training_state_gb=round(training_state_gb(model), 3), seconds=0.0,
                          peak_gb=peak_rss.get(vocab, 0.0))
        optimizers[vocab] = adamw(model)
        forward_backward(model, train.batch_collator(tok)(batches[vocab][0]), optimizers[vocab])  # warm-up
    for i in range(len(batches["full"])):
        for vocab in (train.VOCABS if i % 2 == 0 else train.VOCABS[::-1]):
            model, tok = models[vocab]
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            out[vocab]["seconds"] += forward_backward(model, train.batch_collator(tok)(batches[vocab][i]),
                                                      optimizers[vocab])[1]
            if gpu:
                out[vocab]["peak_gb"] = round(max(out[vocab]["peak_gb"], peak_memory_gb()[1]), 2)
    print(f"vocab: {name} on {device_name(setup)}; {out['batches']} batches of {cfg.train_batch_size} arc1 train "
          f"sequences, {tokens:,} tokens, forward + backward + AdamW step")
    for vocab in train.VOCABS:
        r = out[vocab]
        r["tok_s"] = round(tokens / r["seconds"], 1)
        memory = f", peak {'GPU' if gpu else 'RSS, a process of its own,'} {r['peak_gb']:.2f} GB"
        print(f"  {vocab:<4} {r['vocab_size']:>7,} tokens  {r['trainable_params'] / 1e6:>8.2f}M trainable  adapter "
              f"{r['adapter_mb']:>8.2f} MB  weights+grads+AdamW {r['training_state_gb']:>6.2f} GB  {r['tok_s']:>8.1f} "
              f"tok/s{memory}")
    out["arc_over_full_tok_s"] = round(out["arc"]["tok_s"] / out["full"]["tok_s"], 2)
    out["full_over_arc_adapter"] = round(out["full"]["adapter_mb"] / out["arc"]["adapter_mb"], 1)
    if not gpu:
        out["peak_rss_gb"] = round(peak_memory_gb()[1], 2)
    print(f"  arc / full tokens/s {out['arc_over_full_tok_s']:.2f}x, adapter full / arc {out['full_over_arc_adapter']}x"
          f"{busy_note()}")
    del models
    return out


def bench_vocab(cfg, setup):
    """--vocab full against arc: the training figures for SmolLM2 and the 8B-shaped 2-layer model, then SmolLM2
    trained each of cfg.vocab_steps step counts with each vocabulary on the colour-mapping family
    (data.colour_family, same seed) and scored on cfg.vocab_tasks held-out tasks, through train.main and infer.main."""
    import tempfile
    if not all(n.isdigit() for n in cfg.vocab_steps):
        raise SystemExit(f"error: --vocab-steps {' '.join(cfg.vocab_steps)}: give step counts (0: none)")
    steps = [int(n) for n in cfg.vocab_steps if int(n) > 0]
    out = {name: bench_vocab_model(cfg, setup, name) for name in cfg.vocab_models}
    if not steps:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        family = Path(tmp) / "family"  # 200 train tasks and --vocab-tasks eval tasks of data.colour_family, seed 1
        for split, tasks in data.colour_family(200, cfg.vocab_tasks, seed=1).items():
            for tid, task in tasks.items():
                write_json(family / split / f"{tid}.json", task)
        out["family"] = []
        for n in steps:
            for vocab in train.VOCABS:
                run = Path(tmp) / f"{vocab}-{n}"
                t0 = time.time()
                # --loss answer: the vocabularies compared on the loss README's figures were measured with
                train.main(["--model", "smollm2", "--vocab", vocab, "--loss", "answer", "--dataset", str(family),
                            "--max-steps", str(n),
                            "--lr", str(cfg.vocab_lr), "--batch-size", "4", "--grad-accum", "1", "--max-seq-len", "512",
                            "--logging-steps", "10", "--seed", str(cfg.seed), "--out", str(run)])
                seconds = time.time() - t0
                infer.main(["--model", str(run), "--dataset", str(family), "--split", "eval", "--seed", str(cfg.seed)])
                summary = json.loads((run / "config.json").read_text())["summary"]
                r = json.loads((run / "results.json").read_text())
                out["family"].append(dict(vocab=vocab, steps=summary["steps"], train_s=round(seconds),
                                          tok_s=summary["tokens_per_second"], train_loss=summary["train_loss"],
                                          solved=r["solved_any"], tasks=r["tasks"]))
    print(f"\nvocab: SmolLM2 LoRA on the colour-mapping family, 4 sequences a step, lr {cfg.vocab_lr:g}, "
          f"{cfg.vocab_tasks} held-out tasks")
    for f in out["family"]:
        print(f"  {f['vocab']:<4} {f['steps']:>4} steps  train {f['train_s']:>4} s ({f['tok_s']} tok/s), loss "
              f"{f['train_loss']:.4f}, solved {f['solved']} / {f['tasks']}")
    return out


# ----------------------------------------------------------------------------
# loss: train.py --loss answer against --loss outputs

def bench_loss(cfg, setup):
    """--loss answer against outputs: each model trained each step count x seed with both, on --dataset family
    (data.colour_family's 300 tasks), and scored on its 30 held-out tasks, through train.main and infer.main. The
    two losses train on the same sequences in the same order, so tokens/s should not differ."""
    import tempfile
    counts = [cfg.loss_steps, cfg.loss_seeds]
    positive = all(n.isdigit() and int(n) > 0 for c in counts for n in c)
    if not positive or not set(cfg.loss_models) <= {"tiny", "smollm2"}:
        raise SystemExit("error: --loss-steps and --loss-seeds take positive integers, --loss-models tiny and/or "
                         "smollm2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in cfg.loss_models:
            flags = ["--model", model] + (["--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3",
                                           "--max-seq-len", "512"] if model == "smollm2" else [])
            for seed in cfg.loss_seeds:
                for n in cfg.loss_steps:
                    for loss in LOSSES:
                        run = Path(tmp) / f"{model}-{seed}-{n}-{loss}"
                        t0 = time.time()
                        train.main(["--dataset", data.FAMILY, "--loss", loss, "--max-steps", n, "--seed", seed,
                                    "--logging-steps", "50", "--out", str(run)] + flags)
                        seconds = time.time() - t0
                        infer.main(["--model", str(run), "--dataset", data.FAMILY, "--split", "eval", "--seed", seed])
                        summary = json.loads((run / "config.json").read_text())["summary"]
                        r = json.loads((run / "results.json").read_text())
                        rows.append(dict(model=model, seed=int(seed), steps=summary["steps"], loss=loss,
                                         train_s=round(seconds), tok_s=summary["tokens_per_second"],
                                         train_loss=summary["train_loss"], solved=r["solved_any"], tasks=r["tasks"]))
                        shutil.rmtree(run)
    print(f"\nloss: --loss answer vs outputs on --dataset family, held-out tasks solved (any guess) per seed "
          f"{', '.join(cfg.loss_seeds)}; tok/s is train.py's own{busy_note()}")
    print("| model | steps | answer: solved | answer: tok/s | outputs: solved | outputs: tok/s |")
    print("|---|---|---|---|---|---|")
    for model in cfg.loss_models:
        for n in cfg.loss_steps:
            cell = {loss: [r for r in rows if r["model"] == model and r["steps"] == int(n) and r["loss"] == loss]
                    for loss in LOSSES}
            shown = {loss: (", ".join(f"{r['solved']}" for r in rs) + f" / {rs[0]['tasks']}",
                            round(statistics.mean(r["tok_s"] for r in rs))) for loss, rs in cell.items()}
            print(f"| {model} | {n} | {shown['answer'][0]} | {shown['answer'][1]} | {shown['outputs'][0]} | "
                  f"{shown['outputs'][1]} |")
    return dict(rows=rows)


SECTIONS = {"data": bench_data, "train": bench_train, "generate": bench_generate, "estimate": bench_estimate,
            "modes": bench_modes, "vocab": bench_vocab, "loss": bench_loss, "scoring": bench_scoring,
            "dfsbatch": bench_dfsbatch, "dfs": bench_dfs}


def main(argv=None):
    cfg = parse_config(Config, "Benchmarks of data rendering, training, generation, and the estimate they give.",
                            argv)
    quiet_libraries()
    line_buffered()
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: --sections {' '.join(unknown)}: unknown; choose from {', '.join(SECTIONS)}")
    try:
        check_writable(Path(cfg.out).absolute().parent)  # before minutes of measuring
        # a GPU that torch cannot use stops here; bench measures transformers + peft, as train.py's CPU path
        setup = make_setup(cfg.device, "transformers")
        record = dict(machine=machine(setup), config=dataclasses.asdict(cfg))
        print(f"machine: {record['machine']['host']}, {record['machine']['cpu_count']} CPUs, "
              f"{record['machine']['device']}; torch {record['machine']['versions'].get('torch')}, "
              f"transformers {record['machine']['versions'].get('transformers')}")
        for name in cfg.sections:
            t0 = time.perf_counter()
            record[name] = SECTIONS[name](cfg, setup)
            record[name]["section_s"] = round(time.perf_counter() - t0, 1)
            write_json(cfg.out, record)  # after every section: the estimate reads it, a stopped run keeps it
    except OneLineError as e:
        sys.exit(f"error: {e}")
    print(f"record: {cfg.out}")
    return record


if __name__ == "__main__":
    run_command(main)
