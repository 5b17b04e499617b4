"""infer.py: scores match a hand count, every guess lands in a complete Kaggle submission (garbage included), the
transposed guess is transposed back, a killed run resumes without redoing tasks, shards merge to the single run,
and a real tiny model runs end to end on CPU.

    python -m pytest tests/test_infer.py -q
"""
import dataclasses
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

import cli
import data
import decode
import infer
import models
import submit
from conftest import FMT, fake_model, mirror_task, read, tiny_run, write_run, write_tasks

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def mirror(tmp_path):
    rng = random.Random(0)
    tasks = {"t0": mirror_task(rng, 2, 3, tests=2), "t1": mirror_task(rng, 3, 4), "t2": mirror_task(rng, 1, 5, tests=3),
             "t3": mirror_task(rng, 4, 2), "t4": mirror_task(rng, 2, 5)}
    return tasks, write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")


# ----------------------------------------------------------------------------

def test_score_matches_hand_count_with_multi_test_tasks(tmp_path):
    a, b, c, d = [[1, 2]], [[3], [4]], [[5, 5], [6, 6]], [[7]]
    wrong = [[9, 9, 9]]
    tasks = {"A": {"train": [{"input": [[0]], "output": [[0]]}], "test": [{"input": [[0]], "output": a},
                                                                          {"input": [[0]], "output": b}]},
             "B": {"train": [{"input": [[0]], "output": [[0]]}], "test": [{"input": [[0]], "output": c}]},
             "C": {"train": [{"input": [[0]], "output": [[0]]}], "test": [{"input": [[0]], "output": a},
                                                                          {"input": [[0]], "output": b},
                                                                          {"input": [[0]], "output": d}]},
             "D": {"train": [{"input": [[0]], "output": [[0]]}], "test": [{"input": [[0]], "output": d}]}}
    sub = {"A": [{"attempt_1": wrong, "attempt_2": a}, {"attempt_1": [[4], [3]], "attempt_2": [[0]]}],  # 1/2
           "B": [{"attempt_1": c, "attempt_2": [[0]]}],                                               # 1
           "C": [{"attempt_1": a, "attempt_2": wrong}, {"attempt_1": wrong, "attempt_2": b},           # 2/3
                 {"attempt_1": wrong, "attempt_2": [[0]]}],
           "D": [{"attempt_1": [[0]], "attempt_2": [[0]]}]}                                           # 0, unanswered
    r = submit.score(tasks, sub)
    assert r["score"] == pytest.approx(0.5 + 1 + 2 / 3)
    assert r["score_pct"] == pytest.approx(100 * (0.5 + 1 + 2 / 3) / 4)  # a percent
    assert (r["tasks"], r["predicted"], r["solved_any"], r["solved_first"], r["solved_second"]) == (4, 3, 1, 1, 0)
    assert (r["test_inputs"], r["guesses"], r["unanswered"]) == (7, 14, 5)
    # right size: A a, A [[4],[3]] (0 of 2 pixels), B c, C a, C b -> 5 of 14; pixels 1 + 0 + 1 + 1 + 1 = 4
    assert r["correct_size"] == pytest.approx(5 / 14)
    assert r["correct_pixels"] == pytest.approx(4 / 14)

    short = dict(sub, C=sub["C"][:2])  # C's third test input missing, D's task missing altogether
    del short["D"]
    r = submit.score(tasks, short)
    assert r["score"] == pytest.approx(0.5 + 1 + 2 / 3) and r["scored"] == 4  # scored wrong, not skipped
    assert (r["test_inputs"], r["guesses"], r["unanswered"]) == (7, 14, 6)  # C's missing input: 2 more, D: 2 as before

    folder = tmp_path / "tasks"
    write_tasks(folder, tasks)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "submission.json").write_text(json.dumps(sub))
    infer.main(["--dataset", str(folder), "--score", str(tmp_path / "sub" / "submission.json")])
    results = read(tmp_path / "sub" / "results.json")
    assert results["score"] == pytest.approx(0.5 + 1 + 2 / 3)
    assert [results[k] for k in ("tasks", "predicted", "solved_any", "solved_first", "solved_second")] == [4, 3, 1, 1, 0]


@pytest.mark.parametrize("content", ['{"A": [[1, 2]]}', '[1, 2]', '{"A": [{"attempt_1": [[1]]}]}', "not json"])
def test_score_rejects_a_non_kaggle_file_with_one_line(tmp_path, mirror, content):
    _, folder, _ = mirror
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        infer.main(["--dataset", folder, "--score", str(bad)])
    message = str(e.value.code)
    assert message.startswith("error: ") and str(bad) in message and "\n" not in message


def test_score_cli_exits_nonzero_without_traceback(tmp_path, mirror):
    _, folder, _ = mirror
    bad = tmp_path / "bad.json"
    bad.write_text('{"t0": "nope"}')
    p = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--dataset", folder, "--score", str(bad)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0
    assert p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_no_trained_run_is_a_clean_error(tmp_path, monkeypatch, mirror):
    _, folder, _ = mirror
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        infer.main(["--dataset", folder])
    assert str(e.value.code).startswith("error: no trained run")


