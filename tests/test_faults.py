"""Faults a demanding user meets, a section per behaviour: half-written checkpoints, stale or damaged caches, unreadable tasks,
files without solutions, nonsense flags, unwritable outputs, damaged model folders, two processes on one --out.
Each test goes through the real entry points (train.main, infer.main, data.main).

    python -m pytest tests/test_faults.py -q
"""
import dataclasses
import fcntl
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli
import data
import hub
import infer
import models
import runs
import train
from conftest import FMT, fake_model, mirror_task, read, tiny_run, write_family, write_run, write_tasks

G = [[1, 2], [3, 4]]


def error_of(main, argv):
    """The message a script exits with (SystemExit), asserting it is `error: ...` lines and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert all(line.startswith("error: ") for line in message.splitlines()), message
    return message


# ----------------------------------------------------------------------------
# resume past a half-written checkpoint; train_loss over every step after a resume

@pytest.fixture(scope="module")
def four_steps(family, tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, every loss logged."""
    out = tmp_path_factory.mktemp("resume") / "run"
    train.main(["--dataset", str(family), "--out", str(out), "--max-steps", "4", "--save-steps", "2",
                "--logging-steps", "1", "--batch-size", "4"])
    return out


def resume(run, tmp_path, steps=6):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out, ["--out", str(out), "--resume", "--max-steps", str(steps)]


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["trainer_state.json", "optimizer.pt", "adapter_or_model"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(four_steps, tmp_path, capsys, damage):
    out, argv = resume(four_steps, tmp_path)
    newest = out / "checkpoints" / "checkpoint-4"
    if damage == "trainer_state.json":  # kill -9 before the Trainer wrote its state
        (newest / damage).unlink()
    elif damage == "optimizer.pt":  # a full disk in the middle of torch.save
        cut_in_half(newest / damage)
    else:
        cut_in_half(next(newest.glob("*.safetensors")))
    train.main(argv)
    said = capsys.readouterr().out
    assert f"{newest} is incomplete" in said and f"resume: from {out / 'checkpoints' / 'checkpoint-2'}" in said, said
    summary = json.loads((out / "config.json").read_text())["summary"]
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    assert [step for step, _ in summary["losses"]] == [1, 2, 3, 4, 5, 6]


def test_resume_after_a_real_kill_9_while_saving(family, tmp_path, capsys):
    """kill -9 right after a step's log line, when the Trainer is saving that step's checkpoint (every step here)."""
    out = tmp_path / "run"
    argv = [sys.executable, "train.py", "--dataset", str(family), "--out", str(out), "--save-steps", "1",
            "--logging-steps", "1", "--batch-size", "4"]
    proc = subprocess.Popen(argv + ["--max-steps", "100"], cwd=Path(train.__file__).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step     2/"):
            break
    proc.kill()
    proc.wait()
    newest = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    half_written = runs.checkpoint_problem(newest) != ""  # usually: the kill lands in its torch.save
    train.main(argv[2:] + ["--max-steps", "5", "--resume"])
    said = capsys.readouterr().out
    assert "resume: from" in said and (f"{newest} is incomplete" in said) == half_written, said
    assert json.loads((out / "config.json").read_text())["summary"]["steps"] == 5


def test_resume_without_a_complete_checkpoint_is_one_line(four_steps, tmp_path):
    out, argv = resume(four_steps, tmp_path)
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "scheduler.pt").unlink()
    message = error_of(train.main, argv)
    assert "no complete checkpoint" in message and str(out / "checkpoints") in message


def test_resumed_summary_train_loss_covers_every_step(four_steps, tmp_path):
    out, argv = resume(four_steps, tmp_path)
    train.main(argv)
    summary = json.loads((out / "config.json").read_text())["summary"]
    losses = [loss for _, loss in summary["losses"]]
    assert summary["resumed_from"] == 4 and len(losses) == 6
    assert summary["train_loss"] == pytest.approx(sum(losses) / 6, rel=1e-4)  # one step per logged loss


# ----------------------------------------------------------------------------
# the infer cache belongs to the exact weights; a relative and an absolute path are one model

@pytest.fixture
def mirror(tmp_path):
    rng = random.Random(0)
    tasks = {f"t{i}": mirror_task(rng, 2, 3 + i) for i in range(4)}
    run = Path(write_run(tmp_path / "run"))
    (run / runs.FINAL / "model.safetensors").write_bytes(b"weights v1")  # only fingerprinted: the model is faked
    return tasks, write_tasks(tmp_path / "tasks", tasks), run


def right_answer(tasks, tokenizer):
    """A fake model that answers every guess-1 prompt right."""
    answers = {}
    for task in tasks.values():
        for i, test in enumerate(task["test"]):
            ids = models.encode_prompt(tokenizer, data.format_prompt(data.strip_outputs(task), i, FMT))
            answers[tuple(ids)] = data.format_completion(test["output"], FMT)
    return lambda ids: answers.get(tuple(ids), "no idea")


def test_cache_of_other_weights_is_moved_aside_and_every_task_predicted_afresh(mirror, monkeypatch, tokenizer,
                                                                               capsys):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    old = (run / "submission.cache.jsonl").read_text()
    (run / runs.FINAL / "model.safetensors").write_bytes(b"weights v2")  # train.py --resume trained it further
    again = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(run)])
    out = capsys.readouterr().out
    assert "written by other weights" in out and "moved to" in out and "0 already done" in out, out
    assert sum(len(batch) for batch in again) == 8  # 4 tasks x 2 guesses, none reused
    moved = list(run.glob("submission.cache.*.jsonl"))
    assert len(moved) == 1 and moved[0].read_text() == old  # nothing lost
    assert read(run / "results.json")["score"] == 4


def test_relative_and_absolute_run_paths_share_the_cache(mirror, monkeypatch, tokenizer, tmp_path, capsys):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    monkeypatch.chdir(tmp_path)
    again = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", "run"])
    assert "4 already done" in capsys.readouterr().out and again == []


# ----------------------------------------------------------------------------
# every task id of the input is in the submission; a broken solutions file only stops scoring

def write_kaggle(folder, tasks, solutions):
    folder.mkdir(parents=True, exist_ok=True)
    challenges = {tid: data.strip_outputs(t) if isinstance(t, dict) and "test" in t else t for tid, t in tasks.items()}
    (folder / "x_challenges.json").write_text(json.dumps(challenges))
    (folder / "x_solutions.json").write_text(solutions if isinstance(solutions, str) else json.dumps(solutions))
    return str(folder / "x_challenges.json")


def test_unreadable_tasks_get_placeholders_and_a_bad_solution_only_skips_scoring(tmp_path, monkeypatch, tokenizer,
                                                                                capsys):
    rng = random.Random(4)
    tasks = {"good": mirror_task(rng, 2, 3), "badsol": mirror_task(rng, 2, 4),
             "tall": {"train": [{"input": [[0]] * 31, "output": G}], "test": [{"input": G}, {"input": G}]},
             "junk": "not a task"}
    solutions = {"good": [tasks["good"]["test"][0]["output"]], "badsol": [[[1, 10]]], "tall": [G, G]}
    path = write_kaggle(tmp_path / "kaggle", tasks, solutions)
    fake_model(monkeypatch, tokenizer, right_answer({t: tasks[t] for t in ("good", "badsol")}, tokenizer))
    run = write_run(tmp_path / "run")
    infer.main(["--dataset", path, "--model", run])
    err = capsys.readouterr().err
    sub, r = read(Path(run) / "submission.json"), read(Path(run) / "results.json")
    assert sorted(sub) == ["badsol", "good", "junk", "tall"]
    assert sub["tall"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}] * 2 and len(sub["junk"]) == 1
    assert sub["badsol"][0]["attempt_1"] == tasks["badsol"]["test"][0]["output"]  # predicted, just not scored
    assert "no usable solution for task badsol" in err and "task tall" in err and "31x1" in err and "junk" in err
    assert (r["tasks"], r["scored"], r["score"]) == (2, 1, 1.0) and set(r["unreadable"]) == {"tall", "junk"}


