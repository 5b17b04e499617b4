"""infer.py --time-budget: the whole command fits its budget (plus about one task), every task is in the submission,
the tasks cut are named and predicted by a rerun, and a task whose share is short gives up views, then rescoring,
and says so; bad values are one line before any model loads.

    python -m pytest tests/test_budget.py -q
"""
import random
import time
import types
from pathlib import Path

import pytest

import data
import decode
import infer
import submit
from conftest import FMT, fake_model, mirror_task, read, write_run, write_tasks


def slow_model(monkeypatch, tokenizer, seconds):
    """The fake model answering [[5]] everywhere, each generate() call (a batch) made slow on purpose by `seconds`;
    returns the batches it was given."""
    calls = fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[5]], FMT))
    fast = decode.generate

    def generate(*args, **kw):
        time.sleep(seconds)
        return fast(*args, **kw)
    monkeypatch.setattr(decode, "generate", generate)
    return calls


def fake_clock(monkeypatch, start=1000.0):
    """infer.py's clock replaced by one that moves only when advance(seconds) is called: a model whose every step
    takes a known time, so the planner's choices are exact."""
    now = [start]
    monkeypatch.setattr(infer, "time", types.SimpleNamespace(time=lambda: now[0]))

    def advance(seconds):
        now[0] += seconds
    return advance