def test_garbage_model_gives_complete_valid_submission_all_unanswered(tmp_path, monkeypatch, tokenizer, mirror):
    tasks, folder, run = mirror
    junk = ["", "hello", "12\n3\nend", "123\n456", "1x1\nend", "out\nin", "end"]
    calls = fake_model(monkeypatch, tokenizer, lambda ids: junk[len(ids) % len(junk)])
    infer.main(["--dataset", folder, "--model", run, "--batch-size", "3"])
    sub = read(Path(run) / "submission.json")
    submit.check_submission(sub, tasks, "submission")  # every task, every test input, valid grids
    assert all(e == {"attempt_1": [[0]], "attempt_2": [[0]]} for entries in sub.values() for e in entries)
    r = read(Path(run) / "results.json")
    n_tests = sum(len(t["test"]) for t in tasks.values())
    assert (r["tasks"], r["predicted"], r["unanswered"], r["score"]) == (5, 0, 2 * n_tests, 0)
    assert sum(len(b) for b in calls) == 2 * n_tests and max(len(b) for b in calls) == 3  # batched, not one by one


def test_transposed_guess_is_transposed_back(tmp_path, monkeypatch, tokenizer, mirror):
    tasks, folder, run = mirror
    answers = {}  # prompt of the transposed task -> its right answer (transposed), as the model would write it
    for task in tasks.values():
        view = data.view_task(data.strip_outputs(task), 4)
        for i, test in enumerate(task["test"]):
            ids = models.encode_prompt(tokenizer, data.format_prompt(view, i, FMT))
            answers[tuple(ids)] = data.format_completion(data.dihedral(test["output"], 4), FMT)
    fake_model(monkeypatch, tokenizer, lambda ids: answers.get(tuple(ids), "no idea"))
    infer.main(["--dataset", folder, "--model", run])
    r = read(Path(run) / "results.json")
    assert (r["score"], r["solved_second"], r["solved_first"], r["solved_any"]) == (5, 5, 0, 5)
    sub = read(Path(run) / "submission.json")
    assert all(e["attempt_1"] == t["output"] and e["attempt_2"] == [[0]]  # the one answer moves up to attempt 1
               for tid, task in tasks.items() for e, t in zip(sub[tid], task["test"]))


def test_killed_run_resumes_without_redoing_finished_tasks(tmp_path, monkeypatch, tokenizer):
    rng = random.Random(1)
    # square grids of different sizes: a task's two guesses have the same length and share one batch of 2
    tasks = {f"k{n}": mirror_task(rng, n, n) for n in range(2, 7)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    answer = lambda ids: data.format_completion([[len(ids) % 10]], FMT)  # noqa: E731

    def dies_on_third_call(model, tok, prompts, cfg, fmt=None, min_new_tokens=0, **kw):
        calls.append(prompts)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return [answer(p) for p in prompts]
    calls = []
    monkeypatch.setattr(infer, "load_model", lambda run, cfg: (None, tokenizer))
    monkeypatch.setattr(decode, "generate", dies_on_third_call)
    with pytest.raises(RuntimeError):
        infer.main(["--dataset", folder, "--model", run, "--batch-size", "2"])
    cache = Path(run) / "submission.cache.jsonl"
    finished = {json.loads(line)["task_id"] for line in cache.read_text().splitlines()}
    assert finished == {"k6", "k5"}  # longest first; the third batch died
    with open(cache, "a") as f:
        f.write('{"task_id": "k4", "gues')  # killed in the middle of writing a line

    again = fake_model(monkeypatch, tokenizer, answer)
    infer.main(["--dataset", folder, "--model", run, "--batch-size", "2"])
    redone = {p for batch in again for p in map(tuple, batch)}
    assert len(redone) == 2 * 3  # the 3 unfinished tasks x 2 guesses, nothing of k5, k6
    assert all(len(p) < min(len(q) for q in map(tuple, calls[0])) for p in redone)
    sub = read(Path(run) / "submission.json")
    submit.check_submission(sub, tasks, "submission")
    assert all(e["attempt_1"] != [[0]] for entries in sub.values() for e in entries)


def test_shards_merge_to_the_same_submission_as_one_run(tmp_path, monkeypatch, tokenizer, mirror):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[len(ids) % 10, sum(ids) % 10]], FMT))
    single, sharded = tmp_path / "single" / "submission.json", tmp_path / "sharded" / "submission.json"
    infer.main(["--dataset", folder, "--model", run, "--out", str(single)])
    for shard in ("0/2", "1/2"):
        infer.main(["--dataset", folder, "--model", run, "--out", str(sharded), "--shard", shard])
    assert set(read(sharded.with_name("submission.shard-0-of-2.json"))) == {"t0", "t2", "t4"}
    infer.main(["--dataset", folder, "--model", run, "--out", str(sharded), "--join-shards"])
    assert sharded.read_bytes() == single.read_bytes()
    one, merged = read(single.with_name("results.json")), read(sharded.with_name("results.json"))
    assert all(one[k] == merged[k] for k in ("score", "predicted", "solved_any", "solved_first", "unanswered"))


