"""Predict ARC test outputs with a fine-tuned model (two guesses: the task as given and transposed), write a Kaggle
submission and score it.

    python infer.py --split eval                          # latest runs/*/ -> its submission.json and results.json
    python infer.py --score runs/my-run/submission.json   # score an existing submission, no model loaded
"""
import cli  # first: a Ctrl-C while the imports below load (torch takes seconds) ends in one line too
if __name__ == "__main__":
    cli.stop_while_loading()
import dataclasses
import json
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import data
import workers
from cli import (AUTO, OneLineError, Stopped, TINY_NOTE, check_ranges, check_writable, line_buffered, lock_file, opt,
                 parse_config, peak_memory_gb, quiet_libraries, read_json, run_command, safe_name, shared,
                 write_atomic, write_failure, write_json)
from data import seen_in_training, task_fingerprint
from models import adapter_loader, encode_completion, encode_prompt, load_model, make_setup
from runs import check_ttt_base, find_run, missing_adapters, model_key, model_name, weights_fingerprint
from decode import (answer_ids, answer_tokens, completion_logprobs, dfs_batch, dfs_search, forward_rates,
                    generate_halving, parse_guess, row_seed)
from submit import (Record, TABLE_KEYS, WRITEUP_SCORES, answers_of, coverage, read_submission, save_submission, score,
                    submission_of, submission_path, table_columns)
from plots import plot_results
from budget import Budget, budget_seconds, measure, plan_task, task_load

GUESSES = (0, 4)  # data.dihedral k of guess 1 (the task as given) and guess 2 (the transposed task)
MODES = {}  # --guesses name -> Mode: the table beside the mode functions below (filled there)


@dataclass
class Config:
    dataset: str = opt("arc1", "data", "embedded set (arc1, arc2, kaggle2024, kaggle2025), family (synthetic), a "
                                       "*_challenges.json file (solutions from *_solutions.json beside it), a "
                                       "folder of tasks or a Kaggle data folder")
    split: str = opt("eval", "data", "train, eval, or test (a Kaggle folder's hidden test set)")
    limit: int = shared("limit")
    shard: str = opt("", "data", "i/n: only tasks i, i+n, i+2n... (sorted by id), so n machines share the work; "
                                 "join the slices with --join-shards")
    model: str = opt("", "model", "run folder written by train.py (default: the runs/*/ with the newest config.json), "
                                  "or a base model (HF name or folder) to use with --adapter")
    adapter: str = opt("", "model", "PEFT adapter folder to put on a base --model")
    base_model: str = opt("", "model", "a local copy of a run's base model, for a run moved to a machine that lacks "
                                       "the base it names (a Hugging Face name offline, a folder of another machine)")
    backend: str = shared("backend")
    device: str = shared("device")
    max_seq_len: int = opt(AUTO, "model", "prompt + answer token limit; longer tasks lose their largest train "
                                          "examples (auto: the run's max_seq_len, 8192 for a base model)")
    batch_size: int = opt(16, "model", "prompts per forward pass (sorted by length)")
    gpus: str = shared("gpus")
    temperature: float = opt(1.0, "sampling", "sampling temperature (0 = greedy)")
    top_k: int = opt(50, "sampling", "top-k sampling, the write-up's k=50")
    max_new_tokens: int = opt(AUTO, "sampling", "answer token limit (auto: the largest possible answer: 30x30 "
                                                "cells, row breaks, end marker and EOS)")
    seed: int = opt(0, "sampling", "torch seed for sampling")
    guesses: str = opt("writeup", "guesses", "how the two guesses are chosen: writeup (one sample of the task as "
                                             "given and one of the transposed task), vote (the two answers most "
                                             "samples agree on), poe (sampled answers ranked by their log-prob "
                                             "summed over every view), nvarc (poe's answers, the most sampled "
                                             "first, ties by mean log-prob over every view) or dfs (every answer above --min-prob in each "
                                             "view, ranked as poe); a run's first lines describe its mode",
                       choices=MODES)
    views: int = shared("views", "guesses")
    samples: int = opt(1, "guesses", "samples per view for vote, poe and nvarc")
    min_prob: float = opt(0.1, "guesses", "dfs: every answer whose probability under the model is above this, in "
                                          "each view (at most 1/P per view)")
    dfs_batch: int = opt(8, "guesses", "dfs: views searched in one batch, one forward pass a round for all of "
                                       "them, each batch given the answers of those before it as drafts, each view "
                                       "holding its prompt's KV cache (lower it where memory is short; --backend "
                                       "transformers only: Unsloth searches one view at a time); 1: one at a "
                                       "time, each given every earlier view's answers")
    max_task_seconds: float = opt(0.0, "guesses", "dfs: time budget of one task; a task out of time keeps the "
                                                  "answers found so far and says so (0 = none)")
    time_budget: str = opt("0", "guesses", "time for the whole command, model load included (11h, 90m, 600s, 1h30m "
                                          "or seconds; 0 = none), any mode: tasks run one at a time, each given the "
                                          "time left / the tasks left; a task whose share is short gets fewer views "
                                          "(down to 1, writeup keeps its 2), then no rescoring (candidates ranked by "
                                          "votes), a dfs search stops at its share, and says so; tasks left when it "
                                          "runs out get [[0]] and are not cached. Not a cache setting: the same "
                                          "command with a longer budget (or none) predicts the tasks cut")
    out: str = opt("", "output", "submission file, or a folder to write submission.json in, so named whatever "
                                 "--guesses (default: the run folder, or the --adapter folder, where each mode but "
                                 "writeup is in the names: submission.dfs.json); a .cache.jsonl beside it lets a "
                                 "killed run resume")
    score: str = opt("", "output", "score this submission file's attempts against --dataset/--split and exit (no "
                                   "model); results.<its name>.json beside it (submission.X.json -> results.X.json)")
    join_shards: bool = opt(False, "output", "join the --shard slices beside --out into the full submission and score "
                                             "it", old=("--merge",))
    plot: bool = opt(False, "output", "PNGs of solved tasks, near misses and a summary in plots/ beside the submission")


CHECKS = [("limit", lambda x: x >= 0, ">= 0 (0 = all)"),
          ("max_seq_len", lambda x: x >= 16, ">= 16 tokens"),
          ("batch_size", lambda x: x >= 1, ">= 1"),
          ("temperature", lambda x: x >= 0, ">= 0 (0 = greedy)"),
          ("top_k", lambda x: x >= 0, ">= 0 (0 = no top-k cut)"),
          ("max_new_tokens", lambda x: x >= 1, ">= 1"),
          ("views", lambda x: x >= 1, ">= 1"), ("samples", lambda x: x >= 1, ">= 1"),
          ("min_prob", lambda x: 0 < x < 1, "between 0 and 1"), ("dfs_batch", lambda x: x >= 1, ">= 1"),
          ("max_task_seconds", lambda x: x >= 0, ">= 0 (0 = none)"),
          ("time_budget", lambda x: budget_seconds(x) is not None, "a duration such as 11h, 90m, 600s, 1h30m or "
                                                                   "seconds (0 = none)"),
          ("seed", lambda x: 0 <= x < 2**32, "in 0..4294967295"),
          ("gpus", workers.check_gpus, "auto, all or a number of processes >= 1")]
# (flag, ok, requirement): checked before any model loads


# ----------------------------------------------------------------------------
# prompts, generation, parsing


def view_list(cfg):
    """The views prompted, as (k, colour permutation): writeup's two guesses, or --views of them."""
    return MODES[cfg.guesses].views(cfg)


