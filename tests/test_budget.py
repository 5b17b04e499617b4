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
import budget
import submit
from conftest import FMT, fake_model, mirror_task, read, write_run, write_tasks


def slow_model(monkeypatch, tokenizer, seconds):
    """The fake model answering [[5]] everywhere, each generate() call (a batch) made slow on purpose by `seconds`,
    its forward pass timed as half that per prompt (a task's 2 guesses: one batch); returns the batches it was
    given."""
    calls = fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[5]], FMT))
    monkeypatch.setattr(infer, "forward_rates", lambda model, ids: (seconds / 2 / len(ids), 0.0))
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
    built, build = [], infer.build_prompts
    monkeypatch.setattr(infer, "build_prompts", lambda tasks, *a, **k: (built.extend(tasks), build(tasks, *a, **k))[1])
    start = time.time()
    infer.main(["--dataset", folder, "--model", run, "--time-budget", "2"])
    wall, out = time.time() - start, capsys.readouterr().out
    assert wall <= 2 + 0.3 + 2.0  # the budget, one task, process overhead
    r, sub = read(Path(run) / "results.json"), read(Path(run) / "submission.json")
    submit.check_submission(sub, tasks, "submission")  # every task, the cut ones too
    cut = r["cut_by_budget"]
    assert 1 <= len(calls) and cut and len(calls) + len(cut) == len(tasks)  # one batch per task predicted
    # a task cut costs no prompt, but the first: its prompt's tokens priced it out of the time left (the cost model
    # reads them), and every task after it is cut at once
    assert sorted(built) == sorted(set(tasks) - set(cut[1:]))
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


def fake_rates(monkeypatch, tokenizer, view_s, score_s):
    """forward_rates replaced by rates at which a view of a 2 x 2 task costs `view_s` seconds and rescoring it
    `score_s` (task_load: the prompt's tokens, and an answer of the task's largest grid, 2 x 2, EOS included)."""
    answer = len(tokenizer.encode(data.format_completion([[0, 0], [0, 0]], FMT), add_special_tokens=False)) + 1

    def rates(model, ids):
        per_prompt = score_s / (len(ids) + answer)
        return per_prompt, (view_s - per_prompt * len(ids)) / answer
    monkeypatch.setattr(infer, "forward_rates", rates)


def test_a_short_share_costs_views_then_rescoring_task_by_task_and_each_says_so(tmp_path, monkeypatch, tokenizer,
                                                                               capsys):
    """poe, 8 views: a sample takes 1 s, scoring a (view, candidate) pair 0.5 s, so a task's full plan is 12 s; the
    forward pass measured before the first task says half that. In 9.3 s for 6 tasks the first is planned at those
    rates like the others: 2 views rescored fit its 1.55 s share (it takes 3 s); from then on the cost model has
    learned the real cost: the next three get 1.26-1.43 s, one view with no rescoring, the last two 1.65 s and 1.8 s,
    one rescored view. The command ends within the budget."""
    tasks = {f"d{i}": mirror_task(random.Random(i), 2, 2) for i in range(6)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    advance = fake_clock(monkeypatch)
    calls = fake_model(monkeypatch, tokenizer, lambda ids: (advance(1.0), data.format_completion([[0]], FMT))[1])
    fake_rates(monkeypatch, tokenizer, 0.5, 0.25)
    scored = []

    def logprobs(model, tok, prompts, completions, batch_size=8):
        scored.append(len(prompts))
        advance(0.5 * len(prompts))
        return [-1.0] * len(prompts)
    monkeypatch.setattr(infer, "completion_logprobs", logprobs)
    infer.main(["--dataset", folder, "--model", run, "--guesses", "poe", "--time-budget", "9.3s"])
    printed = capsys.readouterr()
    r = read(Path(run) / "results.poe.json")
    assert [len(batch) for batch in calls] == [2, 1, 1, 1, 1, 1] and scored == [2, 1, 1]
    end = 1000.0 + 9.3  # the fake clock's start + the budget
    shares = [(end - now) / left for now, left in ((1000.0, 6), (1003.0, 5), (1004.0, 4), (1005.0, 3), (1006.0, 2),
                                                   (1007.5, 1))]
    lost = {f"d{i}": f"{2 if i == 0 else 1} of 8 views" + ", no rescoring (candidates ranked by votes)" * (i in (1, 2, 3))
            + f": its share of --time-budget is {share:.1f} s, its full plan about {6.0 if i == 0 else 12.0} s"
            for i, share in enumerate(shares)}
    assert r["degraded"] == lost and r["cut_by_budget"] == [] and r["time_s"] == 9.0
    assert all(f"task {tid} degraded: {note}" in printed.out + printed.err for tid, note in lost.items())
    assert "time budget: a forward pass takes" in printed.out
    cached = infer.read_cache(Path(run) / "submission.poe.cache.jsonl")
    assert cached["d0"].candidates == [[[[[0]], 2, -2.0]]] and cached["d0"].degraded == lost["d0"]
    assert cached["d1"].candidates == [[[[[0]], 1, None]]] and cached["d1"].degraded == lost["d1"]  # votes only
    assert cached["d5"].candidates == [[[[[0]], 1, -1.0]]]
    assert all(read(Path(run) / "submission.poe.json")[tid][0]["attempt_1"] == [[0]] for tid in tasks)


def test_dfs_searches_stop_at_their_share_of_the_budget(tmp_path, monkeypatch, tokenizer, capsys):
    """Each view's search takes 1 s, the forward pass measured says 0.25 s; 2 tasks in 8.5 s: the first task, planned
    at 2 s for its 8 views, runs its searches up to its share (4.25 s), not to the --max-task-seconds of 30, and
    the note says which limit stopped them; the second is planned at the cost the first measured over the 5 views
    it searched, not the 8 it planned (5 s: 1 s a view, not 0.625), so 3 views fit its 3.5 s and it ends in time."""
    tasks = {f"s{i}": mirror_task(random.Random(i), 2, 2) for i in range(2)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    advance, deadlines = fake_clock(monkeypatch), []
    fake_rates(monkeypatch, tokenizer, 0.25, 0.1)

    def search(model, ids, eos, max_new_tokens, min_prob, allowed_ids=None, drafts=(), deadline=None, keep=None,
               speculate=None):
        deadlines.append(deadline)
        advance(1.0)
        return [], infer.time.time() <= deadline, 1

    def batch(model, searches, eos, min_prob, allowed, deadline, keep, speculate):  # in turn, to the first out of time
        out = []
        for ids, new, drafts in searches:
            out.append(search(model, ids, eos, new, min_prob, allowed, drafts, deadline, keep))
            if not out[-1][1]:
                return out
        return out
    monkeypatch.setattr(infer, "dfs_search", search)
    monkeypatch.setattr(infer, "dfs_batch", batch)
    fake_model(monkeypatch, tokenizer, lambda ids: pytest.fail("dfs generates nothing"))
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--max-task-seconds", "30",
                "--time-budget", "8.5"])
    printed = capsys.readouterr().out
    assert deadlines[:5] == [1004.25] * 5  # out of time in its 5th view
    assert "task s0 test 0: out of time (its --time-budget share of 4.2 s) in view 5 of 8" in printed
    r = read(Path(run) / "results.dfs.json")
    assert deadlines[5:] == [1008.5] * 3 and r["degraded"]["s1"].startswith("3 of 8 views:")
    assert r["cut_by_budget"] == [] and r["time_s"] == 8.0 and "s0" not in r["degraded"]
    assert "task s1 test 0: out of time" not in printed


