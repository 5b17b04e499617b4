"""infer.py and train.py --ttt with --gpus N: N worker processes (on the CPU here, the code path of one process per
GPU) taking tasks from one queue give the submission, results and adapters of one process; a worker killed mid-task
costs only that task's retry (or the task, named, when it dies twice), nothing finished; one --time-budget holds
across the workers.

    python -m pytest tests/test_workers.py -q
"""
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import cli
import infer
import runs
import train
import workers
import data
import budget
from conftest import FMT, fake_model, mirror_task, read, tiny_run, write_family

TIMING = ("time_s", "generate_s", "tokens_per_s", "workers", "submission")  # what differs between two runs


# ----------------------------------------------------------------------------
# the queue itself, with jobs that need no model: a worker's start and its work, top-level so spawn can import them

def start_plain(slot, fail_on):
    if fail_on == "start":
        raise cli.OneLineError("no model here")
    return fail_on


def work_plain(fail_on, item, waiting):
    if item == fail_on:
        raise ValueError(f"cannot do {item}\nsecond line")
    return item, waiting, os.getpid()


def test_the_queue_hands_out_items_in_order_and_says_how_many_wait():
    done = []
    lost = workers.run(1, [None], start_plain, work_plain, (None,), ["d", "c", "b", "a"],
                       lambda item, result: done.append(result))
    assert lost == {} and [(item, waiting) for item, waiting, _ in done] == [("d", 4), ("c", 3), ("b", 2), ("a", 1)]
    assert len({pid for _, _, pid in done}) == 1 and done[0][2] != os.getpid()  # one process of its own


def test_a_worker_error_is_one_line_its_task_retried_once_then_given_up_and_the_rest_done(capfd):
    done = []
    lost = workers.run(2, [None, None], start_plain, work_plain, ("b",), ["a", "b", "c", "d"],
                       lambda item, result: done.append(item))
    err = capfd.readouterr().err
    assert sorted(done) == ["a", "c", "d"] and list(lost) == ["b"] and "cannot do b" in lost["b"]
    assert err.count("its worker died (cannot do b) on task b:") == 2 and "second line" not in err
    assert "back to the queue" in err and "given up, [[0]] in the submission" in err


def test_a_worker_that_cannot_start_stops_the_run_in_one_line():
    with pytest.raises(cli.OneLineError) as e:
        workers.run(2, [None, None], start_plain, work_plain, ("start",), ["a", "b"], lambda item, result: None)
    assert str(e.value).startswith("CPU worker ") and str(e.value).endswith(": no model here")


# ----------------------------------------------------------------------------
# infer.py and train.py --ttt over workers, on the tiny model

@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """A tiny model, 6 family tasks and their submission predicted by one process: (argv, folder of the outputs)."""
    root = tmp_path_factory.mktemp("workers")
    run, tasks = tiny_run(root / "run"), write_family(root / "family", n_train=0, n_eval=6)
    given = ["--model", run, "--dataset", str(tasks), "--split", "eval", "--max-new-tokens", "24"]
    infer.main(given + ["--out", str(root / "one" / "submission.json")])
    return given, root / "one"


def outputs(folder):
    """(submission, results without timings, cached Records by task) of an --out folder."""
    results = {k: v for k, v in read(folder / "results.json").items() if k not in TIMING}
    cache = infer.read_cache(folder / "submission.cache.jsonl")
    cached = {tid: (rec.guesses, rec.status) for tid, rec in cache.items()}
    return read(folder / "submission.json"), results, cached


def test_three_workers_give_one_process_outputs_and_a_killed_worker_loses_nothing(one, tmp_path, monkeypatch, capfd):
    given, reference = one
    submission = read(reference / "submission.json")
    victim = sorted(submission)[2]
    monkeypatch.setenv(workers.KILL_HOOK, f"{victim}:{tmp_path / 'killed'}")  # SIGKILL as it takes victim, once
    out = tmp_path / "three" / "submission.json"
    infer.main(given + ["--gpus", "3", "--device", "cpu", "--out", str(out)])
    said = capfd.readouterr()
    assert "workers: 3 processes, on the CPU (--gpus 3)" in said.out
    assert f"its worker died (killed by signal 9) on task {victim}: back to the queue" in said.err, said.err
    assert (tmp_path / "killed").exists()
    assert outputs(out.parent) == outputs(reference)
    assert read(out.parent / "results.json")["workers"] == 3


