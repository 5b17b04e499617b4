"""decode.dfs, the depth-first search for every answer above a probability: exact against brute-force enumeration of
every sequence, at most the greedy answer above 0.5, and each nll the one a teacher-forced pass gives (the cache
cropped on backtracking is right), with or without drafts: wrong, too long, off the searched tokens or right ones.

    python -m pytest tests/test_dfs.py -q
"""
import json
import math
import random

import pytest

import decode
import infer
import models

VOCAB = 6


def small_model(seed=0, head_scale=0.3):
    """A random Llama over 6 tokens whose next-token distributions are neither flat nor one-hot (a scaled lm_head),
    so that a handful of short completions lie above a few percent."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.5, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def brute_force(model, prompt, eos, max_new_tokens, allowed=None):
    """nll of every completion (tokens without EOS -> summed nll with EOS) of at most max_new_tokens tokens, EOS
    included, made of `allowed` tokens (default: all): each prefix of every length scored by a plain forward pass
    over prompt + prefix, no cache. The log-softmax is over the whole vocabulary."""
    import itertools
    import torch
    tokens = [t for t in (allowed if allowed is not None else range(VOCAB)) if t != eos]
    out = {}
    for length in range(max_new_tokens):
        prefixes = list(itertools.product(tokens, repeat=length))
        with torch.inference_mode():
            lp = model(input_ids=torch.tensor([list(prompt) + list(p) for p in prefixes])).logits.double() \
                .log_softmax(-1)
        for row, prefix in enumerate(prefixes):
            steps = [lp[row, len(prompt) - 1 + j, t].item() for j, t in enumerate(prefix + (eos,))]
            out[prefix] = -sum(steps)
    return out


def greedy(model, prompt, eos, max_new_tokens):
    """The greedy completion (without EOS), or None when it does not end within max_new_tokens."""
    import torch
    out = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = model(input_ids=torch.tensor([list(prompt) + out])).logits[0, -1].argmax().item()
            if token == eos:
                return out
            out.append(token)
    return None


@pytest.mark.parametrize("seed, eos, min_prob, allowed", [(0, 3, 0.02, None), (0, 5, 0.011, None),
                                                          (1, 2, 0.015, None), (0, 3, 0.012, [0, 2, 3])])
def test_dfs_finds_exactly_the_completions_above_p_of_brute_force_enumeration(seed, eos, min_prob, allowed):
    model, max_new = small_model(seed), 5
    prompt = [0, 4, 2, 5, 3, 1]
    every = brute_force(model, prompt, eos, max_new, allowed)
    limit = -math.log(min_prob)
    expected = {c: nll for c, nll in every.items() if nll < limit}
    assert all(abs(nll - limit) > 1e-4 for nll in every.values())  # no completion sits on the threshold
    assert len(expected) >= 2  # the case is worth testing
    found = decode.dfs(model, prompt, eos, max_new, min_prob, allowed_ids=allowed)
    assert [nll for _, nll in found] == sorted(nll for _, nll in found)
    assert {tuple(c): nll for c, nll in found} == pytest.approx(expected, abs=1e-5)
    assert len(found) == len(expected) <= 1 / min_prob
    if allowed is not None:  # not renormalised: the same nll as over the whole vocabulary, so fewer pass P
        assert len(found) < len(decode.dfs(model, prompt, eos, max_new, min_prob))


def test_dfs_above_one_half_returns_at_most_the_greedy_answer():
    """Above 0.5 every token of an answer is its position's most likely one: dfs finds the greedy answer when its
    probability is above P, nothing otherwise."""
    import torch
    rng, hits = random.Random(0), 0
    for case in range(12):
        model, eos = small_model(seed=case % 3, head_scale=3.0), 1 + case % 5
        prompt = [rng.randrange(VOCAB) for _ in range(4 + case % 3)]
        best, expected = greedy(model, prompt, eos, 6), []
        if best is not None:
            with torch.inference_mode():
                lp = model(input_ids=torch.tensor([prompt + best])).logits[0].double().log_softmax(-1)
            p = math.exp(sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(best + [eos])))
            expected = [best] if p > 0.5 else []
        found = decode.dfs(model, prompt, eos, 6, 0.5)
        assert [c for c, _ in found] == expected
        hits += len(found)
    assert hits >= 3  # the greedy answer was above 0.5, and found, several times


def test_each_dfs_nll_is_a_teacher_forced_pass_and_a_known_first_branch_changes_nothing_but_cost():
    """A 20-token prompt and answers up to 8 tokens: the search backtracks often through one cache. Every
    completion's nll equals completion_logprobs' one forward pass over prompt + completion + EOS; the same search
    given a known completion to try first finds the same set with fewer one-token forward passes."""
    model, eos, tokenizer = small_model(seed=1, head_scale=0.6), 4, models.tiny_tokenizer()
    rng = random.Random(1)
    prompt = [rng.randrange(VOCAB) for _ in range(20)]
    found, finished, forwards = decode.dfs_search(model, prompt, eos, 8, 0.005)
    assert finished and len(found) >= 5 and max(len(c) for c, _ in found) >= 4
    forced = decode.completion_logprobs(model, tokenizer, [prompt] * len(found), [c + [eos] for c, _ in found])
    assert [nll for _, nll in found] == pytest.approx([-lp for lp in forced], abs=1e-4)
    for known, _ in (found[-1], found[0]):
        again, finished, fewer = decode.dfs_search(model, prompt, eos, 8, 0.005, drafts=[known])
        assert finished and [c for c, _ in again] == [c for c, _ in found]
        assert [nll for _, nll in again] == pytest.approx([nll for _, nll in found], abs=1e-5)
        assert fewer <= forwards - len(known)  # the known branch was prefilled, not decoded


def test_dfs_past_its_deadline_keeps_what_it_found(monkeypatch):
    model, eos = small_model(seed=2), 4
    prompt = [3, 1, 2, 5, 0, 2]
    everything = dict((tuple(c), nll) for c, nll in decode.dfs(model, prompt, eos, 8, 0.005))
    clock = iter(range(10**6))
    monkeypatch.setattr(infer.time, "time", lambda: next(clock))  # each look at the clock: one second later
    found, finished, _ = decode.dfs_search(model, prompt, eos, 8, 0.005, deadline=60)
    assert not finished and 0 < len(found) < len(everything)
    assert {tuple(c): nll for c, nll in found} == pytest.approx({tuple(c): everything[tuple(c)] for c, _ in found})


def test_bench_times_views_searched_one_a_batch_against_several_and_their_log_prob_difference(tmp_path):
    """bench.py --sections dfsbatch: per batch size, dfs's one-token step and the prefill timed alone and batched
    on left-padded real prompts, and the log-probs of a row alone equal its log-probs inside the padded batch."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--sections", "dfsbatch", "--dfsbatch-model", "tiny", "--dfsbatch-inputs", "1", "--dfsbatch-rows", "3",
                "--dfsbatch-steps", "2", "--out", str(out)])
    section = json.loads(out.read_text())["dfsbatch"]
    assert [r["rows"] for r in section["rows"]] == [3]
    for row in section["rows"]:
        assert row["alone_step_ms"] > 0 and row["batch_step_ms"] > 0 and row["step_ratio"] > 0
        assert row["prefill_ratio"] > 0
        assert row["max_abs_diff"] < 1e-4 and row["max_rel_diff"] < 1e-4
    assert len(section["inputs"]) == 1 and section["steps"] == 2


