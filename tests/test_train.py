import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import data
import decode
import hub
import models
import recipes
import runs
import train
from conftest import cpu_setup, write_family


@pytest.mark.parametrize("make_tokenizer", [models.tiny_tokenizer, models.llama3_hf_tokenizer])
def test_label_mask_covers_exactly_the_prompt(make_tokenizer):
    tokenizer = make_tokenizer()
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    tasks = data.load_tasks("arc1", "train")[0]
    tasks = {tid: tasks[tid] for tid in sorted(tasks)[:3]}
    ds, _ = data.build_dataset(tasks, fmt, symmetries=range(2))
    tokenized, over = train.tokenize(ds, tokenizer, 100_000)
    assert over == 0 and len(tokenized) == len(ds)
    for row, prompt, completion in zip(tokenized, ds["prompt"], ds["completion"]):
        n = len(models.encode_prompt(tokenizer, prompt))
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert row["labels"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["labels"][n:-1]) == completion
    batch = train.collate(models.pad_id(tokenizer))([tokenized[0], tokenized[1]])
    short = min(len(tokenized[0]["input_ids"]), len(tokenized[1]["input_ids"]))
    width = batch["input_ids"].shape[1]
    row = 0 if len(tokenized[0]["input_ids"]) == short else 1
    assert batch["attention_mask"][row].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][row, short:].tolist() == [-100] * (width - short)


def test_tokenize_drops_and_counts_rows_over_max_seq_len():
    tokenizer = models.tiny_tokenizer()
    tasks = data.load_tasks("arc1", "train")[0]
    ds, _ = data.build_dataset({tid: tasks[tid] for tid in sorted(tasks)[:4]}, "digits", symmetries=[0])
    lengths = [len(r["input_ids"]) for r in train.tokenize(ds, tokenizer, 100_000)[0]]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, over = train.tokenize(ds, tokenizer, limit)
    assert over == sum(n > limit for n in lengths) > 0
    assert max(kept["length"]) <= limit and len(kept) + over == len(ds)


