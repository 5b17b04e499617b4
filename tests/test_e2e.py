"""End to end through the real entry points: train.py trains the tiny model on a task family, infer.py
solves held-out tasks of that family and writes a valid, scored Kaggle submission."""
import json

import pytest

import data
import infer
import submit
import train


def test_tiny_model_learns_a_task_family_and_solves_held_out_tasks(tmp_path, capsys):
    run = tmp_path / "run"  # --dataset family: data.colour_family, 300 train and 30 held-out eval tasks
    with capsys.disabled():  # the suite's longest test shows its progress lines as they come
        train.main(["--dataset", "family", "--split", "train", "--max-steps", "500", "--out", str(run),
                    "--logging-steps", "50"])
    info = json.loads((run / "config.json").read_text())
    losses = [loss for _, loss in info["summary"]["losses"]]
    assert losses[-1] < losses[0] / 4, losses  # loss falls

    with capsys.disabled():
        infer.main(["--model", str(run), "--dataset", "family", "--split", "eval"])
    results = json.loads((run / "results.json").read_text())
    submission = json.loads((run / "submission.json").read_text())
    assert info["summary"]["steps"] == 500 and results["tasks"] == 30 == len(submission)
    assert all(len(entries) == 1 and {"attempt_1", "attempt_2"} <= set(entries[0]) for entries in submission.values())
    assert results["score"] >= 0.9 * 30, results["score"]
    assert results["solved_first"] >= 24 and results["solved_second"] >= 24  # both guesses, transposed undone

    # depth-first search on the same run: every answer above 0.1 in 4 views, ranked by product of experts
    out = run / "dfs" / "submission.json"
    with capsys.disabled():
        infer.main(["--model", str(run), "--dataset", "family", "--split", "eval", "--guesses", "dfs", "--views", "4",
                    "--out", str(out)])
    results = json.loads(out.with_name("results.json").read_text())  # an --out given is written as spelled
    submission = json.loads(out.read_text())
    submit.check_submission(submission, data.load_tasks("family", "eval")[0], "dfs submission")  # every task
    assert results["mode"] == "dfs" and results["tasks"] == 30 == len(submission)
    assert results["score"] >= 0.9 * 30, results["score"]

    # the views searched one at a time, not in one batch: the same answers, votes and scores
    alone = run / "dfs-alone" / "submission.json"
    infer.main(["--model", str(run), "--dataset", "family", "--split", "eval", "--guesses", "dfs", "--views", "4",
                "--dfs-batch", "1", "--out", str(alone)])
    assert alone.read_bytes() == out.read_bytes()
    batched, one = (infer.read_cache(f.with_name("submission.cache.jsonl")) for f in (out, alone))
    grids = lambda c: [[(g, v) for g, v, _ in test] for test in c.candidates]  # noqa: E731
    assert all(grids(batched[tid]) == grids(one[tid]) for tid in submission)
    assert [s for tid in submission for test in batched[tid].candidates for *_, s in test] == pytest.approx(
        [s for tid in submission for test in one[tid].candidates for *_, s in test], rel=1e-4)
    assert sum(len(test) for c in batched.values() for test in c.candidates) >= 30
