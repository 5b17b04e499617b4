"""--load-in-4bit on the transformers path: the write-up's GPU recipe in small on the CPU. A 2-layer Llama with the
real Llama-3 tokenizer, its projections loaded in 4 bits (bitsandbytes nf4, QLoRA's), --vocab arc cutting the
128,256 tokens, rsLoRA + embed_tokens/lm_head trained, resumed, merged (the dequantized base + LoRA, in 16 bits),
and infer.py on the adapter and on the merged folder. A 16-bit load where 4 bits were asked stops the run.

    python -m pytest tests/test_fourbit.py -q
"""
import contextlib
import dataclasses
import io
import json

import bitsandbytes
import pytest
import torch
from safetensors.torch import load_file

import cli
import hub
import infer
import models
import runs
import train
from conftest import answer_logits, cpu_setup, trained_tensors, write_family

STEPS = 3  # trained 2 steps, checkpointed, then resumed to 3


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), n_train=4, n_eval=3, seed=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A Llama-3-shaped model folder, 2 layers of hidden size 64, random weights in fp32, the real tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = models.llama3_hf_tokenizer()
    models.tiny_model(tokenizer, hidden=64, layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def printed(fn, *args):
    """(what fn returned, what it printed)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fn(*args)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def run(base, family, tmp_path_factory):
    """The run: 2 steps in 4 bits with a checkpoint, resumed to 3 with --merge, at a constant learning rate (a
    schedule set for 2 steps would give the resumed step none). The models train.main trained, and the lines it
    printed, are kept."""
    out = tmp_path_factory.mktemp("runs") / "run"
    common = ["--model", str(base), "--dataset", str(family), "--load-in-4bit", "--vocab", "arc", "--max-seq-len",
              "512", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--scheduler", "constant", "--warmup", "0", "--save-steps", "2",
              "--logging-steps", "1", "--out", str(out)]
    (first, _), first_lines = printed(train.main, common + ["--max-steps", "2"])
    (resumed, _), resumed_lines = printed(train.main, common + ["--max-steps", str(STEPS), "--resume", "--merge"])
    return out, (first, resumed), first_lines + resumed_lines


def projections(model):
    return [m for name, m in model.named_modules() if name.split(".")[-1] in models.PROJECTIONS]


def test_projections_train_as_4bit_layers_and_the_lines_say_so(run):
    out, trained, lines = run
    for model in trained:  # the first run and the resumed one
        layers = projections(model)
        assert len(layers) == 2 * len(models.PROJECTIONS)
        for layer in layers:  # peft's LoRA around bitsandbytes' 4-bit layer, nothing in 16 bits
            assert isinstance(layer.base_layer, bitsandbytes.nn.Linear4bit), type(layer.base_layer)
            assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    model_lines = [line for line in lines.splitlines() if line.startswith("model: ")]
    assert len(model_lines) == 2 and all("4-bit (bitsandbytes, 14 Linear4bit layers" in x for x in model_lines)
    assert "vocab arc" in model_lines[0] and "of 128,256 tokens kept" in lines
    assert runs.read_run(out).load_in_4bit is True
    info = json.loads((out / "config.json").read_text())
    assert info["summary"]["steps"] == STEPS and info["summary"]["resumed_from"] == STEPS - 1


def test_embeddings_and_every_lora_factor_moved(run, base):
    out, _, _ = run
    trained = trained_tensors(out / "final")
    before = trained_tensors(out / "checkpoints" / f"checkpoint-{STEPS - 1}")
    assert trained.keys() == before.keys()
    assert sum("lora_A" in k for k in trained) == sum("lora_B" in k for k in trained) == 2 * len(models.PROJECTIONS)
    assert len(trained) == 4 * len(models.PROJECTIONS) + len(models.EMBEDDINGS)
    for key, value in trained.items():  # every trained tensor moved in the resumed step
        assert not torch.equal(value, before[key]), key
    keep = runs.read_run(out).keep_ids
    start = load_file(base / "model.safetensors")
    for name, weight in (("embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        embedding = next(v for k, v in trained.items() if name in k)
        assert embedding.shape == (len(keep), 64) and not torch.allclose(embedding, start[weight][keep])
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # zero at the start


def test_merged_16bit_model_agrees_with_the_4bit_adapter(run, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _, _ = run
    config = json.loads((out / "merged" / "config.json").read_text())
    # dequantized, in the dtype the run computed in: fp32 here on a CPU (bf16 or fp16 on a GPU), never 4 bits
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert models.quantized_layers(merged) == 0
    adapter, tokenizer = models.load_model(runs.read_run(out), cpu_setup())
    assert models.quantized_layers(adapter) == 2 * len(models.PROJECTIONS)  # the LoRA stays on the 4 bits, unmerged
    assert any("lora_" in name for name, _ in adapter.named_modules())
    for split in ("train", "eval"):  # the run's prompts and answers, and held-out ones
        ids, trained = answer_logits(adapter, tokenizer, family, split)
        merged_ids, reloaded = answer_logits(merged, AutoTokenizer.from_pretrained(out / "merged"), family, split)
        assert torch.equal(ids, merged_ids)
        agree = (trained.argmax(-1) == reloaded.argmax(-1)).float().mean().item()
        assert agree >= 0.99, (split, agree)


@pytest.mark.parametrize("folder", ["run", "merged"])
def test_infer_predicts_from_the_adapter_on_4_bits_and_from_the_merged_folder(run, family, folder):
    out, _, _ = run
    model = out if folder == "run" else out / "merged"
    submission = out / f"infer-{folder}" / "submission.json"
    _, lines = printed(infer.main, ["--model", str(model), "--dataset", str(family), "--split", "eval",
                                    "--temperature", "0", "--max-new-tokens", "24", "--out", str(submission)])
    weights = next(line for line in lines.splitlines() if line.startswith("weights: "))
    assert ("4-bit (bitsandbytes, 14 Linear4bit layers" in weights) == (folder == "run"), weights
    assert ", merged" not in weights  # a 4-bit base keeps its adapter on top
    results = json.loads(infer.paths(submission)[2].read_text())
    assert results["tasks"] == 3 and sum(results["guess_status"].values()) == 2 * 3
    assert len(json.loads(submission.read_text())) == 3


def test_a_16bit_load_under_load_in_4bit_stops_in_one_line(base, monkeypatch):
    monkeypatch.setattr(models, "quantization", lambda setup: None)  # the 4-bit setting lost on the way
    with pytest.raises(cli.OneLineError, match="loaded no layer in 4 bits"):
        models.load_base(str(base), cpu_setup(), load_in_4bit=True)


@pytest.mark.parametrize("flags, why", [(["--model", "tiny"], "the tiny model is built from a config"),
                                        (["--full-finetune"], "a full fine-tune trains every weight itself")])
def test_load_in_4bit_where_nothing_is_loaded_under_a_lora_is_refused(base, family, tmp_path, flags, why):
    argv = ["--model", str(base), "--dataset", str(family), "--load-in-4bit", "--out", str(tmp_path / "r")] + flags
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert str(e.value) == f"error: --load-in-4bit: {why}, not 4-bit layers under a LoRA; drop it"


def test_bench_weight_bytes_equal_what_a_4bit_load_holds(base):
    """bench.py's memory figure for the recipe: the bytes of a 4-bit load counted from the shape alone equal the
    bytes the loaded model holds (its weights, and the scales each 4-bit weight keeps in its quant_state)."""
    import bench
    model, _ = models.load_base(str(base), cpu_setup(), load_in_4bit=True)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if state is not None:
            held += sum(t.numel() * t.element_size() for t in (state.absmax, state.offset, state.state2.absmax))
    spec = json.loads((base / "config.json").read_text())
    assert held == bench.weight_bytes(spec, True, dtype_bytes=4)  # fp32 here: the CPU's dtype
    assert bench.weight_bytes(spec, False, dtype_bytes=4) == sum(p.numel() * 4 for p in models.tiny_model(
        models.llama3_hf_tokenizer(), hidden=64, layers=2).parameters())


def test_test_time_training_starts_from_the_4bit_run_merged_into_its_dequantized_base(run, family, tmp_path):
    out, _, _ = run
    ttt = tmp_path / "ttt"
    _, lines = printed(train.main, ["--ttt", "--model", str(out), "--dataset", str(family), "--split", "eval",
                                    "--out", str(ttt), "--epochs", "1", "--ttt-views", "1", "--batch-size", "2",
                                    "--grad-accum", "1", "--limit-tasks", "1"])
    assert "auto: " in lines and "load_in_4bit False" in lines
    assert "4-bit" not in next(line for line in lines.splitlines() if line.startswith("model: "))
    assert runs.read_run(ttt).load_in_4bit is False and len(list((ttt / "ttt").iterdir())) == 1
    with pytest.raises(SystemExit, match="--load-in-4bit: --ttt trains on its run's model, merged in 16 bits"):
        train.main(["--ttt", "--model", str(out), "--dataset", str(family), "--split", "eval", "--load-in-4bit",
                    "--out", str(tmp_path / "refused")])


@pytest.fixture(scope="module")
def saved_in_4bit(base, tmp_path_factory):
    """The base as unsloth/*-bnb-4bit repos are: saved in 4 bits, its config.json naming the quantization."""
    folder = tmp_path_factory.mktemp("base-bnb-4bit")
    model, tokenizer = models.load_base(str(base), cpu_setup(), load_in_4bit=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    return folder


def test_a_base_saved_in_4bits_loads_in_4bits_on_auto_and_no_load_in_4bit_is_refused(saved_in_4bit, family,
                                                                                    tmp_path):
    """On a CPU the recipe's auto is 16 bits, but a base saved in 4 bits loads only so (transformers): auto says 4
    bits and the run records them; --no-load-in-4bit, or a full fine-tune of it, stops in one line naming the
    16-bit base, before anything is trained or written."""
    out = tmp_path / "r"
    common = ["--model", str(saved_in_4bit), "--dataset", str(family), "--vocab", "arc", "--max-seq-len", "512",
              "--batch-size", "4", "--grad-accum", "1"]
    (model, _), lines = printed(train.main, common + ["--max-steps", "1", "--out", str(out)])
    assert "load_in_4bit True" in lines and "4-bit (bitsandbytes" in lines, lines
    assert projections(model) and all(isinstance(m.base_layer, bitsandbytes.nn.Linear4bit)
                                      for m in projections(model))
    assert runs.read_run(out).load_in_4bit
    for flags in (["--no-load-in-4bit"], ["--full-finetune"]):
        with pytest.raises(SystemExit) as e:
            train.main(common + flags + ["--out", str(tmp_path / "refused")])
        assert str(e.value).startswith(f"error: --model {saved_in_4bit} is saved in 4 bits: ") and \
            "name its 16-bit base instead" in str(e.value) and not (tmp_path / "refused").exists(), str(e.value)


@pytest.mark.parametrize("flags, model, four", [([], hub.GPU_MODEL, True), (["--full-finetune"], hub.GPU_MODEL_16BIT,
                                                                              False)])
def test_the_auto_gpu_model_is_the_4bit_one_and_a_full_finetune_takes_its_16bit_repo(flags, model, four, capsys):
    """On a GPU, auto picks the write-up's Llama-3-8B saved in 4 bits for a LoRA, and its 16-bit repo for a full
    fine-tune (4-bit weights cannot be trained themselves): no refusal for a command that names no model."""
    cfg = train.resolve(dataclasses.replace(cli.parse_config(train.Config, "", flags), out="x"), set(), gpu=True)
    assert (cfg.model, cfg.load_in_4bit) == (model, four)
    assert f"auto: model {model} (GPU found)" in capsys.readouterr().out
