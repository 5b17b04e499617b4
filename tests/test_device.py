"""Where a process runs: the device, dtype and backend decided once at its start (models.make_setup), a GPU that
torch cannot use stopping every script in one line, and fp16 wherever bf16 would only be emulated."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

import bench
import infer
import models
import runs
import train
from conftest import tiny_run

ROOT = Path(__file__).resolve().parent.parent
A100_550 = "NVIDIA A100-SXM4-80GB, 550.54.15"  # what `nvidia-smi --query-gpu=name,driver_version` prints


def fake_smi(tmp_path, monkeypatch, body):
    """An nvidia-smi first on PATH that runs the shell line `body`, each call logged in <bin>/calls; returns <bin>.
    This CPU machine's torch sees no GPU, which is exactly what happens beside a driver too old for it."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho called >> '{folder / 'calls'}'\n{body}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return folder


@pytest.fixture
def driver_550(tmp_path, monkeypatch):
    """A machine whose NVIDIA driver (550, too old for torch's CUDA 13 build) lists an A100."""
    fake_smi(tmp_path, monkeypatch, f"echo '{A100_550}'")


def one_line_error(call):
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_an_unusable_gpu_stops_train_infer_and_bench_before_any_model_in_one_line(driver_550, family, tmp_path,
                                                                                   monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded")
    for script in (train, bench, models):  # each loads a base; infer.py builds its model on one
        monkeypatch.setattr(script, "load_base", no_model)
    run = tiny_run(tmp_path / "run")
    calls = {"train.py": lambda: train.main(["--dataset", str(family), "--max-steps", "2", "--out",
                                             str(tmp_path / "new")]),
             "infer.py": lambda: infer.main(["--model", run, "--dataset", str(family), "--split", "train"]),
             "bench.py": lambda: bench.main(["--sections", "data", "--out", str(tmp_path / "bench.json")])}
    for script, call in calls.items():
        message = one_line_error(call)
        assert "NVIDIA A100-SXM4-80GB with NVIDIA driver 550.54.15 is here, but torch " in message, (script, message)
        assert f"pip install torch=={torch.__version__.split('+')[0]} xformers==0.0.35 --index-url " \
               f"{models.TORCH_CU126}" in message and "--device cpu" in message, (script, message)
    assert not (tmp_path / "new").exists() and not (tmp_path / "bench.json").exists()
    assert sorted(p.name for p in Path(run).iterdir()) == ["config.json", "final"]  # no submission, no cache


def test_device_cpu_trains_and_predicts_on_purpose_and_a_hidden_gpu_is_no_error(driver_550, family, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(["--device", "cpu", "--dataset", str(family), "--max-steps", "2", "--batch-size", "4", "--out",
                str(out)])
    first = capsys.readouterr().out
    assert "device: cpu (--device cpu); torch " in first and "NVIDIA driver none" in first
    assert not (tmp_path / "bin" / "calls").exists()  # told where to run: the driver is not asked
    assert json.loads((out / "config.json").read_text())["summary"]["steps"] == 2
    predict = ["--model", str(out), "--dataset", str(family), "--split", "train", "--limit", "2",
               "--max-new-tokens", "8"]
    infer.main(["--device", "cpu", *predict])
    assert json.loads((out / "results.limit-2.json").read_text())["tasks"] == 2
    assert not (tmp_path / "bin" / "calls").exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    infer.main([*predict, "--out", str(tmp_path / "hidden" / "submission.json")])
    assert "device: cpu (CUDA_VISIBLE_DEVICES hides the GPU)" in capsys.readouterr().out
    assert (tmp_path / "bin" / "calls").read_text().count("called") == 1  # the device is decided once
    assert (tmp_path / "hidden" / "submission.limit-2.json").is_file()


def test_nvidia_smi_bytes_that_are_not_utf8_are_one_line_and_device_cpu_never_waits_for_it(tmp_path, monkeypatch,
                                                                                          family, capsys):
    """A driver whose name holds bytes that are not UTF-8 is still named, in one line; an nvidia-smi that hangs
    costs nothing under --device cpu, in every script, as it is never started."""
    fake_smi(tmp_path, monkeypatch, "printf 'NVIDIA A100\\377\\376-SXM4, 550.54.15\\n'")
    message = one_line_error(lambda: train.main(["--dataset", str(family), "--max-steps", "1", "--out",
                                                 str(tmp_path / "new")]))
    assert "NVIDIA A100\ufffd\ufffd-SXM4 with NVIDIA driver 550.54.15 is here, but torch " in message, message
    (tmp_path / "bin" / "nvidia-smi").write_text(f"#!/bin/sh\necho called >> '{tmp_path / 'bin' / 'hung'}'\nsleep 600\n")
    out = tmp_path / "run"
    train.main(["--device", "cpu", "--dataset", str(family), "--max-steps", "1", "--batch-size", "4", "--out",
                str(out)])
    infer.main(["--device", "cpu", "--model", str(out), "--dataset", str(family), "--split", "train", "--limit", "1",
                "--max-new-tokens", "4"])
    bench.main(["--device", "cpu", "--sections", "data", "--dataset", "family", "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "bin" / "hung").exists() and (tmp_path / "b.json").is_file()


GPUS = [("Tesla T4", (7, 5), torch.float16), ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
        ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16), ("NVIDIA L4", (8, 9), torch.bfloat16),
        ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16)]


def fake_gpu(monkeypatch, name, capability, count=1):
    """torch seeing `count` GPUs `name` of compute `capability`; torch's own bf16 question says yes to every one
    of them (on a T4 or V100 it counts emulation, which is slow)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("name, capability, dtype", GPUS, ids=[g[0].split()[-1] for g in GPUS])
def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capsys, name, capability, dtype):
    fake_gpu(monkeypatch, name, capability, count=2)
    setup = models.make_setup("auto", "transformers")
    assert (setup.device, setup.gpus, setup.dtype) == ("cuda", [name, name], dtype)
    said = capsys.readouterr().out
    assert f"device: cuda (2 x {name}) (CUDA found)" in said
    assert f"dtype: {str(dtype).split('.')[1]} (compute capability {capability[0]}.{capability[1]}" in said


def test_cpu_is_fp32_and_the_setup_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    setup = models.make_setup("auto", "auto", model="unsloth/llama-3-8b-bnb-4bit")
    assert (setup.device, setup.dtype, setup.backend) == ("cpu", torch.float32, "transformers")
    assert capsys.readouterr().out.splitlines()[:3] == [
        f"device: cpu (no GPU); torch {models.torch_build()}, NVIDIA driver none", "dtype: float32 (CPU)",
        "backend: transformers (no CUDA device found: transformers + peft)"]


def test_a_t4_setup_loads_and_merges_in_fp16(monkeypatch, tmp_path, family):
    """The dtype decided once is the one every loader uses: a T4's fp16 reaches the base load and the merged save
    (both built on the CPU here: the setup, not torch, says which dtype)."""
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    t4 = models.make_setup("auto", "transformers")
    monkeypatch.undo()
    on_cpu = models.Setup(**{**vars(t4), "device": "cpu"})
    run = tiny_run(tmp_path / "run")
    model, tokenizer = models.load_base(str(Path(run) / "final"), on_cpu)
    assert next(model.parameters()).dtype == torch.float16
    out = tmp_path / "lora"
    train.main(["--dataset", str(family), "--no-full-finetune", "--max-steps", "1", "--batch-size", "4",
                "--out", str(out)])
    r = runs.read_run(out)
    models.save_merged(None, tokenizer, tmp_path / "merged", on_cpu, r.base, r.adapter, r.keep_ids)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float16"


def test_the_scripts_ask_torch_about_the_gpu_in_one_place():
    """Decided once: find_device is the only caller of cuda.is_available(), pick_dtype the only dtype rule, and
    nothing asks is_bf16_supported (True on a T4, where bf16 is emulated)."""
    calls = {}
    for path in sorted(ROOT.glob("*.py")):
        text = path.read_text()
        calls[path.name] = len(re.findall(r"cuda\.is_available\(\)", text)), len(re.findall(r"is_bf16_supported\(", text))
    assert calls == {name: (name == "models.py", 0) for name in calls} and "models.py" in calls, calls