def build_prompts(tasks, tokenizer, fmt, max_seq_len, views, writeup=True):
    """(prompts, records): one prompt per task x test input x view, each a dict with task_id, test, view (index in
    `views`) and token ids; a Record per task with empty answer slots, the views too long to fit marked as
    skipped (in writeup mode view g is guess g, and its slot is marked too_long)."""
    prompts, records = [], {}
    count = data.count_tokens(tokenizer)
    for tid, task in tasks.items():
        rec = records[tid] = Record.empty(tid, len(task["test"]))
        for v, (k, perm) in enumerate(views):
            seen = data.prompt_view(task, k, perm)
            for i in range(len(task["test"])):
                fitted, trimmed = data.fit_task(seen, i, fmt, max_seq_len, count)
                if fitted is None:
                    if writeup:
                        rec.status[i][v] = "too_long"
                    rec.skipped.append(f"test {i} {'guess' if writeup else 'view'} {v + 1}: {trimmed}")
                    continue
                ids = encode_prompt(tokenizer, data.format_prompt(fitted, i, fmt))
                rec.trimmed += trimmed
                rec.tokens["prompt"] += len(ids)
                prompts.append(dict(task_id=tid, test=i, view=v, ids=ids))
    return prompts, records


# ----------------------------------------------------------------------------
# choosing two guesses among many samples: votes (arc24, MARC) or a product of experts (the ARChitects)


def grid_key(grid):
    return tuple(map(tuple, grid))


def tally(candidates):
    """Distinct grids of (grid, mean log-prob) candidates, best first, as [grid, votes, mean of their log-probs]:
    most votes, then the higher mean log-prob (arc24's tie-break), then first proposed. None grids don't vote."""
    groups = {}
    for grid, lp in candidates:
        if grid is not None:
            groups.setdefault(grid_key(grid), [grid, []])[1].append(lp)
    rows = [[grid, len(lps), sum(lps) / len(lps)] for grid, lps in groups.values()]
    return sorted(rows, key=lambda r: (-r[1], -r[2]))  # stable: ties in both keep the first proposed first


def poe_scores(grids, prompts, encode, logprobs):
    """Summed log-prob of each grid (task frame) as the completion of every view's prompt: `prompts` are
    (k, perm, prompt ids), encode(grid) -> completion ids, logprobs(prompt ids list, completion ids list) ->
    sums, called once with every view x grid pair."""
    pairs = [(ids, encode(data.apply_view(g, k, perm))) for k, perm, ids in prompts for g in grids]
    sums = logprobs([p for p, _ in pairs], [c for _, c in pairs]) if pairs else []
    return [sum(sums[j] for j in range(i, len(sums), len(grids))) for i in range(len(grids))]


def poe_ranking(grids, prompts, encode, logprobs):
    """[grid, samples that proposed it, summed log-prob over the views] of the distinct grids, best score first
    (ties: first proposed). prompts, encode, logprobs: see poe_scores."""
    votes = Counter(grid_key(g) for g in grids)
    distinct = list({grid_key(g): g for g in grids}.values())
    scores = poe_scores(distinct, prompts, encode, logprobs)
    return sorted(([g, votes[grid_key(g)], s] for g, s in zip(distinct, scores)), key=lambda r: -r[2])


# ----------------------------------------------------------------------------
# guess modes: each one function from a test input's prompts (and samples) to its two guesses, in one table

@dataclass
class Job:
    """What a mode's guess function may use. encode(grid as a view writes it) -> completion ids with EOS;
    decode(ids) -> text; logprobs(prompt ids list, completion ids list) -> summed log-probs, batched;
    search([(prompt ids, drafts: completion ids lists)]) -> dfs_search's (found, finished, forwards) of each under
    --min-prob and the task's `deadline`, in one batch when several (`together` at most: view_groups); `task` and
    `test`: the task and test input being decided. A guess function adds what the user must hear to `notes` and
    its forward passes to `forwards`. `prefixes`: the prompt caches a search built, which logprobs scores on; they
    live while one test input is decided."""
    cfg: Config
    fmt: str
    encode: object
    decode: object
    logprobs: object
    search: object
    deadline: float = None
    notes: list = field(default_factory=list)
    forwards: int = 0
    prefixes: dict = field(default_factory=dict)
    limit: str = ""        # what set `deadline`, for the notes of a search out of time
    rescore: bool = True   # False: logprobs scores nothing and decide ranks the candidates by votes only
    score_s: float = 0.0   # seconds spent in logprobs, for the --time-budget planner
    unsearched: int = 0    # views a search ran out of time before, for the planner too
    together: int = 1      # views a dfs batch searches at most (--dfs-batch)
    task: dict = None
    test: int = 0


@dataclass(frozen=True)
class Mode:
    guess: object        # guess(samples, prompts, job) -> ([guess 1, guess 2], [status 1, status 2], ranked or None)
    describe: str        # what it submits, for the run's first lines; {views}, {samples}, {min_prob} filled in
    samples: object      # cfg -> samples generated per prompt before guess() (0: guess() searches by itself)
    views: object        # cfg -> the views prompted, as (k, colour permutation)
    flags: tuple         # flags recorded in the cache's settings (beyond the sampling settings every mode has)
    guess_names: tuple   # guess 1 and guess 2 in the results table ("Solved by first Guess") and the pictures


def top_two(ranked):
    """A ranking mode's result: its two best grids as the guesses (no_candidate where there are fewer)."""
    guesses = [r[0] for r in ranked[:2]] + [None] * (2 - len(ranked[:2]))
    return guesses, ["ok" if g is not None else "no_candidate" for g in guesses], ranked


def guess_writeup(samples, prompts, job):
    """The write-up's guesses: guess g is the one sample of view g (the task as given, then transposed), undone;
    a view too long to fit has no prompt and the status too_long."""
    guesses, status = [None, None], ["too_long", "too_long"]
    for v, grid, why in samples:
        guesses[v], status[v] = data.undo_view(grid, *prompts[v][:2]) if grid else None, why
    return guesses, status, None


def guess_vote(samples, prompts, job):
    """The two grids most samples give after undoing their view, ties by the mean per-token log-prob of their
    samples under their own view (each distinct view x grid scored once)."""
    found = [(v, g) for v, g, _ in samples if g is not None]
    distinct = list({(v, grid_key(g)): (v, g) for v, g in found}.values())
    completions = [job.encode(g) for _, g in distinct]
    sums = job.logprobs([prompts[v][2] for v, _ in distinct], completions) if distinct else []
    mean = {(v, grid_key(g)): s / len(c) for (v, g), c, s in zip(distinct, completions, sums)}
    return top_two(tally([(data.undo_view(g, *prompts[v][:2]), mean[v, grid_key(g)]) for v, g in found]))


def guess_poe(samples, prompts, job):
    """The sampled grids, each scored by its log-prob summed over every view's prompt (product of experts)."""
    grids = [data.undo_view(g, *prompts[v][:2]) for v, g, _ in samples if g is not None]
    return top_two(poe_ranking(grids, list(prompts.values()), job.encode, job.logprobs))


def guess_nvarc(samples, prompts, job):
    """NVARC's rule on poe's candidates and scores: the grid most samples proposed first, ties by its mean log-prob
    over the same views (poe's sum divided by the views)."""
    grids = [data.undo_view(g, *prompts[v][:2]) for v, g, _ in samples if g is not None]
    ranked = [[g, votes, s / len(prompts)] for g, votes, s in poe_ranking(grids, list(prompts.values()), job.encode,
                                                                         job.logprobs)]
    return top_two(sorted(ranked, key=lambda r: -r[1]))  # stable: equal counts stay in poe's order


def dfs_drafts(found, task, test, k, perm, encode):
    """The token paths (without EOS) a view's search verifies in one forward pass each, in view (k, perm): the
    answers earlier views found (grids in the task's frame, best first), the test input (many outputs are the input
    with a few cells changed), the demonstration outputs of its shape; each path once."""
    test_input = task["test"][test]["input"] if task else None
    shape = lambda g: (len(g), len(g[0]))  # noqa: E731
    grids = found + ([test_input] if test_input else []) + \
        [ex["output"] for ex in (task or {}).get("train", []) if shape(ex["output"]) == shape(test_input)]
    paths = dict.fromkeys(tuple(encode(data.apply_view(g, k, perm))[:-1]) for g in grids)
    return [list(p) for p in paths]