def test_broken_solutions_file_does_not_stop_predicting(tmp_path, monkeypatch, tokenizer, capsys):
    tasks = {"a": mirror_task(random.Random(5), 2, 3)}
    path = write_kaggle(tmp_path / "kaggle", tasks, "{not json")
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    run = write_run(tmp_path / "run")
    infer.main(["--dataset", path, "--model", run])
    assert "not scored" in capsys.readouterr().out
    assert read(Path(run) / "submission.json")["a"][0]["attempt_1"] == tasks["a"]["test"][0]["output"]


# ----------------------------------------------------------------------------
# a challenges file without solutions

def test_stats_and_train_on_a_challenges_file_without_solutions(tmp_path, capsys):
    tasks = {"a": {"train": [{"input": G, "output": G}], "test": [{"input": G}]}}
    (tmp_path / "x_challenges.json").write_text(json.dumps(tasks))
    data.main(["--stats", "--dataset", str(tmp_path / "x_challenges.json")])
    out = capsys.readouterr().out
    assert "1 test inputs have no output" in out and "llama3 (1 token/cell)" in out
    message = error_of(train.main, ["--dataset", str(tmp_path / "x_challenges.json"), "--out", str(tmp_path / "r")])
    assert "no test outputs to train on" in message


def test_data_reads_a_file_once_whatever_the_splits(tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"a": {"train": [{"input": G, "output": G}], "test": [{"input": G, "output": G}]}}))
    reads = []
    read_json = cli.read_json
    monkeypatch.setattr(data, "read_json", lambda p: reads.append(p) or read_json(p))
    data.main(["--stats", "--dataset", str(path)])
    assert reads == [path] and capsys.readouterr().out.count("1 tasks (0 skipped)") == 1


# ----------------------------------------------------------------------------
# every flag's range, before any model loads

TRAIN_FLAGS = [("--max-seq-len", "-5"), ("--limit", "-3"), ("--grad-accum", "-1"), ("--epochs", "0"),
               ("--views", "0"), ("--batch-size", "0"), ("--lr", "-1"), ("--warmup", "-1"),
               ("--optim", "nonsense"), ("--scheduler", "nonsense"), ("--max-steps", "0"), ("--lora-r", "0")]
INFER_FLAGS = [("--max-seq-len", "-5"), ("--max-new-tokens", "-5"), ("--temperature", "-1"), ("--limit", "-3"),
               ("--batch-size", "0"), ("--top-k", "-5"), ("--min-prob", "0"), ("--min-prob", "1.5"),
               ("--max-task-seconds", "-1")]


def no_model(monkeypatch):
    def load(*_):
        raise AssertionError("a model was loaded")
    for script in (train, models):  # training loads its base, every other model is built on one
        monkeypatch.setattr(script, "load_base", load)
    monkeypatch.setattr(infer, "load_model", load)


@pytest.mark.parametrize("flag, value", TRAIN_FLAGS)
def test_train_flag_out_of_range_stops_before_the_model(family, tmp_path, monkeypatch, flag, value):
    no_model(monkeypatch)
    message = error_of(train.main, ["--dataset", str(family), "--out", str(tmp_path / "r"), flag, value])
    assert message.startswith(f"error: {flag} {value}: must be") and "\n" not in message


@pytest.mark.parametrize("flag, value", INFER_FLAGS)
def test_infer_flag_out_of_range_stops_before_the_model(mirror, monkeypatch, flag, value):
    _, folder, run = mirror
    no_model(monkeypatch)
    message = error_of(infer.main, ["--dataset", folder, "--model", str(run), flag, value])
    assert message.startswith(f"error: {flag} {value}: must be") and "\n" not in message
    assert not (run / "submission.cache.jsonl").exists()


def test_every_bad_flag_is_one_line(family, tmp_path):
    message = error_of(train.main, ["--dataset", str(family), "--out", str(tmp_path / "r")]
                       + [x for pair in TRAIN_FLAGS for x in pair])
    assert sorted(line.split()[1] for line in message.splitlines()) == sorted(flag for flag, _ in TRAIN_FLAGS)


# ----------------------------------------------------------------------------
# one line instead of a traceback: unwritable --out, damaged model folders, damaged caches

def test_out_under_a_file_is_one_line_in_every_script(family, mirror, tmp_path, monkeypatch, tokenizer):
    _, folder, run = mirror
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    no_model(monkeypatch)
    for main, argv in ((train.main, ["--dataset", str(family)]), (infer.main, ["--dataset", folder, "--model", str(run)]),
                       (data.main, ["--dataset", folder, "--show", "t0"])):
        message = error_of(main, argv + ["--out", str(blocker / "sub" / "x")])
        assert "\n" not in message and "a-file" in message and "cannot write" in message, message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_one_line(mirror, tmp_path, monkeypatch):
    _, folder, run = mirror
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    no_model(monkeypatch)
    message = error_of(infer.main, ["--dataset", folder, "--model", str(run), "--out", str(locked / "s.json")])
    assert "cannot write" in message and "locked" in message


def damaged_model(folder, damage):
    tok = models.tiny_tokenizer()
    model = models.tiny_model(tok, hidden=32, layers=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if damage == "config_is_a_list":
        (folder / "config.json").write_text(json.dumps([config]))
    elif damage == "bad_field":
        (folder / "config.json").write_text(json.dumps(dict(config, hidden_size="big")))
    elif damage == "truncated_weights":
        cut_in_half(folder / "model.safetensors")
    else:
        (folder / "model.safetensors").unlink()
    return str(folder)


@pytest.mark.parametrize("damage", ["config_is_a_list", "bad_field", "truncated_weights", "missing_weights"])
def test_damaged_model_folder_is_one_line(family, mirror, tmp_path, damage):
    _, folder, _ = mirror
    model = damaged_model(tmp_path / "model", damage)
    for main, argv in ((train.main, ["--dataset", str(family), "--max-steps", "1", "--out", str(tmp_path / "r")]),
                       (infer.main, ["--dataset", folder, "--out", str(tmp_path / "s.json")])):
        message = error_of(main, argv + ["--model", model])
        assert "\n" not in message and "model" in message, message


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00\x01 binary", b'{"task_id": "t1"}', b"[1, 2"])
def test_damaged_middle_cache_line_redoes_only_its_task(mirror, monkeypatch, tokenizer, capsys, damage):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    cache = run / "submission.cache.jsonl"
    lines = cache.read_bytes().split(b"\n")
    victim = json.loads(lines[1])["task_id"]
    cache.write_bytes(b"\n".join(lines[:1] + [damage] + lines[2:]))
    again = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(run)])
    out = capsys.readouterr().out
    assert "damaged line 2" in out and "3 already done" in out and "1 to do" in out
    assert sum(len(batch) for batch in again) == 2  # the damaged task's two guesses
    assert read(run / "results.json")["score"] == 4 and victim in cache.read_text()
    assert b"binary" not in cache.read_bytes()


# ----------------------------------------------------------------------------
# smaller: --score leaves its file alone, files are 0644, --out FOLDER, one infer.py per --out

def test_score_leaves_the_scored_file_as_it_was(mirror, tmp_path):
    tasks, folder, _ = mirror
    sub = tmp_path / "sub" / "mine.json"
    sub.parent.mkdir()
    sub.write_text(json.dumps({tid: [{"attempt_1": t["test"][0]["output"], "attempt_2": [[0]]}]
                               for tid, t in tasks.items()}, indent=2))
    sub.chmod(0o444)
    before = sub.read_bytes()
    infer.main(["--dataset", folder, "--score", str(sub)])
    assert sub.read_bytes() == before and sub.stat().st_mode & 0o777 == 0o444
    assert read(tmp_path / "sub" / "results.mine.json")["score"] == 4