def test_task_too_long_is_listed_and_still_in_the_submission(tmp_path, monkeypatch, tokenizer):
    rng = random.Random(2)
    tasks = {"small": mirror_task(rng, 2, 3), "huge": mirror_task(rng, 30, 30)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run", max_seq_len=1500)
    fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[1]], FMT))
    infer.main(["--dataset", folder, "--model", run])
    sub, r = read(Path(run) / "submission.json"), read(Path(run) / "results.json")
    assert sub["huge"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}] and sub["small"][0]["attempt_1"] == [[1]]
    assert len(r["skipped"]) == 2 and all(s.startswith("task huge") and "max_seq_len 1500" in s for s in r["skipped"])
    assert r["guess_status"] == {"ok": 2, "too_long": 2}


def test_real_tiny_model_on_cpu_writes_a_complete_submission(tmp_path, monkeypatch):
    rng = random.Random(3)
    tasks = {f"s{i}": mirror_task(rng, 3, 3, tests=1 + (i == 0)) for i in range(3)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), tiny_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # "runs/" not needed: --model names the run
    infer.main(["--dataset", folder, "--model", run, "--max-new-tokens", "24", "--batch-size", "4", "--plot"])
    sub, r = read(Path(run) / "submission.json"), read(Path(run) / "results.json")
    submit.check_submission(sub, tasks, "submission")
    assert r["tasks"] == 3 and r["guesses"] == 8 and r["generated_tokens"] > 0
    assert sum(r["guess_status"].values()) == 8 and (Path(run) / "plots" / "summary.png").exists()


def test_untrained_model_guesses_stop_when_they_can_no_longer_be_a_grid(tmp_path, monkeypatch):
    rng = random.Random(4)
    tasks = {f"s{i}": mirror_task(rng, 3, 3) for i in range(4)}
    folder = write_tasks(tmp_path / "tasks", tasks)
    generated = {}
    for stopping in (False, True):
        run = tiny_run(tmp_path / f"run{stopping}")
        if not stopping:  # what generation did before: every row ran on to max_new_tokens or EOS
            monkeypatch.setattr(decode, "grid_stopper", lambda *args: None)
        else:
            monkeypatch.undo()
        infer.main(["--dataset", folder, "--model", run, "--max-new-tokens", "200", "--batch-size", "8"])
        r = read(Path(run) / "results.json")
        generated[stopping] = r["generated_tokens"]
        submit.check_submission(read(Path(run) / "submission.json"), tasks, "submission")
    assert generated[True] < generated[False] / 10, generated
    assert r["guess_status"].get("unparsable", 0) > 0 and sum(r["guess_status"].values()) == 8, r["guess_status"]


def test_gpu_out_of_memory_halves_the_batch_instead_of_failing(mirror, tmp_path, monkeypatch, tokenizer):
    import torch
    tasks, folder, run = mirror
    sizes = []

    def generate(model, tok, prompts, cfg, fmt=None, min_new_tokens=0, **kw):
        sizes.append(len(prompts))
        if len(prompts) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return ["junk"] * len(prompts)
    monkeypatch.setattr(infer, "load_model", lambda run, cfg: (None, tokenizer))
    monkeypatch.setattr(decode, "generate", generate)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    infer.main(["--dataset", folder, "--model", run, "--batch-size", "16"])
    n_prompts = 2 * sum(len(t["test"]) for t in tasks.values())
    assert sizes[0] == 16 and max(sizes[1:]) <= 8
    assert sum(s for s in sizes if s <= 3) == n_prompts  # every prompt answered once, in smaller batches
    assert len(read(Path(run) / "submission.json")) == len(tasks)


# ----------------------------------------------------------------------------
# vote and poe: many samples, two guesses

def view_prompts(tokenizer, task, views, test=0):
    """prompt ids (as a tuple) -> view index, for the prompts infer.py builds for `task` (nothing trimmed)."""
    return {tuple(models.encode_prompt(tokenizer, data.format_prompt(data.prompt_view(task, k, perm), test, FMT))): v
            for v, (k, perm) in enumerate(views)}