def test_a_task_whose_worker_dies_twice_is_named_and_the_same_command_resumes_it(one, tmp_path, monkeypatch, capfd):
    given, reference = one
    submission = read(reference / "submission.json")
    victim = sorted(submission)[0]
    monkeypatch.setenv(workers.KILL_HOOK, victim)  # every worker that takes it dies
    out = tmp_path / "two" / "submission.json"
    argv = given + ["--gpus", "2", "--device", "cpu", "--out", str(out)]
    infer.main(argv)
    said = capfd.readouterr()
    assert f"on task {victim}: back to the queue" in said.err and \
        f"on task {victim}: given up, [[0]] in the submission" in said.err, said.err
    assert f"given up: 1 tasks whose worker died twice, first: {victim}" in said.out
    sub, r = read(out), read(out.parent / "results.json")
    assert sub[victim] == [{"attempt_1": [[0]], "attempt_2": [[0]]}] * len(submission[victim])
    assert {t: a for t, a in sub.items() if t != victim} == {t: a for t, a in submission.items() if t != victim}
    assert list(r["worker_died"]) == [victim] and r["guess_status"]["worker_died"] == 2 * len(submission[victim])
    assert sorted(infer.read_cache(out.with_name("submission.cache.jsonl"))) == sorted(set(submission) - {victim})

    monkeypatch.delenv(workers.KILL_HOOK)
    infer.main(argv)  # the same command again: only the task given up is predicted, in this process (1 task)
    assert f"{len(submission) - 1} already done in" in capfd.readouterr().out
    (sub, r, cached), (sub1, r1, cached1) = outputs(out.parent), outputs(reference)
    assert (sub, cached) == (sub1, cached1) and r["per_task"] == r1["per_task"]


def test_one_time_budget_holds_across_the_workers(one, tmp_path, capfd):
    given, reference = one
    tasks = sorted(read(reference / "submission.json"))
    out = tmp_path / "budget" / "submission.json"
    # a second is spent before any worker has its model (a new process imports torch): the workers read the
    # command's deadline, so every task is cut, none predicted or cached, and the run still ends with a submission
    infer.main(given + ["--gpus", "2", "--device", "cpu", "--time-budget", "1", "--out", str(out)])
    said = capfd.readouterr().out
    r = read(out.parent / "results.json")
    assert "shared by the 2 workers" in said and f"cut by --time-budget: {len(tasks)} tasks" in said
    assert sorted(r["cut_by_budget"]) == tasks and r["generated_tokens"] == 0
    assert all(a == {"attempt_1": [[0]], "attempt_2": [[0]]} for t in tasks for a in read(out)[t])
    assert infer.read_cache(out.with_name("submission.cache.jsonl")) == {}
    infer.main(given + ["--out", str(out)])  # more time: the same outputs as one process given it all
    (sub, r, cached), (sub1, r1, cached1) = outputs(out.parent), outputs(reference)
    assert (sub, cached) == (sub1, cached1) and r["per_task"] == r1["per_task"]


def test_gpus_flag_values(one, tmp_path):
    given, _ = one
    for value in ("0", "two", "-1"):
        with pytest.raises(SystemExit) as e:
            infer.main(given + ["--gpus", value, "--out", str(tmp_path / "x.json")])
        assert f"--gpus {value}: must be auto, all or a number of processes >= 1" in str(e.value.code)
    assert not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def ttt_runs(one):
    """Per-task adapters of 3 tasks on the tiny run, trained by one process and by 2 workers: (argv, the two runs)."""
    given, reference = one
    base = Path(given[1])
    path = runs.run_config_path(base)  # the tiny run marked finished, as train.py leaves a run
    cli.write_json(path, dict(read(path), summary=dict(steps=1, interrupted=False)))
    ttt = ["--ttt", "--model", str(base), "--dataset", given[3], "--split", "eval", "--limit", "3",
           "--epochs", "1", "--ttt-views", "1", "--batch-size", "4", "--max-steps", "1"]
    alone, split = reference.parent / "ttt-one", reference.parent / "ttt-two"
    train.main(ttt + ["--out", str(alone)])
    train.main(ttt + ["--gpus", "2", "--device", "cpu", "--out", str(split)])
    return given, alone, split