def test_outputs_are_0644_and_out_may_name_a_folder(mirror, monkeypatch, tokenizer, tmp_path):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    target = tmp_path / "outputs"
    target.mkdir()
    old = os.umask(0o022)
    try:
        infer.main(["--dataset", folder, "--model", str(run), "--out", str(target)])
    finally:
        os.umask(old)
    assert sorted(p.name for p in target.iterdir() if p.suffix == ".json") == ["results.json", "submission.json"]
    assert all((target / n).stat().st_mode & 0o777 == 0o644 for n in ("results.json", "submission.json"))


def test_second_infer_on_the_same_out_says_the_first_is_running(mirror, monkeypatch, tokenizer):
    tasks, folder, run = mirror
    calls = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    with open(run / "submission.cache.jsonl.lock", "w") as held:  # what a running infer.py holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = error_of(infer.main, ["--dataset", folder, "--model", str(run)])
    assert "another infer.py" in message and calls == []
    infer.main(["--dataset", folder, "--model", str(run)])  # the lock is gone with its holder
    assert read(run / "results.json")["score"] == 4


# ----------------------------------------------------------------------------
# helpers of the sections below: real processes of the scripts, a run trained four steps

ROOT = Path(train.__file__).parent


def script(name, *argv, **kw):
    """A real process of one of the scripts, in the repository, its output merged into stdout."""
    return subprocess.Popen([sys.executable, name, *map(str, argv)], cwd=kw.pop("cwd", ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def wait_for_step(proc):
    """Read the process's output until its first training step line; returns what it printed."""
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith("step "):
            return "".join(said)
    raise AssertionError("no step line:\n" + "".join(said))


def finish(run, steps=1):
    """Mark a write_run folder as a run that finished training (config.json's summary)."""
    path = runs.run_config_path(run)
    cli.write_json(path, dict(json.loads(Path(path).read_text()), summary=dict(steps=steps, interrupted=False)))
    return run


@pytest.fixture(scope="module")
def lora_run(family, tmp_path_factory):
    """A tiny LoRA run (its random base saved in base/) of 2 steps, one checkpoint."""
    out = tmp_path_factory.mktemp("lora") / "run"
    train.main(["--dataset", str(family), "--out", str(out), "--no-full-finetune", "--max-steps", "2",
                "--save-steps", "2", "--batch-size", "4", "--logging-steps", "1"])
    return out


# a mistyped resume is refused before anything is written; the run stays resumable

@pytest.mark.parametrize("flag", [["--lora-r", "4"], ["--full-finetune"], ["--model", "smollm2"], ["--vocab", "full"]])
def test_resume_with_a_flag_that_changes_the_weights_is_refused_and_writes_nothing(lora_run, tmp_path, flag):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    before = (out / "config.json").read_bytes()
    message = error_of(train.main, ["--out", str(out), "--resume", "--max-steps", "3"] + flag)
    assert "\n" not in message and flag[0] in message and "shape of its weights" in message, message
    assert (out / "config.json").read_bytes() == before  # summary and settings as they were
    train.main(["--out", str(out), "--resume", "--max-steps", "3"])  # a plain --resume still works
    summary = json.loads((out / "config.json").read_text())["summary"]
    assert summary["steps"] == 3 and summary["resumed_from"] == 2


# SIGTERM saves a checkpoint at the end of the step and exits; infer.py's default passes over that run
# a second train.py on the same --out stops at once

def test_sigterm_saves_a_checkpoint_a_second_train_is_refused_and_infer_skips_the_run(family, mirror, tmp_path,
                                                                                     monkeypatch, tokenizer, capsys):
    tasks, folder, _ = mirror
    root = tmp_path / "runs"
    finish(write_run(root / "a-finished"))
    killed = root / "b-killed"
    proc = script("train.py", "--dataset", family, "--out", killed, "--max-steps", 100000, "--save-steps", 100000,
                  "--logging-steps", 1, "--batch-size", 4)
    said = wait_for_step(proc)
    message = error_of(train.main, ["--dataset", str(family), "--out", str(killed), "--max-steps", "1"])
    assert "another train.py is training there" in message and "train.lock" in message
    proc.send_signal(signal.SIGTERM)
    said += proc.communicate(timeout=300)[0]
    assert proc.returncode == 143 and "SIGTERM: saving a checkpoint" in said and "Traceback" not in said, said
    summary = json.loads((killed / "config.json").read_text())["summary"]
    assert summary["interrupted"] and 0 < summary["steps"] < 100000
    assert runs.checkpoint_problem(killed / "checkpoints" / f"checkpoint-{summary['steps']}") == ""
    assert runs.run_status(killed) == "interrupted" and runs.latest_run(root) == killed
    monkeypatch.chdir(tmp_path)
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder])
    out = capsys.readouterr().out
    assert "model: runs/a-finished (the newest finished run; runs/b-killed is newer but interrupted)" in out, out
    assert (root / "a-finished" / "submission.json").exists() and not (killed / "submission.json").exists()


def test_a_sigint_stops_pytest_itself(family, tmp_path):
    """train.py's handlers are installed by its own main only, so Ctrl-C in a test process stops pytest."""
    marker = tmp_path / "second-test-ran"
    (tmp_path / "test_long.py").write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import train

def test_long():
    train.main(["--dataset", {str(family)!r}, "--out", {str(tmp_path / "run")!r}, "--max-steps", "100000",
                "--logging-steps", "1", "--batch-size", "4", "--save-steps", "100000"])

def test_after():
    open({str(marker)!r}, "w").close()