@pytest.fixture(scope="module")
def lora_run(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    model, run = train.main(["--dataset", str(family), "--split", "train", "--no-full-finetune", "--max-steps", "6",
                             "--lr", "1e-2", "--batch-size", "4", "--out", str(out), "--logging-steps", "1", "--merge"])
    return model, run


def test_lora_config_is_the_write_ups(lora_run):
    model, run = lora_run
    config = model.peft_config["default"]
    assert config.use_rslora and config.r == 16 and config.lora_alpha == 16 and config.lora_dropout == 0
    assert set(config.target_modules) == set(models.PROJECTIONS)
    assert set(config.modules_to_save) >= {"embed_tokens", "lm_head"}
    saved = json.loads((run / "final" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and set(saved["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    info = json.loads((run / "config.json").read_text())
    assert info["lora"] and info["format"] == "digits" and info["summary"]["steps"] == 6


def test_parameter_count_is_the_base_plus_the_lora_each_embedding_once(lora_run):
    from transformers import AutoModelForCausalLM
    model, run = lora_run
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(run / "base").parameters())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable, embed, total = models.count_params(model)
    assert total == base + lora and trainable == embed + lora
    info = json.loads((run / "config.json").read_text())
    assert info["summary"]["trainable_params"] == trainable


def trained_weights(model):
    sd = model.state_dict()
    return {name: sd[key] for name in ("embed_tokens", "lm_head")
            for key in sd if name in key and "modules_to_save" in key}


def test_embeddings_change_in_training_and_survive_save_and_reload(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model, run = lora_run
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    trained = trained_weights(model)
    assert set(trained) == {"embed_tokens", "lm_head"}
    assert not torch.equal(trained["embed_tokens"], base.model.embed_tokens.weight)
    assert not torch.equal(trained["lm_head"], base.lm_head.weight)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # LoRA trained too

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "final")
    again = trained_weights(reloaded)
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    x = torch.tensor([[1, 15, 14, 4, 5, 14, 16, 14]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-6)


def test_merged_model_predicts_like_base_plus_adapter(lora_run):
    from transformers import AutoModelForCausalLM
    model, run = lora_run
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert next(merged.parameters()).dtype == torch.float32  # the dtype this CPU run computed in
    x = torch.tensor([[1, 15, 14, 4, 5, 14, 16, 14]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, merged(x).logits, atol=1e-4)
        assert torch.equal(model(x).logits.argmax(-1), merged(x).logits.argmax(-1))


def test_resume_continues_at_the_right_step(family, tmp_path):
    out = tmp_path / "run"
    common = ["--dataset", str(family), "--out", str(out), "--logging-steps", "1", "--save-steps", "2",
              "--batch-size", "4"]
    train.main(common + ["--max-steps", "4"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    first = json.loads((out / "config.json").read_text())["summary"]
    train.main(common + ["--max-steps", "6", "--resume"])
    summary = json.loads((out / "config.json").read_text())["summary"]
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    assert [step for step, _ in summary["losses"]] == [1, 2, 3, 4, 5, 6]
    assert summary["losses"][:4] == first["losses"]  # steps 1-4 come from the checkpoint, not trained again


def test_ctrl_c_saves_a_checkpoint_and_the_model(family, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--dataset", str(family), "--max-steps", "100000",
                             "--logging-steps", "1", "--batch-size", "4", "--out", str(out)],
                            cwd=Path(train.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    output = line + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output  # saved, and `train.py && infer.py` stops here
    summary = json.loads((out / "config.json").read_text())["summary"]
    assert summary["interrupted"] and 0 < summary["steps"] < 100000
    assert (out / "checkpoints" / f"checkpoint-{summary['steps']}" / "trainer_state.json").exists()
    assert (out / "final" / "model.safetensors").exists() and "Traceback" not in output
    assert (out / "loss.png").exists()  # the curve so far


def test_progress_reaches_a_pipe_at_once_not_when_the_buffer_fills(tmp_path):
    fifo = tmp_path / "tasks.json"  # train.py blocks reading it: what it printed before must already be readable
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    proc = subprocess.Popen([sys.executable, "train.py", "--dataset", str(fifo), "--out", str(tmp_path / "run")],
                            cwd=Path(train.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        first = proc.stdout.readline() if ready else ""
        assert first.startswith("auto: model tiny"), first
    finally:
        proc.kill()
        proc.wait()


def test_a_slow_step_is_never_silent_between_logging_steps(family, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "HEARTBEAT_S", 0)  # every step and micro-batch counts as slow
    train.main(["--dataset", str(family), "--max-steps", "3", "--logging-steps", "100", "--batch-size", "2",
                "--grad-accum", "2", "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) >= 3 and all("tok/s" in line and "eta" in line for line in lines), lines
    assert "eta after step 1" in lines[0] and "min" in lines[-1]


def test_cpu_path_is_chosen_without_cuda_and_unsloth_never_imported():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    backend, why = models.pick_backend(cli.AUTO, models.find_device()[0], "unsloth/llama-3-8b-bnb-4bit")
    assert backend == "transformers" and "no CUDA" in why
    assert "unsloth" not in sys.modules


def test_backend_unsloth_without_gpu_is_one_line_error(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv(models.UNSLOTH_CPU, raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(["--backend", "unsloth", "--model", str(tmp_path), "--out", str(tmp_path / "r")])
    assert str(e.value) == "error: --backend unsloth: no CUDA device found; use --backend transformers (or auto)"
    assert "unsloth" not in sys.modules


def test_bad_model_and_data_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r")])
    assert str(e.value).startswith("error: --model") and "\n" not in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", str(tmp_path / "broken.json"), "--out", str(tmp_path / "r2")])
    assert "broken.json" in str(e.value) and "not valid JSON" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unsloth_path_trains_embeddings(tmp_path, family):
    """On a GPU: a small Llama-shaped model saved locally goes through Unsloth with the write-up's LoRA."""
    tokenizer = models.llama3_hf_tokenizer()
    tokenizer.save_pretrained(tmp_path / "base")
    model = models.tiny_model(tokenizer, hidden=256, layers=2)
    model.save_pretrained(tmp_path / "base")
    model, run = train.main(["--model", str(tmp_path / "base"), "--dataset", str(family), "--max-steps", "4",
                             "--lr", "1e-2", "--out", str(tmp_path / "run"), "--no-load-in-4bit"])
    info = json.loads((run / "config.json").read_text())
    assert info["backend"] == "unsloth" and os.path.exists(run / "final" / "adapter_model.safetensors")
    from safetensors.torch import load_file
    trained = load_file(run / "final" / "adapter_model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    for name in ("embed_tokens", "lm_head"):
        weight = next(v for k, v in trained.items() if name in k)
        assert not torch.equal(weight.float(), next(v for k, v in base.items() if name in k).float())


def test_packed_batch_gives_the_padded_loss():
    """A packed row (no attention_mask, positions restarting per sequence) must score exactly as the padded batch:
    a cross-sequence attention leak or a label across a boundary would change the loss."""
    tokenizer = models.tiny_tokenizer()
    tasks = data.load_tasks("arc1", "train")[0]
    ds, _ = data.build_dataset({tid: tasks[tid] for tid in sorted(tasks)[:3]}, "digits", symmetries=[0, 1])
    rows = list(train.tokenize(ds, tokenizer, 100_000)[0])
    assert len({len(r["input_ids"]) for r in rows}) > 1  # lengths differ, so the padded batch does pad
    packed = train.packed_collate()(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["position_ids"][0].tolist() == [i for r in rows for i in range(len(r["input_ids"]))]
    model = models.tiny_model(tokenizer, max_seq_len=4096)
    model.config.use_cache = False  # as the Trainer sets it: a KV cache would hide the packed layout from masking
    with torch.no_grad():
        padded_loss = model(**train.collate(models.pad_id(tokenizer))(rows)).loss
        assert torch.allclose(model(**packed).loss, padded_loss, atol=1e-5)


def test_run_writes_a_loss_curve(lora_run):
    _, run = lora_run
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ARC_SLICE = ["--dataset", "arc1", "--limit", "8", "--views", "4", "--max-steps", "3", "--warmup", "0",
             "--logging-steps", "1", "--no-group-by-length", "--save-steps", "1000"]


def loss_curve(run):
    """(steps, losses) recorded in a run's config.json."""
    logged = json.loads((Path(run) / "config.json").read_text())["summary"]["losses"]
    return [step for step, _ in logged], [loss for _, loss in logged]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """3 steps of global batch 8 on real arc1 sequences of different lengths (so padded batches pad), one process;
    28 sequences, so no step holds the end of an epoch (DDP would fill its last partial batch differently)."""
    out = tmp_path_factory.mktemp("runs") / "one"
    train.main(ARC_SLICE + ["--batch-size", "8", "--out", str(out)])
    return out


def test_packing_follows_the_padded_loss_curve(one_process_run, tmp_path):
    train.main(ARC_SLICE + ["--batch-size", "8", "--packing", "--out", str(tmp_path / "packed")])
    (steps, ref), (got_steps, got) = loss_curve(one_process_run), loss_curve(tmp_path / "packed")
    assert got_steps == steps == [1, 2, 3] and len(set(ref)) == 3  # three different batches
    assert got == pytest.approx(ref, abs=1e-5)


def test_two_process_ddp_follows_the_one_process_loss_curve(one_process_run, tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 sequences each: the same global batch of 8, so the same curve."""
    out = tmp_path / "two"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "train.py"] + ARC_SLICE +
                          ["--batch-size", "4", "--out", str(out)], cwd=Path(train.__file__).parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("training: ") == 1  # rank 0 speaks
    (steps, ref), (got_steps, got) = loss_curve(one_process_run), loss_curve(out)
    assert got_steps == steps and got == pytest.approx(ref, abs=1e-5)
    assert (out / "loss.png").exists() and (out / "final" / "model.safetensors").exists()


def test_several_datasets_and_splits_are_counted_deduplicated_and_recorded(family, tmp_path, capsys):
    copy = tmp_path / "copy"  # the same tasks under other names, plus one of its own
    (copy / "training").mkdir(parents=True)
    for i, f in enumerate(sorted((family / "training").glob("*.json"))[:4]):
        (copy / "training" / f"dup{i}.json").write_text(f.read_text())
    write_family(tmp_path / "other", n_train=1, n_eval=0, seed=7)
    (copy / "training" / "new.json").write_text((tmp_path / "other" / "training" / "train0000.json").read_text())
    out = tmp_path / "run"
    train.main(["--dataset", str(family), str(copy), "--split", "train", "--max-steps", "1", "--batch-size", "4",
                "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"data: {copy} train: 5 tasks, 4 already read (exact duplicates, dropped)" in printed
    assert "data: 7 distinct tasks in all" in printed
    info = json.loads((out / "config.json").read_text())
    assert [(s["dataset"], s["tasks"], s["duplicates"]) for s in info["trained_on"]] == \
        [(str(family), 6, 0), (str(copy), 5, 4)]
    assert len(info["fingerprints"]) == 7 and info["config"]["dataset"] == [str(family), str(copy)]
    assert runs.read_run(out).fingerprints == info["fingerprints"]


@pytest.fixture(scope="module")
def ttt_family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("ttt_family"), n_train=6, n_eval=3, seed=3)


def test_test_time_training_per_task_resumes_and_infer_loads_each_adapter(ttt_family, tmp_path, monkeypatch):
    import infer
    from safetensors.torch import load_file
    base, run = tmp_path / "base", tmp_path / "ttt"
    train.main(["--dataset", str(ttt_family), "--max-steps", "2", "--batch-size", "4", "--out", str(base)])
    ttt = ["--ttt", "--model", str(base), "--dataset", str(ttt_family), "--split", "eval", "--out", str(run),
           "--epochs", "1", "--ttt-views", "2", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2"]
    train.main(ttt)
    info = json.loads((run / "config.json").read_text())
    adapters = {p.name.split(".")[0]: load_file(p / "adapter_model.safetensors")  # <task id>.<its grids' fingerprint>
                for p in sorted((run / "ttt").iterdir())}
    assert sorted(adapters) == ["evalu0000", "evalu0001", "evalu0002"] and info["summary"]["trained"] == 3
    # 3 demonstrations x 2 views = 6 sequences per task, in 2 steps of 4; each task's own weights
    assert all(t["sequences"] == 6 and t["steps"] == 2 for t in info["summary"]["per_task"].values())
    a, b = (next(v for k, v in adapters[t].items() if "lora_B" in k) for t in ("evalu0000", "evalu0001"))
    assert a.abs().sum() > 0 and not torch.equal(a, b)
    assert not any("embed" in k or "lm_head" in k for k in adapters["evalu0000"])  # embeddings stay frozen
    assert info["fingerprints"] == json.loads((base / "config.json").read_text())["fingerprints"]  # eval unseen

    import shutil
    weights = runs.weights_fingerprint(runs.read_run(run))
    shutil.rmtree(next((run / "ttt").glob("evalu0001.*")))
    assert runs.weights_fingerprint(runs.read_run(run)) != weights  # infer's cache follows each task's adapter
    train.main(ttt)
    summary = json.loads((run / "config.json").read_text())["summary"]
    assert (summary["trained"], summary["already_done"]) == (1, 2)

    loaded = []
    real = models.adapter_loader
    monkeypatch.setattr(infer, "adapter_loader", lambda model, r, tasks: lambda tid: (loaded.append(tid),
                                                                                        real(model, r, tasks)(tid)))
    infer.main(["--model", str(run), "--dataset", str(ttt_family), "--split", "eval", "--max-new-tokens", "16"])
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == 3 and sorted(loaded) == sorted(adapters) and len(loaded) == 3  # one load per task


def test_test_time_training_shared_writes_one_adapter(ttt_family, tmp_path):
    base, run = tmp_path / "base", tmp_path / "ttt"
    train.main(["--dataset", str(ttt_family), "--max-steps", "1", "--batch-size", "4", "--out", str(base)])
    train.main(["--ttt", "--ttt-mode", "shared", "--model", str(base), "--dataset", str(ttt_family), "--split",
                "eval", "--out", str(run), "--epochs", "1", "--ttt-views", "1", "--batch-size", "3"])
    info = json.loads((run / "config.json").read_text())
    assert info["ttt"]["mode"] == "shared" and info["summary"]["sequences"] == 9  # 3 tasks x 3 demonstrations
    assert (run / "final" / "adapter_model.safetensors").exists() and not (run / "ttt").exists()
    assert runs.read_run(run).adapter == run / "final"
    model, _ = models.load_model(runs.read_run(run), cpu_setup())  # the test-time adapter stays on top, unmerged
    assert lora_layers(model) and hasattr(model, "peft_config")
    import infer
    infer.main(["--model", str(run), "--dataset", str(ttt_family), "--split", "eval", "--max-new-tokens", "8",
                "--guesses", "poe", "--views", "2"])
    assert json.loads((run / "results.poe.json").read_text())["mode"] == "poe"


def test_every_load_of_a_trained_model_goes_through_the_one_builder(lora_run, family, tmp_path, monkeypatch):
    """infer.py, test-time training and --merge build a run's model only through models.build_model (base, cut,
    untie, adapter, merged): counted by wrapping it. A test-time run's base is a run: built by the same call."""
    import infer
    _, run = lora_run
    calls, build = [], models.build_model

    def counted(base, *a, **k):
        calls.append((Path(base).name, k.get("merge", False) or (len(a) > 3 and a[3])))
        return build(base, *a, **k)
    monkeypatch.setattr(models, "build_model", counted)
    infer.main(["--model", str(run), "--dataset", str(family), "--split", "train", "--limit", "1",
                "--max-new-tokens", "4", "--out", str(tmp_path / "predicted")])
    assert calls == [("base", True)]  # a LoRA run on the transformers path: merged for inference
    train.main(["--ttt", "--ttt-mode", "shared", "--model", str(run), "--dataset", str(family), "--limit", "1",
                "--out", str(tmp_path / "ttt"), "--epochs", "1", "--ttt-views", "1", "--batch-size", "2"])
    assert calls[1:] == [("lora", False), ("base", True)]  # the run, built on its base and merged
    infer.main(["--model", str(tmp_path / "ttt"), "--dataset", str(family), "--split", "train", "--limit", "1",
                "--max-new-tokens", "4"])
    assert calls[3:] == [("lora", False), ("base", True)]  # the same, then the test-time adapter on top
    train.main(["--dataset", str(family), "--no-full-finetune", "--max-steps", "1", "--batch-size", "4", "--merge",
                "--out", str(tmp_path / "merge")])
    assert calls[5:] == [("base", True)] and (tmp_path / "merge" / "merged" / "config.json").is_file()


def lora_layers(model):
    return [name for name, _ in model.named_modules() if "lora_" in name]


def test_infer_merges_a_lora_run_and_scores_as_the_adapter_on_its_base(lora_run, family, capsys):
    """load_model merges a LoRA run's adapter into its base (transformers, fp32, no test-time training): no LoRA
    layer is left, the weights line says so, and every answer's log-prob is the unmerged model's within 1e-5
    relative (while the base alone scores them otherwise: the adapter is in there)."""
    _, folder = lora_run
    run, setup = runs.read_run(folder), cpu_setup()
    merged, tokenizer = models.load_model(run, setup)
    assert f" + the adapter {run.adapter}, merged, cut to the run's {len(run.keep_ids)} tokens; base float32" \
        in capsys.readouterr().out
    assert lora_layers(merged) == [] and not hasattr(merged, "peft_config")
    unmerged = models.build_model(run.base, setup, run.keep_ids, run.adapter, max_seq_len=run.max_seq_len).eval()
    assert lora_layers(unmerged)
    base = models.build_model(run.base, setup, run.keep_ids, max_seq_len=run.max_seq_len).eval()
    tasks = data.load_tasks(str(family), "train")[0]
    prompts = [models.encode_prompt(tokenizer, data.format_prompt(t, 0, run.format)) for t in tasks.values()]
    answers = [models.encode_completion(tokenizer, data.format_completion(t["test"][0]["output"], run.format))
               for t in tasks.values()]
    got, want, alone = (decode.completion_logprobs(m, tokenizer, prompts, answers) for m in (merged, unmerged, base))
    assert len(got) == 6 and all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)
    assert all(abs(a - w) > 1e-3 * abs(w) for a, w in zip(alone, want)), (alone, want)


def test_merge_of_a_full_fine_tune_records_the_backends_reason(family, tmp_path):
    out = tmp_path / "full"
    train.main(["--dataset", str(family), "--max-steps", "1", "--batch-size", "4", "--merge", "--out", str(out)])
    info = json.loads((out / "config.json").read_text())
    assert info["why"] == "the tiny model is built from a config, which Unsloth cannot load: transformers + peft"
    assert not (out / "merged").exists()


def test_a_run_moved_away_from_its_base_finds_it_with_base_model(lora_run, family, tmp_path):
    """A run copied to another machine (a Kaggle dataset) whose base, a folder of the first machine or a Hugging Face
    name offline, is not there: one line saying so, and --base-model names the local copy."""
    import infer
    import shutil
    _, run = lora_run
    moved = tmp_path / "moved"
    shutil.copytree(run / "final", moved / "final")
    shutil.copy(run / "config.json", moved / "config.json")
    shutil.copytree(run / "base", tmp_path / "input" / "base")
    info = json.loads((moved / "config.json").read_text())
    cli.write_json(moved / "config.json", dict(info, base_model="/home/someone/tiny-base"))
    predict = ["--model", str(moved), "--dataset", str(family), "--split", "train", "--limit", "1",
               "--max-new-tokens", "4"]
    with pytest.raises(SystemExit) as e:
        infer.main(predict)
    assert str(e.value) == f"error: {moved}: its base model /home/someone/tiny-base is not on this machine: give a " \
                           "local copy with --base-model FOLDER"
    infer.main([*predict, "--base-model", str(tmp_path / "input" / "base")])
    assert json.loads((moved / "results.limit-1.json").read_text())["tasks"] == 1


@pytest.mark.parametrize("model, gpu", [("tiny", False), ("tiny", True), ("smollm2", False), ("some/model", True)])
def test_auto_settings_are_the_recipe_rows_and_help_names_them(model, gpu, capsys):
    """One recipe table: what an auto flag becomes and what --help says it becomes come from the same row."""
    cfg = train.auto_settings(train.Config(model=model, out="x"), gpu)
    row = recipes.RECIPES.get(model, recipes.RECIPES[hub.GPU_MODEL])
    expected = {**row, **({} if gpu else {**recipes.ON_CPU, **row.get("cpu", {})})}
    assert {k: getattr(cfg, k) for k in expected if k != "cpu"} == {k: v for k, v in expected.items() if k != "cpu"}
    assert cfg.embedding_lr == cfg.lr
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(train.Config)}
    for name in ("batch_size", "grad_accum", "lr", "max_seq_len", "optim", "full_finetune", "max_steps"):
        assert recipes.shown(row[name]) in helps[name], (name, helps[name])