def view_groups(views, together):
    """The views of a test input as dfs searches them: `together` at a time in one batch (decode.dfs_batch), each
    batch given the answers of the batches before it as drafts; 1: each alone, given every earlier one's. All 8
    in one batch was measured faster than the first alone for its answers, then the other 7 (docs/modes.md)."""
    return [views[i:i + together] for i in range(0, len(views), together)]


def guess_dfs(samples, prompts, job):
    """Every answer above --min-prob in each view (dfs_search), given as drafts (dfs_drafts) the answers found so
    far, best first, then the test input and the demonstration outputs of its shape; --dfs-batch views at a time
    in one batch (view_groups); the grids found, pooled over the views, ranked as poe ranks them (votes: the views
    that found a grid). Out of time, the views searched so far give the guesses."""
    found, views, start = [], list(prompts.values()), 0  # found: (grid in the task's frame, its nll in its view)
    for group in view_groups(views, job.together):
        ranked = [g for g, _ in sorted(found, key=lambda f: f[1])]
        results = job.search([(ids, dfs_drafts(ranked, job.task, job.test, k, perm, job.encode))
                              for k, perm, ids in group])
        for (k, perm, _), (completions, _, forwards) in zip(group, results):
            job.forwards += forwards
            for tokens, nll in completions:
                grid = data.parse_output(job.decode(tokens), job.fmt)
                if grid is not None:
                    found.append((data.undo_view(grid, k, perm), nll))
        late = [start + v + 1 for v, (_, finished, _) in enumerate(results) if not finished]
        if late or len(results) < len(group):
            job.unsearched += len(views) - start - len(results)
            job.notes.append(f"out of time ({job.limit}) in view{'s' if len(late) > 1 else ''} "
                             f"{late[0]}{f'-{late[-1]}' if len(late) > 1 else ''} of {len(views)}: {len(found)} "
                             "answers found so far are ranked")
            break
        start += len(group)
    return top_two(poe_ranking([g for g, _ in found], list(prompts.values()), job.encode, job.logprobs))


def sampled_views(cfg):
    return data.views(cfg.views, cfg.seed)


MODES.update(
    writeup=Mode(guess_writeup, "one sample of the task as given (guess 1) and one of the transposed task (guess 2)",
                 samples=lambda cfg: 1, views=lambda cfg: [(k, None) for k in GUESSES], flags=(),
                 guess_names=("first", "transposed")),
    vote=Mode(guess_vote, "{views} x {samples} samples, the two grids most samples agree on after undoing their "
                          "view, ties by mean log-prob",
              samples=lambda cfg: cfg.samples, views=sampled_views, flags=("views", "samples"),
              guess_names=("first", "second")),
    poe=Mode(guess_poe, "{views} x {samples} samples, every candidate scored by its log-prob summed over all views",
             samples=lambda cfg: cfg.samples, views=sampled_views, flags=("views", "samples"),
             guess_names=("first", "second")),
    nvarc=Mode(guess_nvarc, "{views} x {samples} samples, the grid most samples give first, ties by its mean "
                            "log-prob over all views (NVARC's rule)",
               samples=lambda cfg: cfg.samples, views=sampled_views, flags=("views", "samples"),
               guess_names=("first", "second")),
    dfs=Mode(guess_dfs, "{views}, every answer above probability {min_prob} in each (depth-first search), scored by "
                        "its log-prob summed over all views",
             samples=lambda cfg: 0, views=sampled_views, flags=("views", "min_prob", "max_task_seconds"),
             guess_names=("first", "second")),
)
MODE_FLAGS = ("views", "samples", "min_prob", "max_task_seconds")  # flags that only some modes use


def guess_names(mode):
    """Guess 1 and guess 2 as a mode names them; a mode not in the table (a file of another version) gets the
    plain first and second, never another mode's names."""
    return MODES[mode].guess_names if mode in MODES else ("first", "second")


def batches(prompts, size, by_task):
    """Batches of prompts, longest first (an out-of-memory batch size shows at once); with by_task, each batch
    holds one task's prompts only and a task's batches come one after another (its adapter is loaded once)."""
    if not by_task:
        ordered = sorted(prompts, key=lambda p: -len(p["ids"]))
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]
    out = []
    for tid in dict.fromkeys(p["task_id"] for p in prompts):
        out += batches([p for p in prompts if p["task_id"] == tid], size, False)
    return out


def describe_prompts(cfg, tasks, prompts, records, n_views, n_samples):
    """The `prompts:` line: how many, their token lengths, what was trimmed or skipped to fit --max-seq-len."""
    lengths = sorted(len(p["ids"]) for p in prompts)
    skipped = [f"task {tid} {note}" for tid, rec in records.items() for note in rec.skipped]
    trimmed = sum(rec.trimmed for rec in records.values())
    n_tests = sum(len(t["test"]) for t in tasks.values())
    print(f"prompts: {len(prompts)} ({n_views} views x {n_tests} test inputs; "
          + (f"{n_samples} sample{'s' * (n_samples > 1)} each), " if n_samples else "searched, not sampled), ")
          + (f"tokens min {lengths[0]} / median {int(statistics.median(lengths))} / max {lengths[-1]}, "
             if lengths else "") + f"{trimmed} train examples trimmed to fit {cfg.max_seq_len}, "
          f"{len(skipped)} {'guesses' if cfg.guesses == 'writeup' else 'views'} skipped as too long")
    for note in skipped[:5]:
        print(f"  skipped {note}")
    if len(skipped) > 5:
        print(f"  ... and {len(skipped) - 5} more, all listed under 'skipped' in results.json")


def dfs_views(model, searches, eos, min_prob, allowed, deadline=None, keep=None, speculate=None):
    """[dfs_search's (found, finished, forwards)] of [(prompt ids, max_new_tokens, drafts)]: one search alone
    (dfs_search, on any backend), several in one batch (dfs_batch); guess_dfs's and bench.py's one way in."""
    if len(searches) > 1:
        return dfs_batch(model, searches, eos, min_prob, allowed, deadline, keep, speculate)
    ids, max_new_tokens, drafts = searches[0]
    return [dfs_search(model, ids, eos, max_new_tokens, min_prob, allowed, drafts, deadline, keep, speculate)]


def make_job(cfg, model, tokenizer, fmt):
    """The Job the modes decide with: the model's scoring (on the prefixes a test input's search kept) and search,
    --dfs-batch views a batch (load_predictor sets 1 for Unsloth)."""
    allowed, eos = answer_ids(tokenizer, fmt), tokenizer.eos_token_id

    def search(searches):
        return dfs_views(model, [(ids, min(cfg.max_new_tokens, cfg.max_seq_len - len(ids)), drafts)
                                 for ids, drafts in searches], eos, cfg.min_prob, allowed, job.deadline, job.prefixes)

    def logprobs(p, c):
        if not job.rescore:
            return [0.0] * len(p)
        start = time.time()
        out = completion_logprobs(model, tokenizer, p, c, cfg.batch_size,
                                  **(dict(prefixes=job.prefixes) if job.prefixes else {}))
        job.score_s += time.time() - start
        return out
    job = Job(cfg, fmt, encode=lambda grid: encode_completion(tokenizer, data.format_completion(grid, fmt)),
              decode=tokenizer.decode, logprobs=logprobs,
              search=search, together=cfg.dfs_batch)
    return job