def test_budget_cuts_what_it_cannot_fit_names_it_and_a_rerun_predicts_only_that(tmp_path, monkeypatch, tokenizer,
                                                                                 capsys):
    tasks = {f"b{i}": mirror_task(random.Random(i), 2, 3) for i in range(12)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    calls = slow_model(monkeypatch, tokenizer, 0.3)  # a task (its 2 guesses in one batch): 0.3 s, all 12: 3.6 s
    start = time.time()
    infer.main(["--dataset", folder, "--model", run, "--time-budget", "2"])
    wall, out = time.time() - start, capsys.readouterr().out
    assert wall <= 2 + 0.3 + 2.0  # the budget, one task, process overhead
    r, sub = read(Path(run) / "results.json"), read(Path(run) / "submission.json")
    submit.check_submission(sub, tasks, "submission")  # every task, the cut ones too
    cut = r["cut_by_budget"]
    assert 1 <= len(calls) and cut and len(calls) + len(cut) == len(tasks)  # one batch per task predicted
    assert f"cut by --time-budget: {len(cut)} tasks, first: {', '.join(cut[:5])}:" in out
    assert all((sub[tid][0]["attempt_1"] == [[0]]) == (tid in cut) for tid in tasks)  # cut: the placeholder
    assert r["guess_status"]["cut_by_budget"] == 2 * len(cut) and r["time_budget"] == "2"
    cached = infer.read_cache(Path(run) / "submission.cache.jsonl")
    assert set(cached) == set(tasks) - set(cut)

    calls.clear()
    infer.main(["--dataset", folder, "--model", run])
    assert f"{len(tasks) - len(cut)} already done in" in capsys.readouterr().out
    assert sum(map(len, calls)) == 2 * len(cut)  # the cut tasks' 2 guesses each, nothing else
    sub = read(Path(run) / "submission.json")
    assert all(sub[tid][0]["attempt_1"] != [[0]] for tid in tasks)
    assert "cut_by_budget" not in read(Path(run) / "results.json")
    infer.main(["--dataset", folder, "--score", str(Path(run) / "submission.json"), "--time-budget", "2"])
    assert "note: --time-budget 2: not used by --score (nothing is predicted)" in capsys.readouterr().out


def test_a_short_share_costs_views_then_rescoring_task_by_task_and_each_says_so(tmp_path, monkeypatch, tokenizer,
                                                                               capsys):
    """poe, 8 views: a sample takes 1 s, scoring a (view, candidate) pair 0.5 s, so a task's full plan is 12 s.
    In 18 s for 6 tasks the first runs in full (nothing measured yet), the next three get 1.2-1.3 s: one view, no
    rescoring; the last two get 1.5 s, exactly one rescored view. The command ends at the budget."""
    tasks = {f"d{i}": mirror_task(random.Random(i), 2, 2) for i in range(6)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    advance = fake_clock(monkeypatch)
    calls = fake_model(monkeypatch, tokenizer, lambda ids: (advance(1.0), data.format_completion([[0]], FMT))[1])
    scored = []

    def logprobs(model, tok, prompts, completions, batch_size=8):
        scored.append(len(prompts))
        advance(0.5 * len(prompts))
        return [-1.0] * len(prompts)
    monkeypatch.setattr(infer, "completion_logprobs", logprobs)
    infer.main(["--dataset", folder, "--model", run, "--guesses", "poe", "--time-budget", "18s"])
    printed = capsys.readouterr()
    r = read(Path(run) / "results.poe.json")
    assert [len(batch) for batch in calls] == [8, 1, 1, 1, 1, 1] and scored == [8, 1, 1]
    lost = {tid: "1 of 8 views" + ", no rescoring (candidates ranked by votes)" * (tid in ("d1", "d2", "d3"))
            + f": its share of --time-budget is {share} s, its full plan about 12.0 s"
            for tid, share in zip(["d1", "d2", "d3", "d4", "d5"], ["1.2", "1.2", "1.3", "1.5", "1.5"])}
    assert r["degraded"] == lost and r["cut_by_budget"] == [] and r["time_s"] == 18.0
    assert all(f"task {tid} degraded: {note}" in printed.out + printed.err for tid, note in lost.items())
    cached = infer.read_cache(Path(run) / "submission.poe.cache.jsonl")
    assert cached["d0"].candidates == [[[[[0]], 8, -8.0]]] and cached["d0"].degraded == ""
    assert cached["d1"].candidates == [[[[[0]], 1, None]]] and cached["d1"].degraded == lost["d1"]  # votes only
    assert cached["d5"].candidates == [[[[[0]], 1, -1.0]]]
    assert all(read(Path(run) / "submission.poe.json")[tid][0]["attempt_1"] == [[0]] for tid in tasks)


def test_dfs_searches_stop_at_their_share_of_the_budget(tmp_path, monkeypatch, tokenizer, capsys):
    """Each view's search takes 1 s; 2 tasks in 8 s: the first task's searches end at its share (4 s), not at the
    --max-task-seconds of 30, and the note says which limit stopped them."""
    tasks = {f"s{i}": mirror_task(random.Random(i), 2, 2) for i in range(2)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    advance, deadlines = fake_clock(monkeypatch), []

    def search(model, ids, eos, max_new_tokens, min_prob, allowed_ids=None, drafts=(), deadline=None, keep=None):
        deadlines.append(deadline)
        advance(1.0)
        return [], infer.time.time() <= deadline, 1
    monkeypatch.setattr(infer, "dfs_search", search)
    fake_model(monkeypatch, tokenizer, lambda ids: pytest.fail("dfs generates nothing"))
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--max-task-seconds", "30",
                "--time-budget", "8"])
    printed = capsys.readouterr().out
    assert deadlines[:5] == [1004.0] * 5  # out of time in its 5th view
    assert "task s0 test 0: out of time (its --time-budget share of 4.0 s) in view 5 of 8" in printed
    r = read(Path(run) / "results.dfs.json")
    assert set(deadlines[5:]) == {1008.0} and r["degraded"]["s1"].startswith("4 of 8 views:")
    assert r["cut_by_budget"] == [] and r["time_s"] == 9.0  # the budget and one view: within one task's share


@pytest.mark.parametrize("text, seconds", [("11h", 39600), ("90m", 5400), ("600s", 600), ("600", 600),
                                           ("1h30m", 5400), ("0", 0), ("", 0)])
def test_budget_reads_hours_minutes_and_seconds(text, seconds):
    assert infer.budget_seconds(text) == seconds


@pytest.mark.parametrize("value", ["-5", "abc", "1h30", "inf"])
def test_bad_budget_is_one_line_before_any_model_loads(tmp_path, monkeypatch, value):
    monkeypatch.setattr(infer, "load_model", lambda run, setup: pytest.fail("a model was loaded"))
    folder = write_tasks(tmp_path / "tasks", {"t": mirror_task(random.Random(0), 2, 2)})
    with pytest.raises(SystemExit) as e:
        infer.main(["--dataset", folder, "--model", write_run(tmp_path / "run"), "--time-budget", value])
    assert str(e.value) == f"error: --time-budget {value}: must be a duration such as 11h, 90m, 600s, 1h30m or " \
                           "seconds (0 = none)"