""")
    # SIGINT as a terminal delivers it: a job started in the background by a script (`cmd &`, as CI may be run)
    # inherits SIGINT ignored, and a Python started so keeps ignoring it
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_long.py"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    said = wait_for_step(proc)
    proc.send_signal(signal.SIGINT)
    said += proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "KeyboardInterrupt" in said and not marker.exists(), said


# no output over another output or an input file; outputs where the flags say

def test_outputs_never_overwrite_each_other_or_an_input(mirror, tmp_path, monkeypatch, tokenizer):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    path = write_kaggle(tmp_path / "kaggle", tasks, {tid: [t["test"][0]["output"]] for tid, t in tasks.items()})
    solutions = tmp_path / "kaggle" / "x_solutions.json"
    before = solutions.read_bytes()
    for argv, said in ((["--out", str(run / "results.json")], "the submission and the results would both"),
                       (["--out", str(solutions)], "over an input file"),
                       (["--out", str(run / "config.json")], "over an input file")):
        message = error_of(infer.main, ["--dataset", path, "--model", str(run)] + argv)
        assert said in message and "\n" not in message, message
    assert solutions.read_bytes() == before and not (run / "submission.json").exists()
    infer.main(["--dataset", path, "--model", str(run)])
    message = error_of(infer.main, ["--dataset", path, "--score", str(run / "results.json")])
    assert "tasks missing" in message and read(run / "results.json")["score"] == 4


def test_out_limit_and_show_write_where_the_flags_say(mirror, tmp_path, monkeypatch, tokenizer, capsys):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run), "--out", str(tmp_path / "X")])
    assert sorted(p.name for p in (tmp_path / "X").iterdir() if p.name != "plots") == [  # no lock file left
        "results.json", "submission.cache.jsonl", "submission.json"]
    assert not (tmp_path / "X.json").exists() and not (tmp_path / "results.json").exists()
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(run), "--limit", "2"])
    out = capsys.readouterr().out
    assert "partial: --limit 2: 2 tasks only" in out and not (run / "submission.json").exists()
    assert sorted(read(run / "submission.limit-2.json")) == ["t0", "t1"] and (run / "results.limit-2.json").exists()
    monkeypatch.chdir(tmp_path)
    assets = sorted((ROOT / "assets").iterdir())
    data.main(["--dataset", folder, "--show", "t0"])
    assert (tmp_path / "show" / "t0.png").exists() and sorted((ROOT / "assets").iterdir()) == assets


# a finished run is never replaced without --overwrite

def test_train_refuses_a_finished_run_unless_overwrite(four_steps, family, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    before = (out / "config.json").read_bytes()
    message = error_of(train.main, ["--dataset", str(family), "--out", str(out), "--max-steps", "1"])
    assert "a finished run is already there" in message and "--overwrite" in message and "--resume" in message
    assert (out / "config.json").read_bytes() == before
    train.main(["--dataset", str(family), "--out", str(out), "--max-steps", "1", "--overwrite", "--save-steps", "1"])
    said = capsys.readouterr().out
    assert "overwrite: the finished run in" in said and "(the finished run this one replaced) deleted" in said, said
    assert json.loads((out / "config.json").read_text())["summary"]["steps"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]  # none of the old run's


# test-time adapters: keyed by the base run's weights and settings, one safe folder per task id

ODD_IDS = ["a/b", "a_b", "..", "x" * 300]


def test_ttt_adapters_are_keyed_by_the_base_weights_and_odd_ids_get_their_own_folders(family, tmp_path, capsys):
    """Also in infer.py: a base run trained further after --ttt makes its test-time run refuse, naming the command
    that trains the adapters again."""
    bases = [tmp_path / "base1", tmp_path / "base2"]
    for seed, base in enumerate(bases):
        train.main(["--dataset", str(family), "--max-steps", "1", "--batch-size", "4", "--out", str(base),
                    "--seed", str(seed)])
    files = sorted((family / "training").glob("*.json"))[:4]
    tasks = {tid: json.loads(f.read_text()) for tid, f in zip(ODD_IDS, files)}
    (tmp_path / "odd_challenges.json").write_text(json.dumps({t: data.strip_outputs(x) for t, x in tasks.items()}))
    ttt = ["--ttt", "--dataset", str(tmp_path / "odd_challenges.json"), "--out", str(tmp_path / "ttt"),
           "--epochs", "1", "--ttt-views", "1", "--batch-size", "4", "--max-steps", "1"]
    train.main(ttt + ["--model", str(bases[0])])
    folders = {tid: runs.ttt_folder(tmp_path / "ttt", tid, tasks[tid]) for tid in ODD_IDS}
    assert len(set(folders.values())) == 4 and all(f.is_dir() and f.parent == tmp_path / "ttt" / "ttt"
                                             for f in folders.values())
    message = error_of(train.main, ttt + ["--model", str(bases[1])])
    assert "trained with another base weights" in message and "--overwrite" in message
    capsys.readouterr()
    train.main(ttt + ["--model", str(bases[1]), "--overwrite"])
    assert "4 task adapters trained (0 already there" in capsys.readouterr().out
    message = error_of(train.main, ["--ttt", "--model", str(tmp_path / "ttt"), "--dataset", str(family),
                                    "--out", str(tmp_path / "ttt2")])
    assert "a test-time-trained run itself" in message and str(bases[1].resolve()) in message
    train.main(["--out", str(bases[1]), "--resume", "--max-steps", "2"])  # the base trained further
    message = error_of(infer.main, ["--model", str(tmp_path / "ttt"), "--dataset", str(tmp_path / "odd_challenges.json")])
    assert "test-time adapters were trained on" in message and "trained further" in message and \
        f"--out {tmp_path / 'ttt'} --overwrite" in message and "\n" not in message, message


# the cache: a bad line costs only its task; renaming the run folder keeps it

@pytest.mark.parametrize("damage", ["ragged", "huge_cell", "guesses_null", "task_id_list", "deep"])
def test_a_valid_json_cache_line_with_bad_content_costs_only_its_task(mirror, monkeypatch, tokenizer, capsys, damage):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    cache = run / "submission.cache.jsonl"
    lines = cache.read_text().splitlines()
    rec = json.loads(lines[1])
    if damage == "ragged":
        rec["guesses"][0][0] = [[1, 2], [3]]
    elif damage == "huge_cell":
        rec["guesses"][0][0] = [[10 ** 30]]
    elif damage == "guesses_null":
        rec["guesses"] = None
    elif damage == "task_id_list":
        rec["task_id"] = ["t1"]
    lines[1] = "[" * 100000 + "]" * 100000 if damage == "deep" else json.dumps(rec)
    cache.write_text("\n".join(lines) + "\n")
    again = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(run)])
    out = capsys.readouterr().out
    assert "damaged line 2" in out and "3 already done" in out and sum(map(len, again)) == 2, out
    assert read(run / "results.json")["score"] == 4


def test_a_renamed_or_copied_run_folder_keeps_its_cache(mirror, monkeypatch, tokenizer, tmp_path, capsys):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    best = tmp_path / "best"
    shutil.copytree(run, best)
    again = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(best)])
    assert "4 already done" in capsys.readouterr().out and again == []


# a full disk, a file-size limit, an unwritable HF_HOME: one line each, what was complete stays usable

def limit_file_size(limit):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_checkpoint_over_a_file_size_limit_is_one_line(family, tmp_path):
    """The tiny model's weights (about 2 MB) fit under a 3 MB limit, its optimizer state does not."""
    out = tmp_path / "run"
    proc = script("train.py", "--dataset", family, "--out", out, "--max-steps", 3, "--save-steps", 1,
                  "--batch-size", 4, preexec_fn=limit_file_size(3_000_000))
    said = proc.communicate(timeout=300)[0]
    last = said.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in said, said
    assert last.startswith(f"error: {out / 'checkpoints'}: cannot write it") and "ulimit -f" in last, last
    assert json.loads((out / "config.json").read_text())["summary"] is None  # still a resumable, unfinished run