def decide(rec, mode, job, samples, shown, plan):
    """A task's two guesses per test input, chosen by `mode` from its samples and the views shown (`shown[i]`),
    into `rec`, with the candidates ranked and what timed out; job.forwards counts the search's passes. `plan`
    (plan_task) may show fewer views, end a search before --max-task-seconds does and turn the rescoring off
    (then the candidates are ranked by their votes only, with no score); what it gave up is rec.degraded."""
    job.deadline = time.time() + job.cfg.max_task_seconds if job.cfg.max_task_seconds else None
    job.limit = f"--max-task-seconds {job.cfg.max_task_seconds:g}"
    if plan.until is not None and (job.deadline is None or plan.until < job.deadline):
        job.deadline, job.limit = plan.until, f"its --time-budget share of {plan.share:.1f} s"
    job.forwards, job.rescore, rec.degraded, ranked = 0, plan.rescore, plan.lost, []
    for i in range(len(rec.guesses)):
        job.notes, job.prefixes, job.test = [], {}, i  # a view's cache lives while its test input is decided
        views = {v: view for v, view in shown[i].items() if v < plan.views}
        rec.guesses[i], rec.status[i], found = mode.guess(samples[i], views, job)
        if found is not None and not plan.rescore:  # stable: equal votes stay in the order proposed
            rec.guesses[i], rec.status[i], found = top_two(sorted(([g, n, None] for g, n, _ in found),
                                                                  key=lambda r: -r[1]))
        job.prefixes = {}
        ranked.append(found)
        rec.timed_out += [f"test {i}: {note}" for note in job.notes]
    if any(r is not None for r in ranked):
        rec.candidates = ranked


def size_task(budget, model, group, shown, n_views, samples, tokenizer, fmt):
    """Under a --time-budget: the tokens per view of the task of `group` (task_load; `shown`: see sampled_prompts);
    before the first task, the rates one forward pass of its first prompt measures."""
    count = lambda grid: len(encode_completion(tokenizer, data.format_completion(grid, fmt)))  # noqa: E731
    for tid, task in group.items():
        budget.sizes[tid] = task_load(task, {i: shown.get((tid, i), {}) for i in range(len(task["test"]))}, n_views,
                                      samples, count)
    first = next((ids for views in shown.values() for _, _, ids in views.values()), None)
    if budget.rates == (0.0, 0.0) and first is not None:
        budget.rates = forward_rates(model, first)
        print(f"time budget: a forward pass takes {1000 * budget.rates[0]:.2f} ms per prompt token, "
              f"{1000 * budget.rates[1]:.1f} ms per answer token: the first task is planned at those rates, each "
              "later one as the tasks before it measured against them")


def sampled_prompts(tasks, tokenizer, fmt, cfg, views, say=True):
    """(prompts, records, shown): per task, a prompt per test input x view x sample of the mode (build_prompts, said
    in the `prompts:` line when `say`), and per (task, test input) -> view -> (k, perm, prompt ids): what the modes
    score candidates against."""
    prompts, records = build_prompts(tasks, tokenizer, fmt, cfg.max_seq_len, views, cfg.guesses == "writeup")
    n_samples = MODES[cfg.guesses].samples(cfg)
    if say:
        describe_prompts(cfg, tasks, prompts, records, len(views), n_samples)
    shown, by_task = {}, {}
    for p in prompts:
        shown.setdefault((p["task_id"], p["test"]), {})[p["view"]] = (*views[p["view"]], p["ids"])
        by_task.setdefault(p["task_id"], []).extend(dict(p, sample=j) for j in range(n_samples))
    return by_task, records, shown


def planned(budget, group, cut, model, tokenizer, fmt, cfg, now):
    """(Plan, or None where the group is cut; its prompts by task, Records and shown: see sampled_prompts). Under a
    budget the group is one task, its prompts built and sized (size_task) before it is planned; once out of time
    (spent, or a task before it cut) none is built: the rest are cut too."""
    if budget is not None and (budget.end <= now or cut):
        return None, {}, {}, {}
    views = view_list(cfg)
    by_task, records, shown = sampled_prompts(group, tokenizer, fmt, cfg, views, budget is None)
    if budget is not None:
        size_task(budget, model, group, shown, len(views), MODES[cfg.guesses].samples(cfg), tokenizer, fmt)
    return plan_task(budget, group, len(views), cfg.guesses == "writeup", now), by_task, records, shown


def predict(tasks, model, tokenizer, fmt, cfg, cache, settings, use_adapter=None, budget=None):
    """Generate every guess of `tasks`, appending each task's Record to the `cache` file as soon as its guesses are
    chosen. use_adapter(task_id), when given, loads that task's test-time-trained adapter before its prompts. With
    a `budget` (--time-budget), tasks run one at a time, each as plan_task fits it into its share; those it cuts
    are neither prompted, predicted nor cached. Returns (generated tokens, seconds, ids of the tasks cut)."""
    from tqdm import tqdm
    mode, records, shown = MODES[cfg.guesses], {}, {}
    samples = {tid: [[] for _ in task["test"]] for tid, task in tasks.items()}  # (view, grid as written, status)
    job = make_job(cfg, model, tokenizer, fmt)
    t0, generated, current, cut = time.time(), 0, None, []
    # the bar closed however predicting ends (a signal's line comes after it); each task's line on disk at once
    with tqdm(total=len(tasks), unit="task", desc="tasks") as bar, open(cache, "a", encoding="utf-8", buffering=1) as f:
        def load(tid):
            nonlocal current
            if use_adapter is not None and tid != current:
                current = tid
                use_adapter(tid)
        def finish(tid, plan):
            nonlocal generated
            rec, job.task = records[tid], tasks[tid]
            load(tid)  # a mode that searches (dfs) uses the task's adapter here, after no generation
            decide(rec, mode, job, samples[tid], {i: shown.get((tid, i), {}) for i in range(len(rec.guesses))}, plan)
            rec.tokens["generated"] += job.forwards
            generated += job.forwards
            for note in rec.timed_out + ([f"degraded: {rec.degraded}"] if rec.degraded else []):
                bar.write(f"task {tid} {note}")
            rec.settings, rec.fingerprint = settings, task_fingerprint(tasks[tid])
            append_line(f, json.dumps(dataclasses.asdict(rec)))
            bar.update(1)
        for group in [tasks] if budget is None else [{tid: task} for tid, task in tasks.items()]:
            start, job.score_s, job.unsearched = time.time(), 0.0, 0
            plan, by_task, group_records, group_shown = planned(budget, group, cut, model, tokenizer, fmt, cfg, start)
            if plan is None:  # out of time: not predicted, not cached
                cut += group
                bar.update(len(group))
                continue
            records.update(group_records)
            shown.update(group_shown)
            todo = [p for tid in group for p in by_task.get(tid, []) if p["view"] < plan.views]
            pending = Counter(p["task_id"] for p in todo)
            for tid in [tid for tid in group if pending[tid] == 0]:
                finish(tid, plan)
            for batch in batches(todo, cfg.batch_size, use_adapter is not None):
                load(batch[0]["task_id"])
                seeds = [row_seed(cfg.seed, p["task_id"], p["test"], p["view"], p.get("sample", 0)) for p in batch]
                texts = generate_halving(model, tokenizer, [p["ids"] for p in batch], cfg, fmt, seeds)
                for p, text in zip(batch, texts):
                    rec, (grid, status) = records[p["task_id"]], parse_guess(text, fmt)
                    samples[p["task_id"]][p["test"]].append((p["view"], grid, status))
                    n = len(tokenizer.encode(text, add_special_tokens=False))  # the answer's tokens, EOS not counted
                    rec.tokens["generated"] += n
                    generated += n
                    pending[p["task_id"]] -= 1
                    if pending[p["task_id"]] == 0:
                        finish(p["task_id"], plan)
                bar.set_postfix_str(f"{generated / (time.time() - t0):.0f} tok/s")
            measure(budget, plan, group, time.time() - start, job.score_s, job.unsearched)
    return generated, time.time() - t0, cut


# ----------------------------------------------------------------------------
# files: cache, submission, shards

def paths(out, shard="", limit=0, mode="writeup", by_mode=True):
    """(submission, cache, results, plots folder) for a submission path, a guess mode, an optional shard "i/n" and
    --limit N (a partial submission named so, never the full one). With `by_mode` (the default output, in the run
    folder) each mode but writeup is in the names, so modes tried side by side keep their own files and cache; an
    --out the user gave is written as spelled, whatever the mode (check_mode keeps another mode's files safe)."""
    out = Path(out)
    suffix = f".{mode}" if by_mode and mode != "writeup" else ""
    plots = out.parent / f"plots{suffix}"
    if shard:
        i, n = shard.split("/")
        suffix += f".shard-{i}-of-{n}"
    if limit:
        suffix += f".limit-{limit}"
    sub = out.with_name(out.stem + suffix + ".json")
    return sub, sub.with_suffix(".cache.jsonl"), out.with_name(f"results{suffix}.json"), plots