def test_vote_picks_the_grid_most_views_give_after_undoing_them(tmp_path, monkeypatch, tokenizer):
    """A fake model right in 3 of 16 views (2 of them colour-permuted), a different wrong grid in each other
    view (each with a better log-prob than the right one), nothing parsable in 2: the vote finds the truth."""
    rng = random.Random(0)
    task = mirror_task(rng, 3, 4)
    truth = task["test"][0]["output"]
    folder, run = write_tasks(tmp_path / "tasks", {"t": task}), write_run(tmp_path / "run")
    views = data.views(16, seed=0)
    prompt_view = view_prompts(tokenizer, task, views)
    right, wrong = {2, 9, 13}, {}

    def answer(ids):
        v = prompt_view[tuple(ids)]
        k, perm = views[v]
        if v in right:
            return data.format_completion(data.apply_view(truth, k, perm), FMT)
        if v in (5, 6):
            return "12\n3\nend"
        wrong[v] = [[rng.randrange(10) for _ in range(3)] for _ in range(4)]
        return data.format_completion(data.apply_view(wrong[v], k, perm), FMT)
    calls = fake_model(monkeypatch, tokenizer, answer)
    scored = []

    def logprobs(model, tok, prompts, completions, batch_size=8):
        scored.extend(zip(map(tuple, prompts), map(tuple, completions)))
        return [-0.1 * len(c) if prompt_view[tuple(p)] not in right else -0.9 * len(c)
                for p, c in zip(prompts, completions)]
    monkeypatch.setattr(infer, "completion_logprobs", logprobs)
    infer.main(["--dataset", folder, "--model", run, "--guesses", "vote", "--views", "16"])
    assert sum(map(len, calls)) == 16
    assert len(scored) == 14 == len(set(scored))  # each parsable view x grid scored once, under its own prompt
    sub, r = read(Path(run) / "submission.vote.json"), read(Path(run) / "results.vote.json")
    assert sub["t"][0]["attempt_1"] == truth and sub["t"][0]["attempt_2"] in wrong.values()
    assert (r["mode"], r["solved_first"], r["solved_second"]) == ("vote", 1, 0)
    assert r["settings"]["guesses"] == "vote" and r["settings"]["views"] == 16
    cached = infer.read_cache(Path(run) / "submission.vote.cache.jsonl")["t"]
    assert cached.candidates[0][0][:2] == [truth, 3] and cached.candidates[0][0][2] == pytest.approx(-0.9)
    assert len(cached.candidates[0]) == 12  # the truth and 11 distinct wrong grids


def test_vote_ties_go_to_the_higher_mean_logprob():
    a, b, c = [[1]], [[2]], [[3]]
    ranked = infer.tally([(a, -1.0), (b, -0.2), (a, -1.0), (b, -0.4), (c, -0.01), (None, 0.0)])
    assert ranked == [[b, 2, pytest.approx(-0.3)], [a, 2, -1.0], [c, 1, -0.01]]
    assert infer.tally([(a, -1.0), (b, -1.0)]) == [[a, 1, -1.0], [b, 1, -1.0]]  # full tie: first proposed
    assert infer.tally([]) == []


def test_poe_sums_each_candidate_over_every_view_in_one_call():
    task = {"train": [{"input": [[1, 0], [0, 2]], "output": [[2, 0], [0, 1]]}],
            "test": [{"input": [[5, 0], [6, 7]], "output": [[7, 6], [0, 5]]}]}
    views = data.views(12, seed=2)
    prompts = [(k, perm, data.format_prompt(data.prompt_view(task, k, perm), 0, FMT)) for k, perm in views]
    cands = [[[7, 6], [0, 5]], [[5, 6], [0, 7]], [[1, 1], [1, 1]], [[7, 6, 0], [0, 5, 0]]]
    rng = random.Random(0)
    table = {(v, c): -rng.uniform(0, 10) for v in range(len(views)) for c in range(len(cands))}
    for v in range(len(views)):  # candidate 2: by far the best in view 0 (one expert would pick it), bad elsewhere
        table[v, 2] = 5.0 if v == 0 else -20.0
    calls = []

    def logprobs(prompt_list, completions):
        calls.append(len(prompt_list))
        out = []
        for p, comp in zip(prompt_list, completions):
            v = [q for _, _, q in prompts].index(p)
            grid = data.undo_view(data.parse_output(comp, FMT), *views[v])  # written in the view's frame
            out.append(table[v, cands.index(grid)])
        return out
    encode = lambda grid: data.format_completion(grid, FMT)  # noqa: E731
    scores = infer.poe_scores(cands, prompts, encode, logprobs)
    expected = [sum(table[v, c] for v in range(len(views))) for c in range(len(cands))]
    assert scores == pytest.approx(expected) and calls == [len(views) * len(cands)]
    ranked = infer.poe_ranking(cands + [cands[1]], prompts, encode, logprobs)
    best = sorted(range(len(cands)), key=lambda c: -expected[c])
    assert [r[0] for r in ranked] == [cands[c] for c in best] and ranked[best.index(1)][1] == 2
    assert 2 not in best[:2]


