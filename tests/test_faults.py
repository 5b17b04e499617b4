"""Issue 10, faults a demanding user meets: half-written checkpoints, stale or damaged caches, unreadable tasks,
files without solutions, nonsense flags, unwritable outputs, damaged model folders, two processes on one --out.
Each test goes through the real entry points (train.main, infer.main, data.main).

    python -m pytest tests/test_faults.py -q
"""
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
import infer
import train
from families import write_family
from test_infer import FMT, fake_model, mirror_task, read, write_run, write_tasks

G = [[1, 2], [3, 4]]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), n_train=6, n_eval=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train.tiny_tokenizer()


def error_of(main, argv):
    """The message a script exits with (SystemExit), asserting it is `error: ...` lines and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert all(line.startswith("error: ") for line in message.splitlines()), message
    return message


# ----------------------------------------------------------------------------
# 1. resume past a half-written checkpoint; 7. train_loss over every step after a resume

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
    half_written = train.checkpoint_problem(newest) != ""  # usually: the kill lands in its torch.save
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
# 2. the infer cache belongs to the exact weights; a relative and an absolute path are one model

@pytest.fixture
def mirror(tmp_path):
    rng = random.Random(0)
    tasks = {f"t{i}": mirror_task(rng, 2, 3 + i) for i in range(4)}
    run = Path(write_run(tmp_path / "run"))
    (run / train.FINAL / "model.safetensors").write_bytes(b"weights v1")  # only fingerprinted: the model is faked
    return tasks, write_tasks(tmp_path / "tasks", tasks), run


def right_answer(tasks, tokenizer):
    """A fake model that answers every guess-1 prompt right."""
    answers = {}
    for task in tasks.values():
        for i, test in enumerate(task["test"]):
            ids = data.encode_prompt(tokenizer, data.format_prompt(data.strip_outputs(task), i, FMT))
            answers[tuple(ids)] = data.format_completion(test["output"], FMT)
    return lambda ids: answers.get(tuple(ids), "no idea")


def test_cache_of_other_weights_is_not_reused(mirror, monkeypatch, tokenizer):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, right_answer(tasks, tokenizer))
    infer.main(["--dataset", folder, "--model", str(run)])
    (run / train.FINAL / "model.safetensors").write_bytes(b"weights v2")  # train.py --resume trained it further
    message = error_of(infer.main, ["--dataset", folder, "--model", str(run)])
    assert "other weights" in message and "submission.cache.jsonl" in message


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
# 3. every task id of the input is in the submission; 7. a broken solutions file only stops scoring

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
# 4. a challenges file without solutions

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
    read_json = data.read_json
    monkeypatch.setattr(data, "read_json", lambda p: reads.append(p) or read_json(p))
    data.main(["--stats", "--dataset", str(path)])
    assert reads == [path] and capsys.readouterr().out.count("1 tasks (0 skipped)") == 1


# ----------------------------------------------------------------------------
# 5. every flag's range, before any model loads

TRAIN_FLAGS = [("--max-seq-len", "-5"), ("--limit-tasks", "-3"), ("--grad-accum", "-1"), ("--epochs", "0"),
               ("--views", "9"), ("--batch-size", "0"), ("--lr", "-1"), ("--warmup", "-1"),
               ("--optim", "nonsense"), ("--scheduler", "nonsense"), ("--max-steps", "0"), ("--lora-r", "0")]
INFER_FLAGS = [("--max-seq-len", "-5"), ("--max-new-tokens", "-5"), ("--temperature", "-1"), ("--limit", "-3"),
               ("--batch-size", "0"), ("--top-k", "-5")]


def no_model(monkeypatch):
    def load(*_):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(train, "load_model", load)
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
# 6. one line instead of a traceback: unwritable --out, damaged model folders, damaged caches

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
    tok = train.tiny_tokenizer()
    model = train.tiny_model(tok, hidden=32, layers=1)
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
# 7. smaller: --score leaves its file alone, files are 0644, --out FOLDER, one infer.py per --out

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
    assert read(tmp_path / "sub" / "results.json")["score"] == 4


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