def check_mode(flag, sub_path, results_path, mode):
    """Refuse, in one line, to write a --guesses `mode` submission over one that another mode wrote (its results
    file names the mode): the first mode's files stay as they are. Its cache refuses a second mode by itself
    (read_cache: other settings)."""
    written = read_json(results_path).get("mode") if results_path.is_file() else None
    if written is not None and written != mode:
        raise OneLineError(f"{flag}: {sub_path} is the --guesses {written} submission ({results_path} says so); "
                           f"--guesses {mode} would write over it: give another {flag}, or move those files away")


def append_line(f, line):
    """One line appended to the open cache file whole: workers on one --out append to it side by side."""
    import fcntl
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        f.write(line + "\n")
        f.flush()
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def read_cache(path, settings=None, repair=False):
    """Finished tasks by id, as Records. A damaged line (a run killed mid-write, binary bytes, missing fields)
    only costs its own task, predicted again; with `repair` it is also cut out of the file. Lines written with
    other settings than `settings` are an error, so two models never mix in one submission."""
    if not path.exists():
        return {}
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # binary junk fails as JSON, line by line
    except OSError as e:
        raise OneLineError(f"{path}: cannot be read ({e.strerror})")
    records, good, damaged = {}, [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = Record.from_json(json.loads(line))
        except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
            damaged.append(n)
            continue
        if settings is not None and rec.settings != settings:
            change = settings_change(rec.settings or {}, settings)
            if repair and "other weights" in change:
                return move_aside(path, rec.settings)
            raise OneLineError(f"{path}: {change}; pass another --out or delete it")
        records[rec.task_id] = rec
        good.append(line)
    if damaged:
        print(f"note: {path}: damaged line{'s' * (len(damaged) > 1)} {', '.join(map(str, damaged))} dropped (a run "
              "killed while writing, or a damaged file): those tasks are predicted again")
    if repair and (damaged or not text.endswith("\n")):  # the next append must start a line of its own
        write_atomic(path, "".join(line + "\n" for line in good))
    return records


def answered(records, tasks):
    """The cached Records of `tasks` that answer those very grids (the task's fingerprint): a task file changed
    under the same id and path is predicted again, never answered from another task's line."""
    return {tid: rec for tid, rec in records.items()
            if tid in tasks and rec.fingerprint == task_fingerprint(tasks[tid])}


def move_aside(cache, saved):
    """A cache of other weights (the run trained further, or replaced) renamed to cache.<its weights>.jsonl, kept
    whole, so that every task is predicted afresh; said in one line. Returns no records."""
    old = cache.with_name(f"{cache.name[:-len('.jsonl')]}.{safe_name(str((saved or {}).get('weights')))}.jsonl")
    cache.replace(old)
    print(f"note: {cache}: written by other weights (the run was trained further or replaced): moved to {old}; "
          "every task is predicted afresh")
    return {}


def settings_change(saved, settings):
    """Why a cache line cannot be reused under `settings`."""
    if {k for k, v in settings.items() if saved.get(k) != v} <= {"weights", "model"}:
        return "written by other weights (the run was trained further or replaced)"
    return "written with other settings (" + ", ".join(f"{k} {saved.get(k)!r} now {v!r}" for k, v in settings.items()
                                                       if saved.get(k) != v) + ")"


def lock(cache):
    """An exclusive lock on a file beside the cache, held while this process predicts into it: a second infer.py on
    the same --out stops at once instead of doing every task again. The OS drops it when we exit, kill -9 too."""
    return lock_file(cache.with_name(cache.name + ".lock"), f"{cache}: another infer.py is predicting into "
                          "it; wait for it to finish or give another --out")


MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.model", "*.txt", "*.jinja", "*config.json",
               "tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "*.index.json",
               "chat_template.json")  # what transformers, peft and Unsloth load from a model folder


def dataset_folders(cfg):
    """The folders whose *.json files a plain folder --dataset reads as tasks, for any --split (none for a file, an
    embedded set or a Kaggle data folder, which read named files only)."""
    source = Path(cfg.dataset)
    if not source.is_dir() or data.kaggle_files(source):
        return set()
    return {data.task_folder(source, split).resolve() for split in data.SPLITS}


def input_files(cfg, run=None):
    """Files infer.py reads, which no output may replace: the dataset's (a file and its *_solutions.json, a
    Kaggle folder's challenges and solutions, a folder's task files) and the model's (the run's config.json, the
    weight, config and tokenizer files of its folders). An earlier infer.py's outputs there are not inputs."""
    source, files = Path(cfg.dataset), set()
    if source.is_file():
        files |= {source, source.with_name(source.name.replace("_challenges", "_solutions"))}
    elif source.is_dir() and data.kaggle_files(source):
        files |= {f.with_name(f.name.replace("_challenges", n)) for f in data.kaggle_files(source).values()
                  for n in ("_challenges", "_solutions")}
    elif source.is_dir():
        files |= set(data.task_folder(source, cfg.split).glob("*.json"))
    if run is not None:
        files |= {f for f in run.files() if any(f.match(pattern) for pattern in MODEL_FILES)}
    return {f.resolve() for f in files}


def check_outputs(flag, outputs, inputs, task_folders=()):
    """Refuse, in one line, an output path that is another output's (name -> path) or an input file's, or a .json
    output in one of the dataset's task folders (the next run would read it as a task)."""
    seen = {}
    for name, path in outputs.items():
        where = Path(path).resolve()
        if where in inputs:
            raise OneLineError(f"{flag}: the {name} {path} would be written over an input file; give another {flag}")
        if where.parent in task_folders and where.suffix == ".json":
            raise OneLineError(f"{flag}: the {name} {path} would be in the dataset's task folder {where.parent}, "
                               f"where every *.json file is read as a task; give another {flag}")
        if where in seen:
            raise OneLineError(f"{flag}: the {seen[where]} and the {name} would both be written to {path}; give "
                               f"{flag} another name")
        seen[where] = name