def test_poe_picks_the_best_summed_logprob_over_the_most_voted(tmp_path, monkeypatch, tokenizer):
    """7 of 8 views propose grid A, one proposes B; every view's prompt likes B better: poe submits B first."""
    task = mirror_task(random.Random(1), 2, 3)
    a, b = [[1, 2, 3], [4, 5, 6]], task["test"][0]["output"]
    folder, run = write_tasks(tmp_path / "tasks", {"t": task}), write_run(tmp_path / "run")
    views = data.views(8)
    prompt_view = view_prompts(tokenizer, task, views)

    def answer(ids):
        k, perm = views[prompt_view[tuple(ids)]]
        return data.format_completion(data.apply_view(b if prompt_view[tuple(ids)] == 3 else a, k, perm), FMT)
    fake_model(monkeypatch, tokenizer, answer)
    b_texts = {tuple(models.encode_completion(tokenizer, data.format_completion(data.apply_view(b, k, p), FMT)))
               for k, p in views}
    scored = []

    def logprobs(model, tok, prompts, completions, batch_size=8):
        scored.append(len(prompts))
        return [-1.0 if tuple(c) in b_texts else -2.0 for c in completions]
    monkeypatch.setattr(infer, "completion_logprobs", logprobs)
    infer.main(["--dataset", folder, "--model", run, "--guesses", "poe", "--views", "8", "--samples", "2"])
    sub, r = read(Path(run) / "submission.poe.json"), read(Path(run) / "results.poe.json")
    assert sub["t"][0] == {"attempt_1": b, "attempt_2": a} and r["mode"] == "poe"
    assert scored == [8 * 2]  # 2 distinct candidates x 8 views, in one call
    cached = infer.read_cache(Path(run) / "submission.poe.cache.jsonl")["t"]
    assert cached.candidates[0] == [[b, 2, -8.0], [a, 14, -16.0]]  # 16 samples: B twice, A 14 times


def test_completion_logprobs_batched_equals_one_at_a_time_and_a_plain_forward(tokenizer):
    import torch
    model = models.tiny_model(tokenizer).eval()
    rng = random.Random(4)
    pairs = []
    for i in range(7):
        task = mirror_task(rng, 1 + i % 3, 2 + i % 4)
        pairs.append((models.encode_prompt(tokenizer, data.format_prompt(task, 0, FMT)),
                      models.encode_completion(tokenizer, data.format_completion(task["test"][0]["output"], FMT))))
    prompts, comps = [p for p, _ in pairs], [c for _, c in pairs]
    batched = decode.completion_logprobs(model, tokenizer, prompts, comps, batch_size=4)
    single = [decode.completion_logprobs(model, tokenizer, [p], [c], batch_size=1)[0] for p, c in pairs]
    assert batched == pytest.approx(single, abs=1e-4)
    p, c = pairs[3]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    assert batched[3] == pytest.approx(sum(logits[len(p) - 1 + j, t].item() for j, t in enumerate(c)), abs=1e-4)


@pytest.mark.parametrize("mode", ["vote", "poe", "dfs"])
def test_real_tiny_model_votes_and_scores_on_cpu(tmp_path, monkeypatch, mode):
    rng = random.Random(3)
    tasks = {f"s{i}": mirror_task(rng, 2, 2, tests=1 + (i == 0)) for i in range(2)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), tiny_run(tmp_path / "run")
    infer.main(["--dataset", folder, "--model", run, "--max-new-tokens", "8", "--guesses", mode, "--views", "9",
                "--samples", "2", "--temperature", "0", "--min-prob", "0.02"])  # dfs: random weights, flat
    sub, r = read(Path(run) / f"submission.{mode}.json"), read(Path(run) / f"results.{mode}.json")
    submit.check_submission(sub, tasks, "submission")
    assert r["mode"] == mode and r["tasks"] == 2 and r["generated_tokens"] > 0


def test_guard_warns_with_counts_when_scored_tasks_were_trained_on(tmp_path, monkeypatch, tokenizer, mirror, capsys):
    tasks, folder, run = mirror
    info = json.loads((Path(run) / "config.json").read_text())
    renamed = {f"other{i}": tasks[tid] for i, tid in enumerate(["t1", "t3"])}  # same grids under other ids
    info.update(trained_on=[dict(dataset="elsewhere", split="train", tasks=2)],
                fingerprints=[data.task_fingerprint(t) for t in renamed.values()])
    cli.write_json(Path(run) / "config.json", info)
    fake_model(monkeypatch, tokenizer, lambda ids: "junk")
    infer.main(["--dataset", folder, "--model", run])
    printed = capsys.readouterr().out
    assert "warning: 2 of 5 tasks scored here are, grid for grid, tasks this model was trained on (elsewhere train;" \
           in printed
    assert read(Path(run) / "results.json")["seen_in_training"] == ["t1", "t3"]


# ----------------------------------------------------------------------------
# dfs: every answer above --min-prob in each view, pooled and ranked by product of experts; the modes table

def fake_search(monkeypatch, answers):
    """Replace dfs_search and dfs_batch by answers(prompt ids, drafts) -> ([(completion ids, nll)], finished);
    returns the calls, each as dict(ids, drafts, deadline, allowed, batch: the search's dfs_batch call, or None).
    The fake batch searches in turn and stops at the first out of time, as one at a time would."""
    calls, batches = [], []

    def search(model, ids, eos, max_new_tokens, min_prob, allowed_ids=None, drafts=(), deadline=None, keep=None,
               speculate=None):
        calls.append(dict(ids=tuple(ids), drafts=drafts, deadline=deadline, allowed=allowed_ids, min_prob=min_prob,
                          batch=None))
        found, finished = answers(tuple(ids), drafts)
        return sorted(found, key=lambda f: f[1]), finished, 3

    def batch(model, searches, eos, min_prob, allowed_ids=None, deadline=None, keep=None, speculate=None):
        batches.append(len(searches))
        out = []
        for ids, max_new_tokens, drafts in searches:
            out.append(search(model, ids, eos, max_new_tokens, min_prob, allowed_ids, drafts, deadline, keep))
            calls[-1]["batch"] = len(batches)
            if not out[-1][1]:
                break
        return out
    monkeypatch.setattr(infer, "dfs_search", search)
    monkeypatch.setattr(infer, "dfs_batch", batch)
    return calls


