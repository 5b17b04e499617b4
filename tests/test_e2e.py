"""End to end through the real entry points: train.py trains the tiny model on a task family, infer.py
solves held-out tasks of that family and writes a valid, scored Kaggle submission."""
import json

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