def shard_tasks(tasks, shard):
    """The slice `i/n` of the tasks: those at index i, i+n, ... in id order."""
    m = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not m or not int(m[1]) < int(m[2]):
        raise OneLineError(f"--shard {shard}: expected i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(m[1]), int(m[2])
    return {tid: tasks[tid] for j, tid in enumerate(sorted(tasks)) if j % n == i}


def merge_shards(out, tasks, limit=0, mode="writeup", by_mode=True):
    """(submission, guesses or None) joined from the shard files beside `out` that predicting with the same --limit
    and --guesses wrote (paths() names them); raises OneLineError naming what is missing, or shards predicted with
    other settings than each other (another model's weights, another mode or sampling). Guesses come from the
    shard caches when all of them are there."""
    named = paths(out, "0/1", limit, mode, by_mode)[0].name  # e.g. submission.vote.shard-0-of-1.limit-3.json
    folder = Path(out).parent
    pattern = re.escape(named).replace(re.escape(".shard-0-of-1"), r"\.shard-(\d+)-of-(\d+)")
    found = {}  # n -> {i: path}
    for p in folder.glob("*.json"):
        m = re.fullmatch(pattern, p.name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    if len(found) != 1:
        raise OneLineError(f"{folder}: no {named.replace('0-of-1', 'i-of-n')} files to merge; run --shard i/n first "
                           "(with the same --limit and --guesses)" if not found
                           else f"{folder}: shard files of several --shard n ({', '.join(map(str, found))}); keep one set")
    n, files = found.popitem()
    missing = [f"{i}/{n}" for i in range(n) if i not in files]
    if missing:
        raise OneLineError(f"{folder}: shards {', '.join(missing)} missing; run them with --shard")
    sub, guesses, written = {}, {}, {}
    for i in range(n):
        part = shard_tasks(tasks, f"{i}/{n}")
        sub.update(read_submission(files[i], part))
        cache = read_cache(files[i].with_suffix(".cache.jsonl"))
        written[i] = shard_settings(cache, paths(out, f"{i}/{n}", limit, mode, by_mode)[2])
        done = answered(cache, part)
        if guesses is not None and len(done) == len(part):
            guesses.update({tid: done[tid].guesses for tid in part})
        else:
            guesses = None
    check_same_settings(written, n)
    print(f"merged {n} shards: {', '.join(str(files[i]) for i in range(n))}")
    return {tid: sub[tid] for tid in sorted(sub)}, guesses


def shard_settings(cache, results):
    """The settings a shard was predicted with (its model's weights among them), from its cache lines, else from
    its `results` file; None when neither is there."""
    found = [rec.settings for rec in cache.values() if rec.settings]
    if found:
        return found[-1]
    return (read_json(results).get("settings") or None) if results.is_file() else None


def check_same_settings(written, n):
    """OneLineError naming the shards (i -> settings) predicted with other settings than shard 0/n's: joining them
    would mix two models, or two ways of guessing, in one submission. A shard with no record is said."""
    unknown = [f"{i}/{n}" for i, s in written.items() if s is None]
    if unknown:
        print(f"note: shard{'s' * (len(unknown) > 1)} {', '.join(unknown)}: no cache or results beside the "
              "submission file, so its model and settings cannot be checked against the others")
    known = {i: s for i, s in written.items() if s is not None}
    if not known:
        return
    first = min(known)
    for i, s in known.items():
        differ = [k for k in sorted({*s, *known[first]}) if s.get(k) != known[first].get(k)]
        if differ:
            raise OneLineError(f"--join-shards: shards {first}/{n} and {i}/{n} were predicted with other "
                               + ", ".join(f"{k} ({known[first].get(k)!r} and {s.get(k)!r})" for k in differ)
                               + ": one submission joins the shards of one model and settings; predict the odd ones "
                               "again with --shard")


# ----------------------------------------------------------------------------
# scores


def print_results(r, reference=False):
    """The write-up's table, one row per mode: the mode's name first (- when unknown), the guess columns named as
    the mode names its guesses; the write-up's own row below it when asked."""
    found = ("Found",) if r.get("found") is not None else ()  # known where the candidates are (a predicted run)
    columns = table_columns(guess_names(r.get("mode"))) + found
    print(f"\n| Guesses | {' | '.join(columns)} |\n|---|{'|'.join('---' for _ in columns)}|")
    print(f"| {r.get('mode') or '-'} | {' | '.join(str(r[k]) for k in TABLE_KEYS + ('found',) * bool(found))} |")
    if reference:
        print(f"| writeup | {' | '.join(str(WRITEUP_SCORES[k]) for k in TABLE_KEYS)} |{' - |' * bool(found)}  <- the write-up "
              "(Llama-3-8B)"
              + ("" if r.get("mode") == "writeup" else ": its last guess column is its transposed guess"))
    unscored = f" ({r['tasks'] - r['scored']} tasks without a usable solution not scored)" \
        if r["scored"] < r["tasks"] else ""
    print(f"\nofficial score: {r['score']:.2f} / {r['scored']} = {r['score_pct']:.2f}%{unscored}   "
          f"(write-up: {WRITEUP_SCORES['solved_any']} / {WRITEUP_SCORES['tasks']} = {WRITEUP_SCORES['solved_any'] / WRITEUP_SCORES['tasks']:.2%})")
    print(f"guesses: {r['guesses']} ({r['test_inputs']} test inputs x 2), unanswered {r['unanswered']}, "
          f"correct size {r['correct_size']:.1%}, correct pixels {r['correct_pixels']:.1%}")
    if found:
        print(f"found: the right grid among the candidates of {r['found']} of {r['scored']} tasks and "
              f"{r['found_test_inputs']} test inputs (solved by either guess: {r['solved_any']} tasks)")


# ----------------------------------------------------------------------------
# the three commands: --score a file, --join-shards, predict (the default)

def report(cfg, tasks, sub, guesses, sub_path, results_path, plots, title, extra=None, t0=None):
    """Score a written submission when solutions are known, write results.json, plot. With `t0` (the command's
    start), results' time_s counts the writing and scoring too."""
    r = score(tasks, sub, guesses)
    r.update(extra or {}, submission=str(sub_path))
    if t0 is not None:
        r["time_s"] = round(time.time() - t0, 1)
    if r["solutions"]:
        print_results(r, reference=cfg.dataset == "arc1" and cfg.split == "eval" and len(tasks) == 400)
    else:
        print(f"\nno solutions for {cfg.dataset} {cfg.split}: not scored; {r['predicted']} of {r['tasks']} tasks "
              f"have a guess, {r['unanswered']} of {r['guesses']} guesses unanswered")
    write_json(results_path, r, indent=1)
    files = [sub_path, results_path]
    if cfg.plot and r["solutions"]:
        files += plot_results(tasks, guesses or answers_of(sub), r, plots, title, guess_names(r.get("mode")))
    elif cfg.plot:
        print("--plot: no solutions to compare with, no pictures")
    return r, files


def describe_files(files):
    """The files written, with the pictures counted rather than listed."""
    pngs = [f for f in files if str(f).endswith(".png")]
    named = [str(f) for f in files if f not in pngs]
    return ", ".join(named + ([f"{len(pngs)} PNGs in {Path(pngs[0]).parent}"] if pngs else []))


def scored_results_path(sub_path):
    """Where --score FILE writes its results: beside FILE, named after it as predicting names them
    (submission.limit-3.json -> results.limit-3.json), any other name kept whole (mine.json -> results.mine.json),
    so that scoring one file never replaces the results of another."""
    stem = sub_path.stem
    rest = stem[len("submission"):] if stem == "submission" or stem.startswith("submission.") else f".{stem}"
    return sub_path.with_name(f"results{rest}.json")


def score_file(cfg, tasks, unreadable):
    """--score FILE: score an existing submission from its attempts alone (no model, no cache: the file is what
    Kaggle scores); the file itself is only read."""
    sub_path = Path(cfg.score)
    results_path = scored_results_path(sub_path)
    check_outputs("--score", dict(scored=sub_path, results=results_path), input_files(cfg) - {sub_path.resolve()},
                  dataset_folders(cfg))
    sub = read_submission(sub_path, tasks, unreadable)
    _, files = report(cfg, tasks, sub, None, sub_path, results_path, sub_path.parent / "plots",
                      f"{sub_path} on {cfg.dataset} {cfg.split}", dict(mode=None))
    print(f"wrote {describe_files(files[1:])}")


def merge(cfg, tasks, unreadable):
    """--join-shards: join the --shard slices beside --out into the full submission and score it."""
    out = Path(cfg.out) if cfg.out else \
        find_run(cfg.model, cfg.adapter, cfg.max_seq_len, cfg.base_model).folder / "submission.json"
    out = submission_path(out)
    sub_path, _, results_path, plots = paths(out, "", cfg.limit, cfg.guesses, by_mode=not cfg.out)
    check_mode("--out", sub_path, results_path, cfg.guesses)
    sub, guesses = merge_shards(out, tasks, cfg.limit, cfg.guesses, by_mode=not cfg.out)
    sub = dict(sorted({**sub, **submission_of({}, {}, unreadable)}.items()))
    save_submission(sub, tasks, unreadable, sub_path)
    _, files = report(cfg, tasks, sub, guesses, sub_path, results_path, plots, f"{out} (merged shards)",
                      dict(mode=cfg.guesses))
    print(f"wrote {describe_files(files)}")


def describe_mode(cfg):
    """The mode's line: its name and its table description with this run's flags filled in."""
    views = f"{cfg.views} views ({min(cfg.views, 8)} symmetries" + \
        (f", {cfg.views - 8} with colour permutations)" if cfg.views > 8 else ")")
    uses_budget = "max_task_seconds" in MODES[cfg.guesses].flags
    budget = f"; at most {cfg.max_task_seconds:g} s per task" if uses_budget and cfg.max_task_seconds else ""
    return f"{cfg.guesses}: " + MODES[cfg.guesses].describe.format(views=views, samples=cfg.samples,
                                                                    min_prob=cfg.min_prob) + budget


def unused_flags(cfg):
    """The mode-specific flags given a value other than their default that this mode does not use."""
    defaults = Config()
    return [f"--{f.replace('_', '-')} {getattr(cfg, f)}" for f in MODE_FLAGS
            if getattr(cfg, f) != getattr(defaults, f) and f not in MODES[cfg.guesses].flags]


def warn_seen(run, tasks):
    """Ids of `tasks` the run was trained on, grid for grid (the contamination guard), said in one warning line."""
    seen = seen_in_training(tasks, run.fingerprints)
    if seen:
        sets = ", ".join(f"{s['dataset']} {s['split']}" for s in run.trained_on)
        print(f"warning: {len(seen)} of {len(tasks)} tasks scored here are, grid for grid, tasks this model was "
              f"trained on ({sets}; first: {', '.join(seen[:5])}): their scores measure memory, not reasoning")
    return seen


def cut_records(cut, tasks, cache_path):
    """Placeholder Records ([[0]] attempts, status cut_by_budget) of the tasks --time-budget left unpredicted, said
    in one line; they are not in the cache, so the same command with more time predicts them."""
    if cut:
        print(f"cut by --time-budget: {len(cut)} tasks, first: {', '.join(cut[:5])}: [[0]] in the submission and "
              f"not in {cache_path}; the same command with a longer --time-budget (or none) predicts them")
    return {tid: Record.empty(tid, len(tasks[tid]["test"]), "cut_by_budget") for tid in cut}


def load_predictor(cfg, run, setup, todo):
    """(model, tokenizer, format, cfg with the run's lengths, use_adapter or None): the model loaded on `setup`'s
    device, its sampling or search and guess mode said; use_adapter(task_id) puts on a task's test-time adapter."""
    import torch
    model, tokenizer = load_model(run, setup)
    torch.manual_seed(cfg.seed)
    fmt = run.format or data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    cfg = replace(cfg, max_seq_len=run.max_seq_len, max_new_tokens=cfg.max_new_tokens or answer_tokens(tokenizer, fmt),
                  dfs_batch=cfg.dfs_batch if setup.backend == "transformers" else 1)  # dfs_batch: a 4-D mask
    if MODES[cfg.guesses].samples(cfg):
        print(f"sampling: top_k {cfg.top_k}, temperature {cfg.temperature}, max_new_tokens {cfg.max_new_tokens}, "
              f"batch_size {cfg.batch_size}, seed {cfg.seed}, format {fmt}")
    else:
        print(f"search: min_prob {cfg.min_prob} (at most {int(1 / cfg.min_prob)} answers per view), "
              f"max_new_tokens {cfg.max_new_tokens}, scoring batch_size {cfg.batch_size}, format {fmt}, views "
              + (f"{cfg.dfs_batch} a batch" if cfg.dfs_batch > 1 else "one at a time")
              + (" (Unsloth's forward takes no 4-D attention mask)" if setup.backend != "transformers" else ""))
    print(f"guesses: {describe_mode(cfg)}")
    use_adapter = adapter_loader(model, run, todo) if run.ttt_mode == "per-task" and run.ttt_adapters() else None
    return model, tokenizer, fmt, cfg, use_adapter


def predict_here(cfg, run, setup, todo, cache_path, settings, end):
    """(generated tokens, seconds, ids cut, {}): `todo` predicted in this process (predict)."""
    model, tokenizer, fmt, cfg, use_adapter = load_predictor(cfg, run, setup, todo)
    if end:
        print(f"time budget: --time-budget {cfg.time_budget}, " + (
            f"{end - time.time():.0f} s left after loading: each of the {len(todo)} tasks in turn gets the time "
            "left / the tasks left" if end > time.time() else "all spent before predicting: every task is cut"))
    budget = Budget(end, len(todo)) if end else None
    return (*predict(todo, model, tokenizer, fmt, cfg, cache_path, settings, use_adapter, budget), {})


def start_worker(slot, cfg, run, todo, cache_path, settings, end, n):
    """A worker process's start (workers.serve): its device (the GPU it is pinned to), the model, once."""
    quiet_libraries()
    setup = make_setup(cfg.device, cfg.backend, trained_with=run.backend, ttt=bool(run.ttt_mode))
    model, tokenizer, fmt, cfg, use_adapter = load_predictor(cfg, run, setup, todo)
    return SimpleNamespace(model=model, tokenizer=tokenizer, fmt=fmt, cfg=cfg, use_adapter=use_adapter, todo=todo,
                           cache_path=cache_path, settings=settings, n=n,
                           budget=Budget(end, len(todo)) if end else None)


def worker_task(w, tid, waiting):
    """One task predicted in a worker, its Record appended to the shared cache: (generated tokens, seconds, cut).
    Under --time-budget its share is the time left x the workers / the tasks not taken yet (`waiting`)."""
    if w.budget:
        w.budget.tasks_left = -(-waiting // w.n)
    generated, seconds, cut = predict({tid: w.todo[tid]}, w.model, w.tokenizer, w.fmt, w.cfg, w.cache_path,
                                      w.settings, w.use_adapter, w.budget)
    return generated, seconds, bool(cut)


def predict_on_workers(cfg, n, pinned, run, todo, cache_path, settings, end):
    """(generated tokens, seconds, ids cut, {id: why} of tasks given up): `todo` over `n` worker processes
    (workers.run), the longest task first, each task's Record in the cache as it finishes."""
    from tqdm import tqdm
    order = sorted(todo, key=lambda tid: -data.task_size(todo[tid]))
    if end:
        print(f"time budget: --time-budget {cfg.time_budget}, shared by the {n} workers: each task in turn gets the "
              "time left x the workers / the tasks left")
    bar, t0, got = tqdm(total=len(order), unit="task", desc=f"tasks on {n} workers"), time.time(), [0, set()]

    def on_done(tid, result):
        generated, _, cut = result
        got[0] += generated
        if cut:
            got[1].add(tid)
        bar.update(1)
    lost = workers.run(n, pinned, start_worker, worker_task, (cfg, run, todo, cache_path, settings, end, n), order,
                       on_done)
    bar.close()
    return got[0], time.time() - t0, [tid for tid in todo if tid in got[1]], lost


def lost_records(lost, tasks):
    """Placeholder Records ([[0]] attempts, status worker_died) of the tasks whose worker died twice, said in one
    line."""
    if lost:
        print(f"given up: {len(lost)} tasks whose worker died twice, first: {', '.join(list(lost)[:5])}: [[0]] in the "
              "submission and not cached; the same command again predicts them")
    return {tid: Record.empty(tid, len(tasks[tid]["test"]), "worker_died") for tid in lost}


def predict_missing(cfg, run, tasks, cache_path, settings, setup, n, end=None):
    """(records, generated tokens, seconds, ids cut by --time-budget, {id: why} given up): every task's Record,
    from the cache, predicted now (here, or over `n` workers), or a placeholder where predicting it would pass
    `end` (cut_records) or its worker died twice (lost_records)."""
    cached = read_cache(cache_path, settings, repair=True)
    done = answered(cached, tasks)
    changed = sorted(tid for tid in cached if tid in tasks and tid not in done)
    if changed:
        print(f"note: {cache_path}: the cached answers of {len(changed)} tasks are not for their grids now (first: "
              f"{', '.join(changed[:5])}; a task file changed under the same id, or an older infer.py wrote them): "
              "predicted again")
    todo = {tid: task for tid, task in tasks.items() if tid not in done}
    print(f"tasks: {len(tasks)} of {cfg.dataset} {cfg.split}" + (f" (shard {cfg.shard})" if cfg.shard else "")
          + f", {len(done)} already done in {cache_path}, {len(todo)} to do")
    generated, seconds, cut, lost = 0, 0.0, [], {}
    if todo and end and time.time() >= end:  # spent reading the tasks: no model loaded, no prompt built
        print(f"time budget: --time-budget {cfg.time_budget} all spent before loading the model: every task is cut")
        cut = list(todo)
    elif todo:
        try:
            if min(n, len(todo)) > 1:  # no more workers than tasks
                n = min(n, len(todo))
                generated, seconds, cut, lost = predict_on_workers(cfg, n, workers.pins(n, setup), run, todo,
                                                                   cache_path, settings, end)
            else:
                generated, seconds, cut, lost = predict_here(cfg, run, setup, todo, cache_path, settings, end)
        except (Stopped, KeyboardInterrupt) as e:  # KeyboardInterrupt: infer.main called from a program of its own
            n = len(read_cache(cache_path))
            said = f": {n} finished tasks are saved in {cache_path}; the same command again resumes"
            if isinstance(e, Stopped):
                raise Stopped(e.signum, said)
            sys.exit(f"\ninterrupted{said}")
        except OSError as e:  # a full disk or a file-size limit while appending a task's line
            raise OneLineError(write_failure(cache_path, e) + "; the tasks finished before it are kept: the same "
                               "command again resumes")
        done.update(read_cache(cache_path, settings))
    done.update(cut_records(cut, tasks, cache_path))
    done.update(lost_records(lost, tasks))
    return {tid: done[tid] for tid in tasks}, generated, seconds, cut, lost


def budget_results(cfg, records, cut):
    """results.json's lines on --time-budget: the tasks it cut, and every task that gave something up to fit its
    share (cached ones too), where there is a budget or a degraded task."""
    degraded = {tid: rec.degraded for tid, rec in records.items() if rec.degraded}
    return dict(time_budget=cfg.time_budget, cut_by_budget=cut, degraded=degraded) \
        if budget_seconds(cfg.time_budget) or degraded else {}


def predict_all(cfg, tasks, unreadable, t0):
    """Predict every task not already in the cache, then write the submission and its scores."""
    run = find_run(cfg.model, cfg.adapter, cfg.max_seq_len, cfg.base_model)
    check_ttt_base(run)
    # before any output: a GPU that torch cannot use stops here; `import unsloth` comes before transformers
    setup = make_setup(cfg.device, cfg.backend, trained_with=run.backend, ttt=bool(run.ttt_mode))
    n = workers.worker_count(cfg.gpus, setup)
    out = submission_path(Path(cfg.out) if cfg.out else run.folder / "submission.json")
    if cfg.shard:  # unreadable tasks join the submission at --join-shards
        tasks, unreadable = shard_tasks(tasks, cfg.shard), {}
    sub_path, cache_path, results_path, plots = paths(out, cfg.shard, cfg.limit, cfg.guesses, by_mode=not cfg.out)
    check_mode("--out", sub_path, results_path, cfg.guesses)
    check_outputs("--out", dict(submission=sub_path, cache=cache_path, results=results_path,
                                lock=cache_path.with_name(cache_path.name + ".lock")), input_files(cfg, run),
                  dataset_folders(cfg))
    if cfg.limit:
        print(f"partial: --limit {cfg.limit}: {len(tasks)} tasks only, so the submission is {sub_path}, not {out}")
    check_writable(sub_path.parent)
    sub_path.parent.mkdir(parents=True, exist_ok=True)  # for the lock file
    settings = dict(model=model_key(run), weights=weights_fingerprint(run), dataset=cfg.dataset, split=cfg.split,
                    max_seq_len=run.max_seq_len, temperature=cfg.temperature, top_k=cfg.top_k,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    settings.update(guesses=cfg.guesses, **{f: getattr(cfg, f) for f in MODES[cfg.guesses].flags})
    for flag in unused_flags(cfg):
        print(f"note: {flag}: not used by --guesses {cfg.guesses}")
    print(f"model: {model_name(run)} (format {run.format or 'from the tokenizer'}, max_seq_len {run.max_seq_len})"
          + (f", test-time trained ({run.ttt_mode})" if run.ttt_mode else ""))
    seen = warn_seen(run, tasks)
    no_adapter = missing_adapters(run, tasks)
    with lock(cache_path):
        end = t0 + budget if (budget := budget_seconds(cfg.time_budget)) else None
        records, generated, seconds, cut, lost = predict_missing(cfg, run, tasks, cache_path, settings, setup, n, end)
        status = [s for rec in records.values() for pair in rec.status for s in pair]
        skipped = [f"task {tid} {note}" for tid, rec in records.items() for note in rec.skipped]
        extra = dict(generate_s=round(seconds, 1), generated_tokens=generated,
                     tokens_per_s=round(generated / seconds, 1) if seconds else None, shard=cfg.shard or None,
                     workers=n,
                     guess_status={s: status.count(s) for s in sorted(set(status))}, skipped=skipped,
                     timed_out={tid: rec.timed_out for tid, rec in records.items() if rec.timed_out},
                     trimmed_examples=sum(rec.trimmed for rec in records.values()), settings=settings,
                     unreadable={tid: reason for tid, (reason, _) in unreadable.items()}, mode=cfg.guesses,
                     seen_in_training=seen, no_adapter=no_adapter, **coverage(tasks, records),
                     **budget_results(cfg, records, cut), **(dict(worker_died=lost) if lost else {}))
        sub = submission_of(tasks, records, unreadable)
        save_submission(sub, tasks, unreadable, sub_path)
        r, files = report(cfg, tasks, sub, {tid: rec.guesses for tid, rec in records.items()},
                          sub_path, results_path, plots, model_name(run), extra, t0)
    if run.tiny:
        print(f"note: this is the tiny model ({TINY_NOTE}): it proves the pipeline, it is not meant to "
              "solve real ARC tasks; train a real model on a GPU (python train.py) or --model smollm2")
    print(f"\ndone in {r['time_s']:.0f} s: generated {generated} tokens in {seconds:.0f} s "
          f"({extra['tokens_per_s'] or 0:.0f} tok/s), peak {'%s %.1f GB' % peak_memory_gb()}; "
          f"guess status {extra['guess_status']}")
    print(f"wrote {describe_files(files)} (cache {cache_path})")
    if cfg.shard:
        print("when every shard is done: python infer.py --join-shards (with the same --model/--out/--dataset/--split)")


def main(argv=None):
    cfg = parse_config(Config, "Predict ARC test outputs with a fine-tuned model, write a Kaggle submission "
                                    "and score it.", argv)
    quiet_libraries()
    line_buffered()
    t0 = time.time()
    try:
        check_ranges(cfg, CHECKS)
        # only --score needs the solutions: a broken *_solutions.json does not stop predicting
        tasks, unreadable = data.load_tasks(cfg.dataset, cfg.split, strict_solutions=bool(cfg.score),
                                                quiet=True)  # said below as unreadable tasks
        if cfg.limit:
            first = set(sorted({*tasks, *unreadable})[:cfg.limit])
            tasks = {tid: task for tid, task in tasks.items() if tid in first}
            unreadable = {tid: u for tid, u in unreadable.items() if tid in first}
        for reason, _ in unreadable.values():
            print(f"unreadable task, [[0]] in the submission: {reason}", file=sys.stderr)
        if (cfg.score or cfg.join_shards) and budget_seconds(cfg.time_budget):
            print(f"note: --time-budget {cfg.time_budget}: not used by {'--score' if cfg.score else '--join-shards'} "
                  "(nothing is predicted)")
        if cfg.score:
            score_file(cfg, tasks, unreadable)
        elif cfg.join_shards:
            merge(cfg, tasks, unreadable)
        else:
            predict_all(cfg, tasks, unreadable, t0)
    except OneLineError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_command(main)