def test_dfs_pools_every_view_mapped_back_ranks_by_poe_and_a_resumed_run_reuses_it(tmp_path, monkeypatch, tokenizer):
    """Each view's search finds the truth (in its own frame); views 0 and 1 also find a wrong grid W, more likely
    there than the truth, and one completion that is no grid. Pooled over the 8 views and scored under every view,
    the truth ranks first. Every view's search is given as drafts, written in its frame: the answers found so far
    (none for the 8 views in one batch; with --dfs-batch 1, best first: W, then the truth), then the test input
    and the demonstration outputs of its shape."""
    task = mirror_task(random.Random(5), 3, 4)
    truth, w = task["test"][0]["output"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2]]
    folder, run = write_tasks(tmp_path / "tasks", {"t": task}), write_run(tmp_path / "run")
    views = data.views(8)
    prompt_view = view_prompts(tokenizer, task, views)
    written = lambda grid, v: models.encode_completion(tokenizer, data.format_completion(  # noqa: E731
        data.apply_view(grid, *views[v]), FMT))[:-1]

    def answers(ids, drafts):
        v = prompt_view[ids]
        found = [(written(truth, v), 1.0), (tokenizer.encode("12\n3\nend", add_special_tokens=False), 0.1)]
        return found + ([(written(w, v), 0.5)] if v < 2 else []), True
    calls = fake_search(monkeypatch, answers)
    fake_model(monkeypatch, tokenizer, lambda ids: pytest.fail("dfs generates nothing"))
    truth_texts = {tuple(written(truth, v)) + (tokenizer.eos_token_id,) for v in range(8)}
    monkeypatch.setattr(infer, "completion_logprobs", lambda model, tok, prompts, completions, batch_size=8:
                        [-1.0 if tuple(c) in truth_texts else -3.0 for c in completions])
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--min-prob", "0.2"])
    assert [prompt_view[c["ids"]] for c in calls] == list(range(8))
    assert [c["batch"] for c in calls] == [1] * 8  # the 8 views in one batch
    given = [task["test"][0]["input"]] + [ex["output"] for ex in task["train"]]  # all of the test input's shape
    assert all(c["drafts"] == [written(g, v) for g in given] for v, c in enumerate(calls))  # no answer found yet
    answer_words = {tokenizer.convert_tokens_to_ids(t) for t in [*"0123456789", "\n", data.END, "</s>"]}
    assert set(calls[0]["allowed"]) == answer_words and calls[0]["min_prob"] == 0.2
    sub_path = Path(run) / "submission.dfs.json"
    sub, r = read(sub_path), read(Path(run) / "results.dfs.json")
    assert sub["t"][0] == {"attempt_1": truth, "attempt_2": w}
    assert (r["mode"], r["solved_first"], r["solved_second"], r["settings"]["min_prob"]) == ("dfs", 1, 0, 0.2)
    cached = infer.read_cache(Path(run) / "submission.dfs.cache.jsonl")["t"]
    assert cached.candidates == [[[truth, 8, -8.0], [w, 2, -24.0]]]  # votes: the views that found it

    before = sub_path.read_bytes()
    fake_search(monkeypatch, lambda ids, drafts: pytest.fail("a finished task is searched again"))
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--min-prob", "0.2"])
    assert sub_path.read_bytes() == before

    calls = fake_search(monkeypatch, answers)  # one view at a time: each given the answers of the views before it
    alone = tmp_path / "alone" / "submission.json"
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--min-prob", "0.2", "--dfs-batch", "1",
                "--out", str(alone)])
    assert [c["batch"] for c in calls] == [None] * 8 and alone.read_bytes() == before
    assert calls[0]["drafts"] == [written(g, 0) for g in given]
    assert all(c["drafts"] == [written(g, v) for g in [w, truth] + given] for v, c in enumerate(calls) if v >= 1)