def test_cache_append_over_a_file_size_limit_is_one_line_and_keeps_the_finished_tasks(mirror, tmp_path, monkeypatch,
                                                                                     tokenizer, capsys):
    tasks, folder, run = mirror
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import resource, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import decode, infer, models
infer.load_model = lambda run, cfg: (None, models.tiny_tokenizer())
decode.generate = lambda model, tok, prompts, cfg, fmt=None, **kw: ["junk"] * len(prompts)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
infer.main(["--dataset", {folder!r}, "--model", {str(run)!r}, "--batch-size", "2"])
""")
    p = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "submission.cache.jsonl: cannot write it (File too large); a file-size limit of 1,000 bytes" in p.stderr
    kept = len(infer.read_cache(run / "submission.cache.jsonl"))
    assert 0 < kept < 4
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(run)])
    assert f"{kept} already done" in capsys.readouterr().out


def test_unwritable_hf_home_for_the_smollm2_conversion_is_one_line(family, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HF_HOME", str(blocker / "hf"))
    monkeypatch.setattr(hub, "smollm2_gguf", lambda: Path("SmolLM2.gguf"))  # the package's file is not needed
    message = error_of(train.main, ["--dataset", str(family), "--model", "smollm2", "--out", str(tmp_path / "r")])
    assert "\n" not in message and "a-file" in message and "HF_HOME" in message, message


# a killed and resumed infer.py samples what one uninterrupted run samples

def test_killed_and_resumed_infer_equals_an_uninterrupted_run_byte_for_byte(tmp_path):
    rng = random.Random(8)
    tasks = {f"s{i}": mirror_task(rng, 2 + i % 3, 3) for i in range(24)}  # enough that a fast machine is caught
    folder, run = write_tasks(tmp_path / "tasks", tasks), tiny_run(tmp_path / "run")
    common = ["--dataset", folder, "--model", run, "--max-new-tokens", "30"]
    one, resumed = tmp_path / "one" / "submission.json", tmp_path / "resumed" / "submission.json"
    infer.main(common + ["--out", str(one), "--batch-size", "2"])
    proc = script("infer.py", *common, "--out", resumed, "--batch-size", "1")
    cache = resumed.with_suffix(".cache.jsonl")
    while proc.poll() is None and not (cache.exists() and cache.read_text().count("\n") >= 2):
        time.sleep(0.005)
    proc.kill()
    said = proc.communicate()[0]
    done = cache.read_text().count("\n")
    assert 0 < done < 24, said  # killed part way
    infer.main(common + ["--out", str(resumed), "--batch-size", "3"])  # other batches too
    assert resumed.read_bytes() == one.read_bytes()
    key = lambda path: sorted((r["task_id"], r["guesses"], r["status"], r["tokens"])  # noqa: E731
                              for r in map(json.loads, path.read_text().splitlines()))
    assert key(cache) == key(one.with_suffix(".cache.jsonl"))


# values that pass a `> 0` but are nonsense; a loss gone NaN stops training, keeping the last good checkpoint

def test_weights_gone_nan_stop_training_with_one_line_and_keep_the_last_good_checkpoint(family, tmp_path):
    out = tmp_path / "run"
    message = error_of(train.main, ["--dataset", str(family), "--out", str(out), "--max-steps", "6", "--save-steps",
                                    "1", "--batch-size", "4", "--lr", "1e30", "--warmup", "0"])
    assert "NaN or inf at step" in message and "last good checkpoint" in message and "\n" not in message, message
    good = Path(message.split("last good checkpoint is ")[1].split(":")[0])
    assert runs.checkpoint_problem(good) == "" and good == runs.checkpoints(out)[0]
    state = json.loads((good / "trainer_state.json").read_text())
    assert all(math.isfinite(log["loss"]) for log in state["log_history"] if "loss" in log)
    assert runs.run_status(out) == "unfinished" and not (out / "final").exists()


# deeply nested JSON: one skipped file in a folder, one line for a file

def test_deeply_nested_json_is_one_skipped_task(mirror, tmp_path, monkeypatch, tokenizer, capsys):
    tasks, folder, run = mirror
    (Path(folder) / "deep.json").write_text("[" * 100000 + "]" * 100000)
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    assert "deep.json: not valid JSON (nested too deeply)" in capsys.readouterr().err
    sub = read(run / "submission.json")
    assert sub["deep"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}] and read(run / "results.json")["score"] == 4
    message = error_of(data.main, ["--dataset", str(Path(folder) / "deep.json"), "--stats"])
    assert "nested too deeply" in message and "\n" not in message


# the minor ones

def test_duplicate_task_id_in_a_challenges_file_is_said(tmp_path, capsys):
    task = json.dumps({"train": [{"input": G, "output": G}], "test": [{"input": G, "output": G}]})
    (tmp_path / "dup_challenges.json").write_text('{"a": %s, "b": %s, "a": %s}' % (task, task, task))
    data.main(["--stats", "--dataset", str(tmp_path / "dup_challenges.json")])
    assert "key 'a' given twice in one object: only the last one is read" in capsys.readouterr().err


def test_utf8_json_is_read_under_an_ascii_locale(tmp_path):
    task = {"name": "carré — ünïcode", "train": [{"input": G, "output": G}], "test": [{"input": G, "output": G}]}
    (tmp_path / "t.json").write_text(json.dumps(task, ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    p = subprocess.run([sys.executable, "data.py", "--stats", "--dataset", str(tmp_path / "t.json")], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "1 tasks (0 skipped)" in p.stdout, p.stderr


def test_merge_ignored_is_said_no_blank_loss_plot_and_weights_are_0644(family, tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train.main(["--dataset", str(family), "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--merge"])
    finally:
        os.umask(old)
    said = capsys.readouterr().out
    assert "note: --merge ignored: a full fine-tune is a whole model already" in said
    assert "note: no loss.png: no loss was logged before training stopped at step 1" in said  # 15.6
    assert not (out / "loss.png").exists() and not (out / "merged").exists()
    assert (out / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_lora_run_without_its_base_folder_is_one_line(lora_run, mirror, tmp_path):
    _, folder, _ = mirror
    run = tmp_path / "lora"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "base")
    message = error_of(infer.main, ["--dataset", folder, "--model", str(run)])
    assert f"{run / 'base'}: missing" in message and "network" not in message and "\n" not in message


def test_plot_of_a_task_id_with_a_slash(tmp_path, monkeypatch, tokenizer):
    tasks = {"a/b": mirror_task(random.Random(11), 2, 3)}
    path = write_kaggle(tmp_path / "kaggle", tasks, {"a/b": [tasks["a/b"]["test"][0]["output"]]})
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    run = write_run(tmp_path / "run")
    infer.main(["--dataset", path, "--model", run, "--plot"])
    assert [p.name for p in (Path(run) / "plots").glob("a_b-*.png")] and (Path(run) / "plots" / "summary.png").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--epochs", "inf"), ("--seed", "-1"),
                                         ("--embedding-lr", "inf")])
def test_train_nonsense_value_stops_before_the_model(family, tmp_path, monkeypatch, flag, value):
    no_model(monkeypatch)
    message = error_of(train.main, ["--dataset", str(family), "--out", str(tmp_path / "r"), flag, value])
    assert message.startswith(f"error: {flag} {value}: must be") and "\n" not in message, message


@pytest.mark.parametrize("flag, value", [("--seed", "10000000000000000000000000"), ("--temperature", "inf"),
                                         ("--seed", "-1")])
def test_infer_nonsense_value_stops_before_the_model(mirror, monkeypatch, flag, value):
    _, folder, run = mirror
    no_model(monkeypatch)
    message = error_of(infer.main, ["--dataset", folder, "--model", str(run), flag, value])
    assert message.startswith(f"error: {flag} {value}: must be") and "model" not in message, message


# ----------------------------------------------------------------------------
# answers belong to a task's grids, not to its id

def test_a_task_changed_under_the_same_id_and_path_is_predicted_again(mirror, monkeypatch, tokenizer, capsys):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    fixed = dict(tasks, t1=mirror_task(random.Random(9), 3, 2))
    write_tasks(Path(folder), {"t1": fixed["t1"]})  # the user fixes t1's file
    again = fake_model(monkeypatch, tokenizer, right_answer(fixed, tokenizer))
    capsys.readouterr()
    infer.main(["--dataset", folder, "--model", str(run)])
    out = capsys.readouterr().out
    assert "3 already done" in out and "1 tasks are not for their grids now (first: t1;" in out, out
    assert sum(map(len, again)) == 2  # t1's two guesses only
    assert read(run / "submission.json")["t1"][0]["attempt_1"] == fixed["t1"]["test"][0]["output"]
    assert read(run / "results.json")["score"] == 4


# ----------------------------------------------------------------------------
# scoring a file: that file alone, its results under its own name; the [[0]] placeholder scored one way

def test_score_reads_the_file_alone_and_names_its_results_after_it(mirror, monkeypatch, tokenizer, tmp_path, capsys):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, lambda ids: "no idea")
    infer.main(["--dataset", folder, "--model", str(run)])
    infer.main(["--dataset", folder, "--model", str(run), "--limit", "2"])
    full = read(run / "results.json")
    infer.main(["--dataset", folder, "--limit", "2", "--score", str(run / "submission.limit-2.json")])
    assert read(run / "results.json") == full and read(run / "results.limit-2.json")["tasks"] == 2
    right = {tid: [{"attempt_1": t["test"][0]["output"], "attempt_2": [[0]]}] for tid, t in tasks.items()}
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(right))
    infer.main(["--dataset", folder, "--score", str(mine)])
    assert read(tmp_path / "results.mine.json")["score"] == 4
    (run / "submission.json").write_text(json.dumps(right))  # corrected by hand, the model's cache still beside it
    capsys.readouterr()
    infer.main(["--dataset", folder, "--score", str(run / "submission.json")])
    out = capsys.readouterr().out
    assert "| - | 4 | 4 | 4 | 4 | 0 |" in out and "official score: 4.00 / 4" in out, out
    assert read(run / "results.json")["solved_any"] == 4


def test_a_no_answer_placeholder_is_right_where_the_solution_is_0_in_every_count(mirror, monkeypatch, tokenizer,
                                                                                 tmp_path, capsys):
    tasks, _, run = mirror
    blank = {"train": tasks["t0"]["train"], "test": [{"input": [[5]], "output": [[0]]}]}
    folder = write_tasks(tmp_path / "blank", {"t0": tasks["t0"], "blank": blank})
    fake_model(monkeypatch, tokenizer, lambda ids: "no idea")
    infer.main(["--dataset", folder, "--model", str(run)])
    predicted = read(run / "results.json")
    infer.main(["--dataset", folder, "--score", str(run / "submission.json")])
    scored = read(run / "results.json")
    for r in (predicted, scored):
        assert (r["score"], r["solved_any"], r["solved_first"], r["unanswered"]) == (1, 1, 1, 4), r


# ----------------------------------------------------------------------------
# a run's own earlier outputs are not inputs

def test_base_and_adapter_with_the_default_out_runs_again_and_out_inside_the_dataset(lora_run, mirror, tmp_path,
                                                                                     monkeypatch, tokenizer, capsys):
    tasks, folder, run = mirror
    lora = tmp_path / "lora"
    shutil.copytree(lora_run, lora)
    argv = ["--dataset", folder, "--model", str(lora / "base"), "--adapter", str(lora / "final")]
    for _ in range(2):
        again = fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
        capsys.readouterr()
        infer.main(argv)
    assert "4 already done" in capsys.readouterr().out and again == []
    assert read(lora / "final" / "results.json")["score"] == 4
    inside = ["--dataset", folder, "--model", str(run), "--out", str(Path(folder) / "predictions")]
    infer.main(inside)
    infer.main(inside)
    assert read(Path(folder) / "predictions" / "results.json")["tasks"] == 4
    message = error_of(infer.main, ["--dataset", folder, "--model", str(run), "--out", folder])
    assert "read as a task" in message and "\n" not in message and not (Path(folder) / "submission.json").exists()


# ----------------------------------------------------------------------------
# shards: one model's slices only, and --limit with --shard merges

def test_shards_of_other_weights_are_not_merged_and_limited_shards_merge(mirror, monkeypatch, tokenizer):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    given = ["--dataset", folder, "--model", str(run)]
    infer.main(given + ["--shard", "0/2"])
    (run / runs.FINAL / "model.safetensors").write_bytes(b"weights v2")  # trained further between the shards
    infer.main(given + ["--shard", "1/2"])
    message = error_of(infer.main, given + ["--join-shards"])
    assert "shards 0/2 and 1/2 were predicted with other weights" in message and "\n" not in message, message
    assert not (run / "submission.json").exists()
    for i in range(2):
        infer.main(given + ["--limit", "3", "--shard", f"{i}/2"])
    infer.main(given + ["--limit", "3", "--join-shards"])
    assert sorted(read(run / "submission.limit-3.json")) == ["t0", "t1", "t2"]
    assert read(run / "results.limit-3.json")["score"] == 3


# ----------------------------------------------------------------------------
# guess modes side by side: each mode's outputs and cache have their own names

def test_a_second_guess_mode_on_a_predicted_run_keeps_both(mirror, monkeypatch, tokenizer):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    monkeypatch.setattr(infer, "completion_logprobs", lambda model, tok, p, c, batch_size=8: [-1.0] * len(p))
    given = ["--dataset", folder, "--model", str(run)]
    infer.main(given)
    writeup = read(run / "results.json")
    for mode in ("vote", "poe"):
        infer.main(given + ["--guesses", mode, "--views", "2"])
    assert read(run / "results.json") == writeup
    assert [read(run / f"results.{m}.json")["mode"] for m in ("vote", "poe")] == ["vote", "poe"]
    assert all((run / f"submission{m}.cache.jsonl").exists() for m in ("", ".vote", ".poe"))


def test_an_out_given_is_written_as_spelled_and_a_second_mode_never_overwrites_it(mirror, monkeypatch, tokenizer,
                                                                                   tmp_path):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    monkeypatch.setattr(infer, "completion_logprobs", lambda model, tok, p, c, batch_size=8: [-1.0] * len(p))
    given = ["--dataset", folder, "--model", str(run)]
    out = tmp_path / "working" / "submission.json"
    infer.main(given + ["--guesses", "poe", "--views", "2", "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json", "submission.cache.jsonl",
                                                            "submission.json"]
    assert read(out.parent / "results.json")["mode"] == "poe" and read(out.parent / "results.json")["score"] == 4
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    message = error_of(infer.main, given + ["--guesses", "vote", "--views", "2", "--out", str(out)])
    assert "is the --guesses poe submission" in message and "\n" not in message, message
    (out.parent / "results.json").unlink()  # the cache alone still refuses the second mode
    message = error_of(infer.main, given + ["--guesses", "vote", "--views", "2", "--out", str(out)])
    assert "guesses 'poe' now 'vote'" in message and "\n" not in message, message
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == {k: v for k, v in before.items()
                                                                       if k != "results.json"}
    infer.main(given + ["--guesses", "poe", "--views", "2", "--out", str(out)])  # the same mode resumes
    assert read(out.parent / "results.json")["score"] == 4
    infer.main(given + ["--guesses", "vote", "--views", "2"])  # the default output keeps naming each mode
    assert read(run / "results.vote.json")["mode"] == "vote" and not (run / "submission.json").exists()


# ----------------------------------------------------------------------------
# test-time adapters belong to a task's grids; tasks without one are named

@pytest.fixture(scope="module")
def ttt_run(four_steps, family, tmp_path_factory):
    """Per-task test-time adapters of 3 family tasks on the four_steps run, one step each."""
    out = tmp_path_factory.mktemp("ttt") / "run"
    train.main(["--ttt", "--model", str(four_steps), "--dataset", str(family), "--out", str(out), "--limit",
                "3", "--epochs", "1", "--ttt-views", "1", "--batch-size", "4", "--max-steps", "1"])
    return out


def adapter_loads(monkeypatch):
    """The folder names of the adapters infer.py loads, in order (safetensors' load_file watched)."""
    import safetensors.torch
    loaded, real = [], safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, *a, **k: (loaded.append(Path(path).parent.name),
                                                                             real(path, *a, **k))[1])
    return loaded


