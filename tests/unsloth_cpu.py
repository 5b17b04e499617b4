"""Our Unsloth path on a CPU, for the tests: train.py / infer.py run in a process of their own with Unsloth's CPU
switches, a few monkeypatches and torch stand-ins for three per-row Triton kernels (docs/unsloth-cpu.md has
the Unsloth line behind each). The scripts' own main() runs unchanged; `--backend unsloth` picks the branch.

    python tests/unsloth_cpu.py train --backend unsloth --model FOLDER ...     # train.main(...)
    python tests/unsloth_cpu.py infer --backend unsloth --model RUN ...        # infer.main(...)
    python tests/unsloth_cpu.py grads OUT.pt MODEL DATASET                     # loss + gradients, each --vocab
    python tests/unsloth_cpu.py reference OUT.pt MODEL DATASET STATE.pt        # the same, transformers + peft
    python tests/unsloth_cpu.py scores OUT.json RUN DATASET [FLAGS]            # infer.main(FLAGS), then cached
                                                                               # scores and dfs vs full forward

Only tests import this module; `run()` starts the subprocess. A same-process comparison would be meaningless:
`import unsloth` patches transformers' Llama classes for the whole process, so `reference` asserts it never
imported unsloth.
"""
import importlib.abc
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
import decode
import models
import runs

ROOT = Path(__file__).resolve().parent.parent
SWITCHES = {"UNSLOTH_ALLOW_CPU": "1",  # Unsloth's test-only switch: its GPU path on a CPU
            "TRITON_INTERPRET": "1",  # Triton's CPU interpreter for the kernels not replaced below
            "UNSLOTH_DISABLE_PINNED_MEMORY": "1",  # pinned host buffers need a driver
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
PLAIN = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
SHARPER, DFS_MIN_PROB = 2.0, 0.005  # `scores`: the head's logits doubled, a completion of 2 tokens lies above it


def available():
    return importlib.util.find_spec("unsloth") is not None


def run(mode, *args, timeout=600, cwd=None, env=None):
    """CompletedProcess of `python tests/unsloth_cpu.py mode args` (stdout and stderr together in .stdout), with
    the switches and `env` added to this process's environment."""
    env = {**{k: v for k, v in os.environ.items() if k not in SWITCHES}, **(env or {})}
    env.update(PLAIN if mode == "reference" else SWITCHES)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, __file__, mode, *map(str, args)], env=env, cwd=cwd or ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


# ----------------------------------------------------------------------------
# inside the subprocess: patches before and after `import unsloth`, whoever imports it first

def patch_before():
    """What Unsloth asks of the GPU before it has one: its device statistics (device_type.py:411)."""
    import types
    import torch
    props = types.SimpleNamespace(name="CPU (UNSLOTH_ALLOW_CPU)", total_memory=16 * 2**30, major=8, minor=0,
                                  multi_processor_count=1)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_name = lambda *a, **k: props.name