@pytest.mark.parametrize("seed, eos, min_prob, allowed", [(0, 3, 0.02, None), (1, 2, 0.015, None),
                                                          (0, 3, 0.012, [0, 2, 3])])
def test_drafts_change_what_a_search_costs_never_what_it_finds(seed, eos, min_prob, allowed):
    """Against brute-force enumeration, the search given drafts finds the same completions at the same nll: drafts
    that are answers (the most and the least likely), a wrong draft, one longer than any answer (past
    max_new_tokens), one that leaves the searched tokens (`allowed`) and comes back, an answer's tokens reversed
    (another shape's rows), several at once and sharing prefixes. An answer as a draft saves one-token passes."""
    model, max_new = small_model(seed), 5
    prompt = [0, 4, 2, 5, 3, 1]
    every = brute_force(model, prompt, eos, max_new, allowed)
    expected = {c: nll for c, nll in every.items() if nll < -math.log(min_prob)}
    plain, _, forwards = decode.dfs_search(model, prompt, eos, max_new, min_prob, allowed)
    assert {tuple(c): nll for c, nll in plain} == pytest.approx(expected, abs=1e-5) and len(expected) >= 2
    best, worst = (list(c) for c in sorted(expected, key=expected.get)[::len(expected) - 1])
    outside = next(t for t in range(VOCAB) if allowed is not None and t not in allowed and t != eos) \
        if allowed else eos
    cases = [[best], [worst], [[t for t in range(VOCAB) if t != eos] * 2], [best + best + best],
             [best[:1] + [outside] + best[1:]], [worst[::-1]], [worst, best, worst + best, best[:-1], [], worst[:1]]]
    for drafts in cases:
        found, finished, spent = decode.dfs_search(model, prompt, eos, max_new, min_prob, allowed, drafts=drafts)
        assert finished and [c for c, _ in found] == [c for c, _ in plain]
        assert [nll for _, nll in found] == pytest.approx([nll for _, nll in plain], rel=1e-4, abs=1e-5)
        if drafts[0] in (best, worst) and len(drafts[0]) > 1:
            assert spent < forwards  # the answer's own tokens were verified in one pass


