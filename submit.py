"""A task's predictions (one line of the cache) and the Kaggle submission built from them: checked, written, read
back and scored against the solutions."""
import dataclasses
import json
from dataclasses import dataclass, field

import data
from cli import OneLineError, read_json, write_atomic


NO_ANSWER = [[0]]  # what the submission carries where a guess has no answer (Kaggle needs a grid)

WRITEUP_SCORES = dict(tasks=400, predicted=339, solved_any=51, solved_first=38, solved_second=28)  # Llama-3-8B, arc1 eval

TABLE = ("Num Problems", "Predictions", "Solved by any Guess")  # then a column per guess, named by the mode

TABLE_KEYS = ("tasks", "predicted", "solved_any", "solved_first", "solved_second")


@dataclass
class Record:
    task_id: str
    guesses: list   # per test input: [guess 1, guess 2], each a grid in the task's orientation or None
    status: list    # per test input: [status 1, status 2]: ok, no_end, unparsable, too_long or cut_by_budget
    skipped: list = field(default_factory=list)  # "test i guess g: why", for guesses too long to fit
    trimmed: int = 0  # train examples dropped to fit max_seq_len, over all guesses
    tokens: dict = field(default_factory=lambda: dict(prompt=0, generated=0))
    settings: dict = None  # the settings it was predicted with (read_cache compares them)
    candidates: list = field(default_factory=list)  # vote/poe/dfs, per test input: [grid, votes, score] best first
    timed_out: list = field(default_factory=list)  # "test i: why", where a search ran out of --max-task-seconds
    fingerprint: str = None  # data.task_fingerprint of the task it answers: other grids under its id are done again
    degraded: str = ""  # what it gave up to fit its share of --time-budget (fewer views, no rescoring), if anything

    @classmethod
    def empty(cls, task_id, n_tests, status=None):
        return cls(task_id, guesses=[[None, None] for _ in range(n_tests)],
                   status=[[status, status] for _ in range(n_tests)])

    @classmethod
    def from_json(cls, obj):
        """A Record from a cache line's object; ValueError when fields are missing or of the wrong kind, or a guess
        is not a valid grid (hand-edited or damaged lines cost their own task, never the submission)."""
        try:
            rec = cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls)
                         if f.name in obj or f.default is dataclasses.MISSING is f.default_factory})
        except (KeyError, TypeError) as e:
            raise ValueError(f"missing field {e}")
        pairs = rec.guesses if isinstance(rec.guesses, list) else None
        if not isinstance(rec.task_id, str) or not pairs or not isinstance(rec.status, list) or \
                not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
            raise ValueError("task_id, guesses or status of the wrong kind")
        for pair in pairs:
            for grid in pair:
                if grid is not None:
                    data.check_grid(grid, "a guess")
        return rec

    def attempts(self):
        """Kaggle attempts: guess 1 first (guess 2 moves up when guess 1 has no answer), [[0]] for none."""
        out = []
        for g1, g2 in self.guesses:
            answers = [g for g in (g1, g2) if g is not None] + [NO_ANSWER, NO_ANSWER]
            out.append({"attempt_1": answers[0], "attempt_2": answers[1]})
        return out


def check_submission(sub, tasks, where, unreadable=None):
    """Raise OneLineError unless `sub` is Kaggle-shaped: every task of `tasks` and `unreadable` (task_id -> (reason,
    test inputs)) and nothing else, one {attempt_1, attempt_2} dict of valid grids per test input."""
    shape = "a dict of task_id -> [{attempt_1: grid, attempt_2: grid} per test input]"
    counts = {tid: len(task["test"]) for tid, task in tasks.items()}
    counts.update({tid: n for tid, (_, n) in (unreadable or {}).items()})
    if not isinstance(sub, dict):
        raise OneLineError(f"{where}: not a Kaggle submission: expected {shape}, got a {type(sub).__name__}")
    missing, extra = sorted(set(counts) - set(sub)), sorted(set(sub) - set(counts))
    if missing:
        raise OneLineError(f"{where}: {len(missing)} of {len(counts)} tasks missing (first {missing[0]}); "
                           f"Kaggle needs every task (wrong --dataset/--split?)")
    if extra:
        raise OneLineError(f"{where}: {len(extra)} task ids not in the dataset (first {extra[0]}); "
                           "wrong --dataset/--split?")
    for tid, n in counts.items():
        entries = sub[tid]
        if not isinstance(entries, list) or len(entries) != n:
            raise OneLineError(f"{where}: task {tid}: not a Kaggle submission: expected a list of "
                               f"{n} attempt dicts (one per test input)")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"attempt_1", "attempt_2"} <= set(entry):
                raise OneLineError(f"{where}: task {tid} test {i}: not a Kaggle submission: expected {shape}")
            for key in ("attempt_1", "attempt_2"):
                try:
                    data.check_grid(entry[key], key)
                except ValueError as e:
                    raise OneLineError(f"{where}: task {tid} test {i}: {e}")


def submission_of(tasks, records, unreadable=None):
    """The Kaggle submission: each task's attempts, and [[0]] ones for each test input of an unreadable task
    (Kaggle fails a submission that lacks a task)."""
    sub = {tid: records[tid].attempts() for tid in tasks}
    sub.update({tid: Record.empty(tid, n).attempts() for tid, (_, n) in (unreadable or {}).items()})
    return {tid: sub[tid] for tid in sorted(sub)}