def test_a_task_with_other_grids_or_no_adapter_is_named_and_never_gets_another_tasks(ttt_run, family, tmp_path,
                                                                                    monkeypatch, capsys):
    run, tasks = tmp_path / "run", tmp_path / "tasks"
    shutil.copytree(ttt_run, run)
    files = sorted((family / "training").glob("*.json"))[:3]
    ids = [f.stem for f in files]
    tasks.mkdir()
    for f in files:
        shutil.copy(f, tasks / f.name)
    changed = json.loads(files[0].read_text())
    changed["train"][0] = {"input": [[1]], "output": [[2]]}  # other grids under the same id and path
    (tasks / files[0].name).write_text(json.dumps(changed))
    shutil.rmtree(next((run / runs.TTT).glob(f"{ids[1]}*")))  # as after a SIGTERM before its task
    loaded = adapter_loads(monkeypatch)
    capsys.readouterr()
    infer.main(["--model", str(run), "--dataset", str(tasks), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "2 of 3 tasks have no test-time adapter for their grids" in out and f"{ids[0]}, {ids[1]})" in out, out
    assert [name.split(".")[0] for name in loaded] == [ids[2]]  # the changed task's old adapter is not used
    assert read(run / "results.json")["no_adapter"] == ids[:2]


def test_identical_grids_under_two_ids_use_the_same_test_time_adapter(four_steps, family, tmp_path, monkeypatch,
                                                                       capsys):
    """train.py keeps identical grids once (the second id is an exact duplicate): its adapter serves both ids."""
    first, other = [json.loads(f.read_text()) for f in sorted((family / "training").glob("*.json"))[:2]]
    challenges = tmp_path / "twins_challenges.json"
    challenges.write_text(json.dumps({"twin-a": first, "twin-b": first, "other": other}))
    run = tmp_path / "ttt"
    train.main(["--ttt", "--model", str(four_steps), "--dataset", str(challenges), "--out", str(run), "--epochs", "1",
                "--ttt-views", "1", "--batch-size", "4", "--max-steps", "1"])
    assert len(list((run / runs.TTT).iterdir())) == 2  # one adapter per distinct grids
    loaded = adapter_loads(monkeypatch)
    capsys.readouterr()
    infer.main(["--model", str(run), "--dataset", str(challenges), "--max-new-tokens", "4"])
    assert "no test-time adapter" not in capsys.readouterr().out
    assert read(run / "results.json")["no_adapter"] == []
    twin = runs.ttt_folder(run, "twin-a", first).name
    assert loaded.count(twin) == 2 and len(loaded) == 3, loaded  # each task loads its adapter: twin-b twin-a's


# ----------------------------------------------------------------------------
# a finished run stays as it is: --resume with nothing left to do, --resume together with --overwrite

def files_of(folder):
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_resume_and_overwrite_together_are_refused_before_anything_is_touched(four_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    before = files_of(out)
    message = error_of(train.main, ["--out", str(out), "--resume", "--overwrite"])
    assert "--resume" in message and "--overwrite" in message and "\n" not in message, message
    assert files_of(out) == before


def test_overwrite_keeps_the_finished_run_until_its_replacement_finishes(four_steps, family, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    final = files_of(out / "final")
    diverges = ["--max-steps", "6", "--save-steps", "1", "--batch-size", "4", "--lr", "1e30", "--warmup", "0"]
    error_of(train.main, ["--dataset", str(family), "--out", str(out), "--overwrite"] + diverges)
    assert files_of(out / ".replaced" / "final") == final and runs.run_status(out) == "unfinished"
    error_of(train.main, ["--dataset", str(family), "--out", str(out), "--overwrite"] + diverges)
    assert files_of(out / ".replaced" / "final") == final  # an unfinished run is no replacement: still kept
    capsys.readouterr()
    train.main(["--dataset", str(family), "--out", str(out), "--overwrite", "--max-steps", "1", "--batch-size", "4"])
    assert "(the finished run this one replaced) deleted" in capsys.readouterr().out
    assert not (out / ".replaced").exists() and runs.run_status(out) == "finished"


def test_a_replacement_stopped_before_it_saved_anything_puts_the_finished_run_back(four_steps, family, tmp_path):
    """Ctrl-C once --overwrite has moved the finished run aside, before the first step: the run is back as it was."""
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    before = files_of(out)
    proc = script("train.py", "--dataset", family, "--out", out, "--overwrite", "--max-steps", 100000,
                  "--batch-size", 4, "--logging-steps", 1)
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith("overwrite: the finished run in"):
            break
    proc.send_signal(signal.SIGINT)
    said = "".join(said) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in said and "nothing to save" in said, said
    assert f"the finished run is back in {out}" in said and files_of(out) == before, said


def test_a_folder_holding_only_the_replaced_run_is_named_by_every_command_with_its_restore(four_steps, family,
                                                                                          tmp_path):
    """As a kill -9 between --overwrite's move and the first checkpoint leaves it: each command names .replaced/
    and the command that restores it, which gives the run back byte for byte."""
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    before = files_of(out)
    (out / runs.REPLACED).mkdir()
    for p in list(out.iterdir()):
        if p.name != runs.REPLACED:
            p.rename(out / runs.REPLACED / p.name)
    tasks = ["--dataset", str(family), "--split", "train"]
    messages = [error_of(infer.main, ["--model", str(out)] + tasks),
                error_of(train.main, ["--out", str(out)] + tasks + ["--max-steps", "1"]),
                error_of(train.main, ["--out", str(out), "--resume"]),
                error_of(train.main, ["--ttt", "--model", str(out), "--out", str(tmp_path / "ttt")] + tasks)]
    restore = f"mv {out / runs.REPLACED}/* {out}/ && rmdir {out / runs.REPLACED}"
    for message in messages:
        assert "\n" not in message and f"{out / runs.REPLACED} holds the finished run" in message, message
        assert f"restore it with `{restore}`" in message, message
    assert not (out / "config.json").exists()  # the refusals wrote nothing
    subprocess.run(restore, shell=True, check=True)
    assert files_of(out) == before and runs.run_status(out) == "finished"


@pytest.mark.parametrize("where", ["same", "inside", "dataset"])
def test_an_out_that_is_or_is_inside_an_input_is_refused_before_anything_moves(four_steps, family, tmp_path, where):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = files_of(run)
    argv = {"same": ["--ttt", "--model", str(run), "--out", str(run), "--dataset", str(family)],
            "inside": ["--ttt", "--model", str(run), "--out", str(run / "ttt-out"), "--dataset", str(family)],
            "dataset": ["--dataset", str(family), "--out", str(family / "training")]}[where]
    message = error_of(train.main, argv + ["--overwrite", "--max-steps", "1"])
    assert "\n" not in message and message.startswith(f"error: --out {argv[argv.index('--out') + 1]}: "), message
    assert "which train.py reads; give another --out" in message, message
    assert files_of(run) == before and not (run / runs.REPLACED).exists() and not (run / "ttt-out").exists()
    assert not (family / "training" / "config.json").exists()


@pytest.mark.parametrize("extra", [[], ["--max-steps", "4"], ["--max-steps", "3"]])
def test_resume_of_a_finished_run_without_more_steps_does_nothing(four_steps, tmp_path, capsys, extra):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    before = files_of(out)
    train.main(["--out", str(out), "--resume"] + extra)
    assert "already finished at step 4; nothing to do" in capsys.readouterr().out
    assert files_of(out) == before  # config.json's summary, final/ and the checkpoints byte for byte


# ----------------------------------------------------------------------------
# what a run was trained on accumulates over its resumes

def test_a_resume_on_other_data_adds_it_to_what_the_run_was_trained_on(four_steps, family, tmp_path):
    other = write_family(tmp_path / "other", n_train=3, n_eval=0, seed=5)
    out, argv = resume(four_steps, tmp_path, steps=5)
    train.main(argv + ["--dataset", str(other)])
    info = json.loads((out / "config.json").read_text())
    assert [(s["dataset"], s["split"]) for s in info["trained_on"]] == [(str(family), "train"), (str(other), "train")]
    first = set(json.loads((four_steps / "config.json").read_text())["fingerprints"])
    assert first < set(runs.read_run(out).fingerprints) and len(info["fingerprints"]) == len(first) + 3


# ----------------------------------------------------------------------------
# torchrun's variables left in the environment of a plain `python train.py`

LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "0")])
def test_torchrun_variables_left_in_the_environment_are_one_line(family, tmp_path, monkeypatch, name, value):
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(name, value)
    no_model(monkeypatch)
    message = error_of(train.main, ["--dataset", str(family), "--out", str(tmp_path / "r"), "--max-steps", "1"])
    assert f"{name}={value}" in message and f"unset {name}" in message and "\n" not in message, message
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------
# every count flag of train.py and infer.py is checked before any model loads

def int_flags(config):
    return [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(config) if f.type is int]


def test_every_count_flag_is_checked_before_the_model(family, mirror, tmp_path, monkeypatch):
    _, folder, run = mirror
    no_model(monkeypatch)
    for main, argv, flags in ((train.main, ["--dataset", str(family), "--out", str(tmp_path / "r")],
                               int_flags(train.Config)),
                              (infer.main, ["--dataset", folder, "--model", str(run)], int_flags(infer.Config))):
        for flag in flags:
            message = error_of(main, argv + [flag, "-5"])
            assert message.startswith(f"error: {flag} -5: must be"), message
    message = error_of(train.main, ["--ttt", "--dataset", str(family), "--out", str(tmp_path / "r"),
                                    "--ttt-views", "0"])
    assert message.startswith("error: --ttt-views 0: must be") and "\n" not in message, message


def test_a_dataset_name_too_long_for_a_file_is_one_line_in_every_script(family, tmp_path):
    import bench
    name = "x" * 300
    for main, argv in ((train.main, ["--out", str(tmp_path / "r")]), (infer.main, ["--model", str(tmp_path / "r")]),
                       (bench.main, ["--sections", "data", "--out", str(tmp_path / "b.json")])):
        message = error_of(main, argv + ["--dataset", name])
        assert "\n" not in message and "(300 characters): not a file or folder here (File name too long)" in message
    message = error_of(train.main, ["--dataset", str(family), "--val-dataset", name, "--out", str(tmp_path / "r")])
    assert "(300 characters)" in message and "\n" not in message
    assert not (tmp_path / "r" / "config.json").exists() and not (tmp_path / "b.json").exists()


def test_a_bad_val_split_names_val_split(family, tmp_path):
    message = error_of(train.main, ["--dataset", str(family), "--val-dataset", "family", "--val-split", "test",
                                    "--out", str(tmp_path / "r")])
    assert message == "error: --val-split test: family has the splits train, eval", message
    assert not (tmp_path / "r" / "config.json").exists()


# ----------------------------------------------------------------------------
# bench.py: a bad --dataset or --out is one line

def test_bench_bad_dataset_and_unwritable_out_are_one_line(tmp_path):
    import bench
    message = error_of(bench.main, ["--sections", "data", "--dataset", "no-such-set", "--out",
                                    str(tmp_path / "b.json")])
    assert "no-such-set" in message and "\n" not in message, message
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = error_of(bench.main, ["--sections", "data", "--dataset", "family", "--out", str(blocker / "b.json")])
    assert "a-file" in message and "cannot write" in message and "\n" not in message, message


# ----------------------------------------------------------------------------
# a signal: before the first step it ends the run at once; after, train.py saves and exits 128 + the signal

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_first_step_ends_the_run_at_once(family, tmp_path, signum, code):
    out = tmp_path / "run"
    proc = script("train.py", "--dataset", family, "--out", out, "--max-steps", 100000, "--batch-size", 4,
                  "--logging-steps", 1)
    said = []
    for line in proc.stdout:  # the model is not loaded yet
        said.append(line)
        if line.startswith("backend:"):
            break
    proc.send_signal(signum)
    said = "".join(said) + proc.communicate(timeout=120)[0]
    assert proc.returncode == code and "nothing to save" in said and "Traceback" not in said, said
    assert not any(line.startswith("step ") for line in said.splitlines()) and not (out / "checkpoints").exists()


def catches(pid, signum):
    """Whether process `pid` has a handler of its own for `signum` (/proc/PID/status's SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16) >> (signum - 1) & 1)


@pytest.mark.parametrize("name, signum", [("train.py", signal.SIGINT), ("infer.py", signal.SIGTERM),
                                          ("bench.py", signal.SIGINT)])
def test_a_signal_while_a_script_imports_its_modules_is_one_line(tmp_path, name, signum):
    """Ctrl-C or SIGTERM while a script's own imports load (numpy here, made to hang: a numpy.py that sleeps comes
    first on the path) ends with one line and 128 + the signal, not a KeyboardInterrupt traceback."""
    (tmp_path / "numpy.py").write_text("import time\ntime.sleep(120)\n")
    proc = script(name, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:  # its own handler is in place
        time.sleep(0.01)
    proc.send_signal(signum)
    said = proc.communicate(timeout=60)[0]
    stopped = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert proc.returncode == 128 + signum and said.strip() == f"{stopped}: stopped", said


def read_until(proc, start):
    """The process's output up to and including its first line that starts with `start`."""
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith(start):
            return "".join(said)
    raise AssertionError(f"no {start!r} line:\n" + "".join(said))