def test_bench_dfs_section_searches_with_and_without_drafts_and_finds_the_same(tmp_path, capsys):
    """bench.py --sections dfs on a run folder (the tiny model here): each test input searched every way (3 views:
    the last 2 in one batch), the same answers at the same nll, and its table printed."""
    import bench
    from conftest import tiny_run
    out = tmp_path / "bench.json"
    bench.main(["--sections", "dfs", "--dfs-run", tiny_run(tmp_path / "run"), "--dfs-inputs", "2", "--dfs-views", "3",
                "--dfs-min-prob", "0.01", "--out", str(out)])
    section = json.loads(out.read_text())["dfs"]
    assert len(section["rows"]) == 2 and section["same_answers"] and section["max_rel_diff"] <= 1e-4
    assert all(r["before_forwards"] > 0 and r["drafts_tokens"] > 0 for r in section["rows"])
    printed = capsys.readouterr().out
    assert "| drafts verified in one pass |" in printed and "| and the 8 views in one batch |" in printed


@pytest.mark.parametrize("seed, eos, min_prob", [(0, 2, 0.005), (2, 3, 0.01)])
def test_speculated_tokens_after_a_branch_leaves_a_draft_save_passes_never_change_what_is_found(seed, eos, min_prob):
    """A draft that is an answer with its first token changed: the search leaves it at once, and its pass runs on
    with the draft's later tokens (an answer with a few cells changed goes on as the draft did), so fewer passes
    than without speculation (speculate=0); any speculation length finds what brute force finds, at the same nll."""
    model, max_new = small_model(seed), 6
    prompt = [0, 4, 2, 5, 3, 1]
    every = brute_force(model, prompt, eos, max_new)
    expected = {c: nll for c, nll in every.items() if nll < -math.log(min_prob)}
    longest = list(max(expected, key=len))
    assert len(longest) >= 3
    changed = [next(t for t in range(VOCAB) if t not in (eos, longest[0]))] + longest[1:]
    spent = {}
    for speculate in (0, 1, 2, 16):
        found, finished, spent[speculate] = decode.dfs_search(model, prompt, eos, max_new, min_prob,
                                                              drafts=[changed], speculate=speculate)
        assert finished and {tuple(c): nll for c, nll in found} == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert spent[16] < spent[0], spent


@pytest.mark.parametrize("seed, eos, min_prob", [(0, 3, 0.01), (1, 2, 0.005)])
def test_searches_in_one_batch_find_what_each_finds_alone(seed, eos, min_prob, monkeypatch):
    """dfs_batch: prompts of different lengths, each with its own drafts (none, a wrong one, an answer, one past
    max_new_tokens) and its own max_new_tokens, one that needs no pass at all (max_new_tokens 1: EOS only), searched
    in one batch a round: each finds what dfs_search finds alone and what brute force finds, at the same nll, in
    fewer than half the passes the searches make one by one; the rows that end leave the batch, and the cache is
    compacted on the way (its slots stay fewer than the tokens ever forwarded)."""
    model = small_model(seed)
    prompts = [[0, 4, 2, 5, 3, 1], [0, 5], [0, 1, 1, 4, 2, 2, 5, 3, 0, 4], [0, 2, 4], [0, 3, 3]]
    news = [5, 6, 4, 1, 5]
    alone = [decode.dfs_search(model, p, eos, n, min_prob) for p, n in zip(prompts, news)]
    wrong = [t for t in range(VOCAB) if t != eos] * 3
    drafts = [[], [wrong], [list(alone[2][0][0][0])], [wrong], [list(alone[4][0][-1][0]) * 3, wrong[:2]]]
    shapes, step = [], decode.Slots.step  # (rows, cache slots) after each round

    def watch(self, model, asked):
        got = step(self, model, asked)
        shapes.append((len(self.rows), self.cache.get_seq_length()))
        return got
    monkeypatch.setattr(decode.Slots, "step", watch)
    together = decode.dfs_batch(model, list(zip(prompts, news, drafts)), eos, min_prob)
    alone_spent = []
    for p, n, d, (found, finished, spent), (plain, _, forwards) in zip(prompts, news, drafts, together, alone):
        every = brute_force(model, p, eos, n)
        expected = {c: nll for c, nll in every.items() if nll < -math.log(min_prob)}
        assert finished and {tuple(c): nll for c, nll in found} == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert [c for c, _ in found] == [c for c, _ in plain]
        alone_spent.append(decode.dfs_search(model, p, eos, n, min_prob, drafts=d)[2])
    assert together[3] == ([], True, 0) or together[3][2] == 0
    assert len(shapes) < sum(alone_spent) / 2  # one forward pass a round serves every search still running
    assert shapes[0][0] == len(prompts) - 1 and shapes[-1][0] == 1  # the one needing no pass left at once
    assert any(b[0] == a[0] and b[1] < a[1] for a, b in zip(shapes, shapes[1:]))  # slots dropped, same rows