def test_dfs_task_out_of_time_keeps_its_answers_and_says_so(tmp_path, monkeypatch, tokenizer, capsys):
    rng = random.Random(6)
    tasks = {"quick": mirror_task(rng, 2, 2), "slow": mirror_task(rng, 3, 3, tests=2)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), write_run(tmp_path / "run")
    views = data.views(8)
    prompt_view, truth = {}, {}  # prompt ids -> view, and -> the right answer of its test input
    for tid, i in (("quick", 0), ("slow", 0), ("slow", 1)):
        shown = view_prompts(tokenizer, tasks[tid], views, test=i)
        prompt_view.update(shown)
        truth.update(dict.fromkeys(shown, tasks[tid]["test"][i]["output"]))
    slow_ids = {ids for ids in prompt_view if ids not in view_prompts(tokenizer, tasks["quick"], views)}

    def answers(ids, drafts):  # the slow task runs out of time in its third view
        k, perm = views[prompt_view[ids]]
        found = [(models.encode_completion(tokenizer, data.format_completion(data.apply_view(truth[ids], k, perm),
                                                                           FMT))[:-1], 1.0)]
        return found, not (ids in slow_ids and prompt_view[ids] == 2)
    calls = fake_search(monkeypatch, answers)
    fake_model(monkeypatch, tokenizer, lambda ids: pytest.fail("dfs generates nothing"))
    monkeypatch.setattr(infer, "completion_logprobs", lambda model, tok, p, c, batch_size=8: [-1.0] * len(p))
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--max-task-seconds", "30"])
    printed = capsys.readouterr()
    note = "test 0: out of time (--max-task-seconds 30) in view 3 of 8: 3 answers found so far are ranked"
    assert f"task slow {note}" in printed.out + printed.err
    sub, r = read(Path(run) / "submission.dfs.json"), read(Path(run) / "results.dfs.json")
    submit.check_submission(sub, tasks, "submission")
    assert r["timed_out"] == {"slow": [note, note.replace("test 0", "test 1")]}
    assert [e["attempt_1"] for e in sub["slow"]] == [t["output"] for t in tasks["slow"]["test"]]  # found in time
    assert sum(c["ids"] in slow_ids for c in calls) == 2 * 3 and sum(c["ids"] not in slow_ids for c in calls) == 8
    assert all(c["deadline"] is not None for c in calls)


def test_a_new_mode_is_one_function_and_one_table_row_and_never_described_as_another(tmp_path, monkeypatch,
                                                                                     tokenizer, mirror, capsys):
    tasks, folder, run = mirror

    def guess_last(samples, prompts, job):  # the last view's sample, undone
        v, grid, _ = samples[-1]
        return infer.top_two([[data.undo_view(grid, *prompts[v][:2]), 1, 0.0]] if grid else [])
    monkeypatch.setitem(infer.MODES, "last", infer.Mode(
        guess_last, "the last sample of {views}", samples=lambda cfg: 1, views=infer.sampled_views,
        flags=("views",), guess_names=("only", "missing")))
    fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[5]], FMT))
    infer.main(["--dataset", folder, "--model", run, "--guesses", "last", "--views", "3"])
    out = capsys.readouterr().out
    assert "guesses: last: the last sample of 3 views (3 symmetries)" in out
    assert "| Solved by any Guess | Solved by only Guess | Solved by missing Guess |" in out and "\n| last | 5 |" in out
    assert "poe" not in out and "transposed" not in out and "vote" not in out
    r = read(Path(run) / "results.last.json")
    assert r["mode"] == "last" and {k: r["settings"].get(k) for k in ("guesses", "views", "samples")} == \
        {"guesses": "last", "views": 3, "samples": None}
    assert read(Path(run) / "submission.last.json")["t1"][0]["attempt_1"] == [[5]]
    with pytest.raises(SystemExit):  # a mode without a table row is refused, not run as another
        infer.main(["--dataset", folder, "--model", run, "--guesses", "beam"])
    infer.print_results(dict(read(Path(run) / "results.last.json"), mode="beam"))  # a results file of another version
    infer.print_results(dict(read(Path(run) / "results.last.json"), mode="vote"))
    out = capsys.readouterr().out
    assert "| beam | 5 |" in out and out.count("| Solved by first Guess | Solved by second Guess |") == 2
    assert "transposed" not in out


# ----------------------------------------------------------------------------
# what the candidates held (Found) and NVARC's rule beside poe