@pytest.mark.parametrize("name, at, signum", [("infer.py", "device:", signal.SIGINT),
                                              ("infer.py", "guesses:", signal.SIGINT),
                                              ("infer.py", "guesses:", signal.SIGTERM),
                                              ("bench.py", "machine:", signal.SIGINT),
                                              ("bench.py", "machine:", signal.SIGTERM)])
def test_a_signal_ends_infer_and_bench_in_one_line_with_128_plus_the_signal(tmp_path, name, at, signum):
    """As train.py: Ctrl-C (130) or SIGTERM (143) while the model loads ("device:" is printed before it) or while
    predicting ("guesses:" just before), or in a bench section, ends with one line and no traceback."""
    if name == "infer.py":
        tasks = write_family(tmp_path / "tasks", n_train=400, n_eval=0)  # seconds of predicting, on a fast machine too
        argv = ["--model", tiny_run(tmp_path / "run"), "--dataset", tasks, "--split", "train", "--max-new-tokens",
                400, "--out", tmp_path / "out" / "submission.json"]
    else:
        argv = ["--sections", "data", "--out", tmp_path / "bench.json"]
    proc = script(name, *argv)
    said = read_until(proc, at)
    cache = tmp_path / "out" / "submission.cache.jsonl"
    if at == "guesses:":  # inside prediction: once the first task is in the cache, with most still to do
        deadline = time.monotonic() + 120
        while not (cache.exists() and cache.read_text().strip()) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    proc.send_signal(signum)
    said += proc.communicate(timeout=120)[0]
    last = said.strip().splitlines()[-1]
    assert proc.returncode == 128 + signum and "Traceback" not in said and "KeyboardInterrupt" not in said, said
    stopped = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    if at == "guesses:":
        assert 0 < len(infer.read_cache(cache)) < 400, said
        assert last == f"{stopped}: {len(infer.read_cache(cache))} finished tasks are saved in {cache}; the same " \
                       "command again resumes", said
    else:
        assert last == f"{stopped}: stopped", said