def read_submission(path, tasks, unreadable=None):
    sub = read_json(path)
    check_submission(sub, tasks, path, unreadable)
    return sub


def save_submission(sub, tasks, unreadable, path):
    check_submission(sub, tasks, path, unreadable)
    write_atomic(path, json.dumps(sub))


def submission_path(out):
    """`out` itself when it names a .json file; otherwise a folder (made when missing) with submission.json in it."""
    return out if out.suffix == ".json" and not out.is_dir() else out / "submission.json"


def score(tasks, submission, guesses=None):
    """Scores of a submission: the official one from its attempts (a task counts the fraction of its test inputs
    where either attempt is exactly right), the write-up's counts (a task is solved by a guess when that guess is
    right on all its test inputs) and per-guess metrics. `guesses` (task_id -> [[guess 1, guess 2] per test input],
    None = no answer) default to the attempts, reading [[0]] as no answer. A guess with no answer is submitted as
    [[0]] and is right wherever the solution is [[0]], in the official score (as Kaggle scores it) and in the
    write-up's counts alike; it still counts as unanswered. Only tasks with every test output known are scored (a
    task whose solution was unusable is not)."""
    guesses = guesses or answers_of(submission)
    r = dict(score=0.0, score_pct=0.0, tasks=len(tasks), predicted=0, solved_any=0, solved_first=0, solved_second=0,
             test_inputs=0, guesses=0, unanswered=0, correct_size=0.0, correct_pixels=0.0, solutions=False, scored=0,
             per_task={})
    for tid, task in tasks.items():
        n = len(task["test"])  # a submission or guesses short of a test input score it wrong, never skip it
        g = (list(guesses.get(tid) or []) + [[None, None]] * n)[:n]
        entries = (list(submission.get(tid) or []) + [{}] * n)[:n]
        r["test_inputs"] += n
        r["guesses"] += 2 * n
        r["unanswered"] += sum(x is None for pair in g for x in pair)
        r["predicted"] += any(x is not None for pair in g for x in pair)
        if not all("output" in t for t in task["test"]):
            continue
        r["solutions"], r["scored"] = True, r["scored"] + 1
        sols = [t["output"] for t in task["test"]]
        right = [sol in (e.get("attempt_1"), e.get("attempt_2")) for sol, e in zip(sols, entries)]
        first = [as_submitted(pair[0]) == sol for pair, sol in zip(g, sols)]
        second = [as_submitted(pair[1]) == sol for pair, sol in zip(g, sols)]
        pixels = [[pixel_accuracy(x, sol) for x in pair] for pair, sol in zip(g, sols)]
        r["score"] += sum(right) / len(right)
        r["solved_any"] += all(a or b for a, b in zip(first, second))
        r["solved_first"] += all(first)
        r["solved_second"] += all(second)
        r["correct_size"] += sum(p is not None for pair in pixels for p in pair)
        r["correct_pixels"] += sum(p or 0.0 for pair in pixels for p in pair)
        r["per_task"][tid] = dict(score=sum(right) / len(right), first=first, second=second, pixels=pixels)
    r["score_pct"] = 100 * r["score"] / max(r["scored"], 1)
    r["correct_size"] /= max(r["guesses"], 1)
    r["correct_pixels"] /= max(r["guesses"], 1)
    return r


def as_submitted(guess):
    """A guess as the submission carries it: the no-answer placeholder where there is none."""
    return NO_ANSWER if guess is None else guess


def coverage(tasks, records):
    """dict(found, found_test_inputs): the tasks (every test input) and test inputs whose right grid is anywhere
    among their candidates (samples, search results) or guesses, over the tasks with known solutions: what the
    best ranking could submit, as the field reports beside the score (None without solutions)."""
    known = {tid: task for tid, task in tasks.items() if all("output" in t for t in task["test"])}
    if not known:
        return dict(found=None, found_test_inputs=None)
    found_tasks = found_inputs = 0
    for tid, task in known.items():
        rec = records[tid]
        hits = [t["output"] in [*(r[0] for r in (rec.candidates[i] if rec.candidates else None) or []),
                                *rec.guesses[i]] for i, t in enumerate(task["test"])]
        found_inputs += sum(hits)
        found_tasks += all(hits)
    return dict(found=found_tasks, found_test_inputs=found_inputs)


def answers_of(submission):
    """Guesses read back from a submission's attempts, [[0]] (the no-answer placeholder) as None."""
    return {tid: [[e[k] if e[k] != NO_ANSWER else None for k in ("attempt_1", "attempt_2")] for e in entries]
            for tid, entries in submission.items()}


def pixel_accuracy(grid, solution):
    """Fraction of right cells, or None when the guess is missing or of the wrong size."""
    if grid is None or len(grid) != len(solution) or len(grid[0]) != len(solution[0]):
        return None
    return sum(a == b for row, sol in zip(grid, solution) for a, b in zip(row, sol)) / (len(grid) * len(grid[0]))


def table_columns(names):
    """The results table's columns, the last two naming guess 1 and guess 2 as the mode does."""
    return TABLE + tuple(f"Solved by {name} Guess" for name in names)