@pytest.mark.parametrize("mode, first, second", [("poe", "d", "b"), ("nvarc", "a", "b")])
def test_found_counts_the_truth_among_candidates_and_nvarc_ranks_by_count_then_mean(tmp_path, monkeypatch, tokenizer,
                                                                                   capsys, mode, first, second):
    """8 views x 2 samples: A from 3 views, B and C from 2, D from 1; under every view D scores best, then B, C, A.
    poe submits D, B; NVARC's rule A (most samples), then B (tied with C on count, better mean). The truth is C:
    submitted by neither, found by both, and the table says so in its Found column."""
    task = mirror_task(random.Random(8), 2, 3)
    truth = task["test"][0]["output"]
    grids = dict(a=[[1, 1, 1], [2, 2, 2]], b=[[3, 4, 5], [6, 7, 8]], c=truth, d=[[9]])
    folder, run = write_tasks(tmp_path / "tasks", {"t": task}), write_run(tmp_path / "run")
    views = data.views(8)
    prompt_view = view_prompts(tokenizer, task, views)
    proposer = dict(zip(range(8), "aaabbccd"))
    fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion(
        data.apply_view(grids[proposer[prompt_view[tuple(ids)]]], *views[prompt_view[tuple(ids)]]), FMT))
    written = {tuple(models.encode_completion(tokenizer, data.format_completion(data.apply_view(g, k, p), FMT))): name
               for name, g in grids.items() for k, p in views}
    score = dict(a=-4.0, b=-2.0, c=-3.0, d=-1.0)
    monkeypatch.setattr(infer, "completion_logprobs", lambda model, tok, prompts, completions, batch_size=8:
                        [score[written[tuple(c)]] for c in completions])
    infer.main(["--dataset", folder, "--model", run, "--guesses", mode, "--views", "8", "--samples", "2"])
    sub, r = read(Path(run) / f"submission.{mode}.json"), read(Path(run) / f"results.{mode}.json")
    assert sub["t"][0] == {"attempt_1": grids[first], "attempt_2": grids[second]}
    assert (r["solved_any"], r["found"], r["found_test_inputs"]) == (0, 1, 1)
    out = capsys.readouterr().out
    assert "| Solved by second Guess | Found |" in out and f"\n| {mode} | 1 | 1 | 0 | 0 | 0 | 1 |" in out
    ranked = infer.read_cache(Path(run) / f"submission.{mode}.cache.jsonl")["t"].candidates[0]
    assert [row[1] for row in ranked] == ([2, 4, 4, 6] if mode == "poe" else [6, 4, 4, 2])
    if mode == "nvarc":  # the mean over the 8 views
        assert [row[2] for row in ranked] == [-4.0, -2.0, -3.0, -1.0]


def test_found_is_none_without_solutions_and_counts_only_right_grids(tmp_path, monkeypatch, tokenizer, mirror):
    tasks, folder, run = mirror
    fake_model(monkeypatch, tokenizer, lambda ids: data.format_completion([[5]], FMT))
    infer.main(["--dataset", folder, "--model", run])
    r = read(Path(run) / "results.json")
    assert (r["found"], r["found_test_inputs"]) == (0, 0)
    records = {tid: submit.Record.empty(tid, len(t["test"])) for tid, t in tasks.items()}
    records["t0"].guesses[0][1] = tasks["t0"]["test"][0]["output"]
    records["t1"].candidates = [[[tasks["t1"]["test"][0]["output"], 1, -1.0]]]
    assert submit.coverage(tasks, records) == dict(found=1, found_test_inputs=2)  # t0 has a second test input
    unsolved = {tid: dict(t, test=[{"input": x["input"]} for x in t["test"]]) for tid, t in tasks.items()}
    assert submit.coverage(unsolved, records) == dict(found=None, found_test_inputs=None)


@pytest.mark.parametrize("together, groups, note, unsearched", [
    (4, [4, 4], "in views 5-8 of 8", 0), (3, [3, 3], "in views 4-6 of 8", 2), (1, [1, 1], "in view 2 of 8", 6)])
def test_a_dfs_batch_out_of_time_names_its_views_and_counts_the_views_never_searched(together, groups, note,
                                                                                      unsearched):
    """guess_dfs searches --dfs-batch views a batch, the first batch in time, the second not: a batch out of time
    says which views it was searching, the views of the batches after it count as never searched (the planner learns from the
    rest), and every search's passes are counted."""
    task = mirror_task(random.Random(1), 2, 2)
    prompts = {v: (k, p, (v,)) for v, (k, p) in enumerate(data.views(8))}
    sizes = []

    def search(searches):
        sizes.append(len(searches))
        return [([], len(sizes) == 1, 2) for _ in searches]
    job = infer.Job(None, FMT, encode=lambda grid: [3, 4, 5], decode=str, logprobs=lambda p, c: [0.0] * len(p),
                    search=search, together=together, task=task, limit="--max-task-seconds 5")
    assert infer.guess_dfs([], prompts, job)[0] == [None, None]  # nothing found: no guess
    assert sizes == groups and job.unsearched == unsearched and job.forwards == 2 * sum(groups)
    assert job.notes == [f"out of time (--max-task-seconds 5) {note}: 0 answers found so far are ranked"]


@pytest.mark.parametrize("backend, batch, said", [
    ("transformers", 8, "views 8 a batch"),
    ("unsloth", 1, "views one at a time (Unsloth's forward takes no 4-D attention mask)")])
def test_dfs_searches_views_in_one_batch_through_transformers_only(monkeypatch, tokenizer, capsys, backend, batch,
                                                                   said):
    """dfs_batch reads a 4-D attention mask, which Unsloth's forward does not take: on Unsloth the loaded predictor
    searches one view at a time, whatever --dfs-batch says, and its search line says why."""
    monkeypatch.setattr(infer, "load_model", lambda run, setup: (object(), tokenizer))
    run = types.SimpleNamespace(format=FMT, max_seq_len=512, ttt_mode=None)
    cfg = dataclasses.replace(infer.Config(), guesses="dfs")
    cfg = infer.load_predictor(cfg, run, types.SimpleNamespace(backend=backend), {})[3]
    assert cfg.dfs_batch == batch and said in capsys.readouterr().out