def test_infer_without_a_finished_run_names_the_interrupted_one_and_its_resume(mirror, tmp_path, monkeypatch):
    _, folder, _ = mirror
    killed = Path(write_run(tmp_path / "runs" / "b-killed"))
    cli.write_json(killed / "config.json", dict(read(killed / "config.json"), summary=dict(steps=7, interrupted=True)))
    monkeypatch.chdir(tmp_path)
    message = error_of(infer.main, ["--dataset", folder])
    assert "runs/b-killed" in message and "interrupted at step 7" in message and "\n" not in message, message
    assert "python train.py --out runs/b-killed --resume" in message


# ----------------------------------------------------------------------------
# what a CPU run decides for the user: the context its data needs, what a real model would cost here

def test_auto_max_seq_len_is_what_the_data_needs_and_the_tiny_note_prices_smollm2(family, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--dataset", str(family), "--out", str(out), "--max-steps", "1", "--batch-size", "4"])
    said = capsys.readouterr().out
    assert "auto: max_seq_len 128 (the longest sequence is" in said, said  # the family's are about 120 tokens
    assert runs.read_run(out).max_seq_len == 128
    note = next(line for line in said.splitlines() if line.startswith("note: --model smollm2 on this CPU"))
    assert "estimate" in note and "tok/s" in note and "M tokens" in note, note


# ----------------------------------------------------------------------------
# nothing left behind in the repository: --show's pictures ignored by git, lock files gone at a clean exit

def test_show_pictures_and_lock_files_are_ignored_by_git_and_locks_go_at_a_clean_exit(mirror, monkeypatch, tokenizer,
                                                                                       four_steps):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    for path in ("show/007bbfb7.png", "runs/x/train.lock", "out/submission.cache.jsonl.lock"):
        assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0, path
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    assert (run / "submission.json").exists() and not list(run.glob("*.lock"))
    assert (four_steps / "config.json").exists() and not (four_steps / "train.lock").exists()