def test_ttt_over_two_workers_trains_the_adapters_of_one_process(ttt_runs):
    import safetensors.torch
    _, alone, split = ttt_runs
    summary = read(runs.run_config_path(split))["summary"]
    assert summary["trained"] == 3 and summary["workers"] == 2 and summary["worker_died"] == {}
    folders = sorted(p.name for p in (alone / runs.TTT).iterdir())
    assert len(folders) == 3 and sorted(p.name for p in (split / runs.TTT).iterdir()) == folders
    for name in folders:
        a, b = (safetensors.torch.load_file(str(r / runs.TTT / name / "adapter_model.safetensors"))
                for r in (alone, split))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    assert {k: v["last_loss"] for k, v in summary["per_task"].items()} == \
        {k: v["last_loss"] for k, v in read(runs.run_config_path(alone))["summary"]["per_task"].items()}


@pytest.mark.parametrize("limit, gpus, started", [("3", "5", 3), ("1", "2", None)])
def test_ttt_starts_no_more_workers_than_tasks(ttt_runs, tmp_path, monkeypatch, limit, gpus, started):
    """--gpus N over fewer tasks starts one worker a task (as infer.py does); over one task it starts none: the
    task trains in this process, its adapter saved."""
    given, _, _ = ttt_runs
    asked = []
    monkeypatch.setattr(train, "train_on_workers", lambda cfg, setup, tasks, sources, key, n: asked.append(n))
    out = tmp_path / "ttt"
    train.main(["--ttt", "--model", given[1], "--dataset", given[3], "--split", "eval", "--limit", limit, "--epochs",
                "1", "--ttt-views", "1", "--batch-size", "4", "--max-steps", "1", "--gpus", gpus, "--device", "cpu",
                "--out", str(out)])
    assert asked == ([started] if started else [])
    if not started:
        assert len(list((out / runs.TTT).iterdir())) == 1


def test_infer_over_two_workers_puts_each_tasks_adapter_on(ttt_runs):
    given, alone, split = ttt_runs
    argv = given[2:] + ["--limit", "3"]
    infer.main(["--model", str(alone)] + argv)
    infer.main(["--model", str(split), "--gpus", "2", "--device", "cpu"] + argv)
    assert read(split / "submission.limit-3.json") == read(alone / "submission.limit-3.json")
    assert read(split / "results.limit-3.json")["no_adapter"] == []


def test_a_workers_share_of_the_budget_is_the_time_left_times_the_workers_over_the_tasks_waiting(monkeypatch, tmp_path,
                                                                                               tokenizer):
    tasks = {f"t{i}": mirror_task(random.Random(i), 2, 3) for i in range(2)}
    fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[5]], FMT))
    monkeypatch.setattr(infer, "forward_rates", lambda model, ids: (1e-4, 1e-3))  # the fake model has no forward pass
    seen, plan = [], budget.plan_task
    monkeypatch.setattr(infer, "plan_task", lambda budget, *a: seen.append((budget.end - a[-1], budget.tasks_left))
                        or plan(budget, *a))
    cfg = replace(infer.Config(), max_seq_len=2048, max_new_tokens=16)
    end = time.time() + 1000
    w = SimpleNamespace(model=None, tokenizer=tokenizer, fmt=FMT, cfg=cfg, use_adapter=None, todo=tasks,
                        cache_path=tmp_path / "submission.cache.jsonl", settings={}, n=2, budget=budget.Budget(end, 2))
    assert infer.worker_task(w, "t0", 5)[2] is False  # 5 tasks wait for 2 workers: predicted, not cut
    assert infer.worker_task(w, "t1", 1)[2] is False  # the last one
    (left0, shares0), (left1, shares1) = seen
    assert 990 < left1 <= left0 <= 1000 and (shares0, shares1) == (3, 1)  # its share: left / ceil(waiting / workers)
    assert sorted(infer.read_cache(w.cache_path)) == ["t0", "t1"]