@pytest.mark.parametrize("text, seconds", [("11h", 39600), ("90m", 5400), ("600s", 600), ("600", 600),
                                           ("1h30m", 5400), ("0", 0), ("", 0)])
def test_budget_reads_hours_minutes_and_seconds(text, seconds):
    assert budget.budget_seconds(text) == seconds


@pytest.mark.parametrize("value", ["-5", "abc", "1h30", "inf"])
def test_bad_budget_is_one_line_before_any_model_loads(tmp_path, monkeypatch, value):
    monkeypatch.setattr(infer, "load_model", lambda run, setup: pytest.fail("a model was loaded"))
    folder = write_tasks(tmp_path / "tasks", {"t": mirror_task(random.Random(0), 2, 2)})
    with pytest.raises(SystemExit) as e:
        infer.main(["--dataset", folder, "--model", write_run(tmp_path / "run"), "--time-budget", value])
    assert str(e.value) == f"error: --time-budget {value}: must be a duration such as 11h, 90m, 600s, 1h30m or " \
                           "seconds (0 = none)"


@pytest.mark.parametrize("spent", ["reading", "loading"])
def test_a_budget_spent_before_predicting_cuts_every_task_at_once_and_counts_the_writing(tmp_path, monkeypatch,
                                                                                         tokenizer, capsys, spent):
    """--time-budget 5 spent reading the tasks (then no model is loaded) or loading the model (6 s each): every
    task is cut at once, without building a prompt; results' time_s counts the writing after it (2 s here)."""
    tasks = {f"c{i}": mirror_task(random.Random(i), 2, 2) for i in range(4)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    advance, built = fake_clock(monkeypatch), []
    read_tasks, save = data.load_tasks, submit.save_submission
    if spent == "reading":
        monkeypatch.setattr(data, "load_tasks", lambda *a, **k: (advance(6.0), read_tasks(*a, **k))[1])
        monkeypatch.setattr(infer, "load_model", lambda run, setup: pytest.fail("a model was loaded"))
    else:
        monkeypatch.setattr(infer, "load_model", lambda run, setup: (advance(6.0), (None, tokenizer))[1])
    monkeypatch.setattr(infer, "build_prompts", lambda tasks, *a, **k: pytest.fail(f"prompts built for {list(tasks)}"))
    monkeypatch.setattr(infer, "save_submission", lambda *a, **k: (advance(2.0), save(*a, **k))[1])
    infer.main(["--dataset", folder, "--model", run, "--time-budget", "5"])
    r, sub = read(Path(run) / "results.json"), read(Path(run) / "submission.json")
    assert r["cut_by_budget"] == sorted(tasks) and all(sub[tid][0]["attempt_1"] == [[0]] for tid in tasks)
    assert r["time_s"] == 8.0 and "all spent before" in capsys.readouterr().out