def patch_after():
    """Modules and RoPE caches on the CPU, and three kernels in torch (same math; the interpreter runs ~20 ms per
    Triton program instance, a forward of the tiny model would take a minute)."""
    import torch
    import unsloth.kernels.fast_lora as fast_lora
    import unsloth.kernels.rms_layernorm as rms
    import unsloth.models.llama as llama
    from unsloth.kernels.swiglu import _DWf_DW_dfg_traced
    llama.DEVICE_TYPE_TORCH, llama.DEVICE_COUNT = "cpu", 1
    llama.get_current_device = lambda: "cpu"
    cache = llama._PerDeviceRopeCache
    ensure = cache._ensure_rope_cache
    cache._ensure_rope_cache = lambda self, index: ensure(self, 0 if index is None else index)

    class OnCpu(list):  # per-GPU cache lists indexed by device.index, which is None for the CPU
        __getitem__ = lambda self, i: list.__getitem__(self, 0 if i is None else i)  # noqa: E731
        __setitem__ = lambda self, i, v: list.__setitem__(self, 0 if i is None else i, v)  # noqa: E731

    def build(self, index):
        self.multi_gpu_cos_cached, self.multi_gpu_sin_cached = map(OnCpu, (self.multi_gpu_cos_cached,
                                                                           self.multi_gpu_sin_cached))
        size = self.current_rope_size
        self._set_cos_sin_cache(seq_len=self._rope_cache_rows(), device=torch.device("cpu"),
                                dtype=self._rope_cache_dtype)
        self.current_rope_size = size
        self._rope_cache_versions[index] = self._rope_cache_version
    cache._build_rope_cache = build

    def rope(Q, K, cos, sin, position_ids=None):
        cos, sin = cos.squeeze(), sin.squeeze()
        cos, sin = (cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)) if position_ids is not None \
            else (cos[:Q.shape[2]], sin[:Q.shape[2]])
        half = Q.shape[-1] // 2
        turn = lambda x: torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # noqa: E731
        return Q * cos + turn(Q) * sin, K * cos + turn(K) * sin

    def rms_norm(layernorm, X, gemma=False, *args, **kwargs):
        W = layernorm.weight
        eps = getattr(layernorm, "variance_epsilon", getattr(layernorm, "eps", 1e-6))
        Xf = X.float()
        Y = (Xf * torch.rsqrt(Xf.pow(2).mean(-1, keepdim=True) + eps)).to(W.dtype)
        return Y * (1 + W) if gemma else Y * W

    def swiglu(e, g):
        ef = e.float()
        return (ef * torch.sigmoid(ef)).to(g.dtype) * g

    llama.fast_rope_embedding = rope
    llama.fast_rms_layernorm = rms.fast_rms_layernorm = rms_norm
    fast_lora.swiglu_fg_kernel = swiglu
    fast_lora.swiglu_DWf_DW_dfg_kernel = _DWf_DW_dfg_traced
    patch_4bit()


def patch_4bit():
    """Unsloth's 4-bit path on the CPU: its loader told that bitsandbytes can load (its probe asks for the CUDA
    kernels, unsloth/device_type.py:166), and its dequantize and decode matmul of a 4-bit weight done by
    bitsandbytes' own CPU dequantize (Unsloth calls the CUDA kernels through ctypes, unsloth/kernels/utils.py:272)."""
    import torch
    import bitsandbytes.functional as bnb
    import unsloth.kernels.utils as kernels
    import unsloth.models.loader as loader

    def dequantize(W, quant_state=None, out=None, use_global_buffer=False):
        if quant_state is None:
            return W
        flipped = W.shape[0] == 1  # Unsloth passes W.t() and takes the weight back transposed
        full = bnb.dequantize_4bit(W.t() if flipped else W, quant_state).to(quant_state.dtype)
        return full.t() if flipped else full
    loader.ALLOW_BITSANDBYTES = True
    kernels._fast_dequantize_bnb = dequantize
    kernels._fast_gemv_bnb = lambda X, W, quant_state, out=None: torch.matmul(X, dequantize(W, quant_state).t())
    kernels._USE_NF4_KERNELS = False  # its Triton NF4 kernels: the interpreter would take minutes


class AfterUnsloth(importlib.abc.MetaPathFinder):
    """Runs patch_after() as soon as `import unsloth` finishes, wherever our scripts import it: the scripts keep
    their own import order (train.py must import unsloth before transformers, and the test checks it does)."""

    def find_spec(self, name, path, target=None):
        if name != "unsloth":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch_after()
        spec.loader.exec_module = exec_module
        return spec


def model_and_rows(model_folder, dataset, backend, vocab):
    """(cfg, model, tokenizer, rows): the model as train.py loads it for `backend` with --vocab `vocab` (cut, then
    untied), and four training sequences of `dataset` as train.py tokenizes them: {--loss: rows}."""
    import dataclasses
    import data
    import train
    cfg = train.Config(model=model_folder, dataset=[dataset], views=1, max_seq_len=512, load_in_4bit=False,
                       full_finetune=False, epochs=1, vocab=vocab)
    setup = models.make_setup("auto", backend)
    model, tokenizer = models.load_base(cfg.model, setup, cfg.max_seq_len, cfg.load_in_4bit, cfg.full_finetune)
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    if vocab == "arc":
        tokenizer, _ = models.arc_vocabulary(model, tokenizer, fmt)
    models.untie_embeddings(model)
    tasks, _ = data.read_sets(cfg.dataset, cfg.split)
    rows = {}
    for loss in models.LOSSES:
        ds, _, _ = train.training_data(dataclasses.replace(cfg, loss=loss), tasks, tokenizer, fmt)
        rows[loss] = [ds[i] for i in range(4)]
    return cfg, model, tokenizer, rows


def loss_and_grads(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return float(loss), grads


def grads(out, model_folder, dataset):
    """Per --vocab: Unsloth's loss and gradients on one padded batch, after the LoRA B matrices are set to random
    values (at their start, zero, every lora_A gradient would be zero too), saved with those weights and the batch
    for `reference`; its loss on the same rows packed (train.py's collators); and with --loss outputs' labels, its
    loss padded and packed."""
    import torch
    import train
    saved = {}
    for vocab in train.VOCABS:
        cfg, model, tokenizer, by_loss = model_and_rows(model_folder, dataset, "unsloth", vocab)
        rows = by_loss["answer"]
        model = models.add_lora(model, cfg, "unsloth")
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        state = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        padded, packed = train.collate(models.pad_id(tokenizer))(rows), train.packed_collate("unsloth")(rows)
        loss, g = loss_and_grads(model, padded)
        packed_loss, _ = loss_and_grads(model, packed)
        unbounded = {k: v for k, v in packed.items() if k != "packed_seq_lengths"}  # position_ids only
        unbounded_loss, _ = loss_and_grads(model, unbounded)
        outputs_batch = train.collate(models.pad_id(tokenizer))(by_loss["outputs"])
        outputs_loss, _ = loss_and_grads(model, outputs_batch)
        outputs_packed_loss, _ = loss_and_grads(model, train.packed_collate("unsloth")(by_loss["outputs"]))
        saved[vocab] = dict(loss=loss, grads=g, packed_loss=packed_loss, unbounded_loss=unbounded_loss, state=state,
                            batch=padded, outputs_batch=outputs_batch, outputs_loss=outputs_loss,
                            outputs_packed_loss=outputs_packed_loss, dtype=str(next(model.parameters()).dtype),
                            vocab_size=model.get_input_embeddings().weight.shape[0])
    torch.save(saved, out)


def reference(out, model_folder, dataset, state_file):
    """The same losses and gradients through transformers + peft in float32, in a process without unsloth."""
    import torch
    import train
    saved, result = torch.load(state_file, weights_only=False), {}
    for vocab in train.VOCABS:
        cfg, model, _, _ = model_and_rows(model_folder, dataset, "transformers", vocab)
        model = models.add_lora(model.float(), cfg, "transformers")
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names == set(saved[vocab]["state"]), sorted(names ^ set(saved[vocab]["state"]))[:6]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names:
                    p.copy_(saved[vocab]["state"][n])
        loss, g = loss_and_grads(model, saved[vocab]["batch"])
        outputs_loss, _ = loss_and_grads(model, saved[vocab]["outputs_batch"])
        result[vocab] = dict(loss=loss, grads=g, outputs_loss=outputs_loss,
                             vocab_size=model.get_input_embeddings().weight.shape[0])
    assert "unsloth" not in sys.modules, "the reference imported unsloth: it would run Unsloth's patched code"
    torch.save(result, out)


def scores(out, run_folder, dataset, *flags):
    """infer.main(flags) when given (in its own import order; one import of Unsloth serves both), then a trained
    run loaded as infer.py loads it on Unsloth, its head SHARPER, scoring candidates (the answer, its transpose, a
    near miss, and a two-token completion) of its --split eval tasks under 2 views with the prefix cache
    (decode.completion_logprobs) and with a full forward per pair (bench.full_forward_logprobs); and
    decode.dfs_search on one prompt, each completion's nll beside its full-forward score, the scores from the caches
    the search kept, the search again with its longest completion as a draft, and with wrong drafts, drafts longer
    than any answer or off the format, and every answer as a draft. Written as json."""
    import json
    import random
    import bench
    import data
    import infer
    if flags:
        infer.main(list(flags))
    import torch
    setup = models.make_setup("auto", "unsloth")
    run = runs.read_run(run_folder)
    model, tokenizer = models.load_model(run, setup)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name:
                p.mul_(SHARPER)
    fmt = run.format or data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    tasks, _ = data.load_tasks(dataset, "eval")
    views = data.views(2)
    prompts, _ = infer.build_prompts(tasks, tokenizer, fmt, run.max_seq_len, views, writeup=False)
    allowed, eos = decode.answer_ids(tokenizer, fmt), tokenizer.eos_token_id
    encode = lambda g, v: models.encode_completion(  # noqa: E731
        tokenizer, data.format_completion(data.apply_view(g, *views[v]), fmt))
    rng, pairs = random.Random(0), []
    for p in prompts:
        grids = bench.scoring_candidates(tasks[p["task_id"]]["test"][p["test"]]["output"], 3, rng)
        pairs += [(p["ids"], encode(g, p["view"])) for g in grids] + [(p["ids"], [allowed[0], eos])]
    prompt_ids, completion_ids = [p for p, _ in pairs], [c for _, c in pairs]
    result = dict(dtype=str(next(model.parameters()).dtype), lengths=list(map(len, completion_ids)),
                  cached=decode.completion_logprobs(model, tokenizer, prompt_ids, completion_ids, 4),
                  full=bench.full_forward_logprobs(model, tokenizer, prompt_ids, completion_ids, 4))
    ids, prefixes = prompts[0]["ids"], {}
    found, finished, forwards = decode.dfs_search(model, ids, eos, 12, DFS_MIN_PROB, allowed, keep=prefixes)
    completions = [tokens + [eos] for tokens, _ in found]
    longest = max((t for t, _ in found), key=len)
    outside = next(t for t in range(len(tokenizer)) if t not in allowed)  # a token the format never writes
    again = decode.dfs_search(model, ids, eos, 12, DFS_MIN_PROB, allowed, drafts=[longest])
    drafted = [decode.dfs_search(model, ids, eos, 12, DFS_MIN_PROB, allowed, drafts=d) for d in (
        [longest[::-1] + longest * 3, [outside] + longest],  # wrong, longer than any answer, off the format
        [longest[:1] + [outside] + longest[1:], *[t for t, _ in found][::-1]])]  # every answer, shortest first
    result["dfs"] = dict(found=found, finished=finished, forwards=forwards, kept=len(prefixes), again=again[0],
                         again_forwards=again[2], drafted=[d[0] for d in drafted],
                         full=bench.full_forward_logprobs(model, tokenizer, [ids] * len(found), completions, 4),
                         from_search=decode.completion_logprobs(model, tokenizer, [ids] * len(found), completions, 4,
                                                               prefixes=prefixes))
    Path(out).write_text(json.dumps(result))


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "reference":
        return reference(*args)
    assert os.environ.get("UNSLOTH_ALLOW_CPU") == "1", "run through tests/unsloth_cpu.py run()"
    patch_before()
    sys.meta_path.insert(0, AfterUnsloth())
    if mode == "grads":
        assert __import__("train").import_unsloth("cpu") is None  # before transformers, as train.py does
        return grads(*args)
    if mode == "scores":
        return scores(*args)
    script = __import__(mode)  # train or infer: its own main(), its own import order
    return script.main(args)


if __name__ == "__main__":
    main()
