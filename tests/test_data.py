"""data.py: grids survive the 8 symmetries and the text formats, Llama-3 sees exactly one token per cell,
bad data stops with one line naming the file and task, and build_dataset writes the rows training needs.

    python -m pytest tests/test_data.py -q
"""
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import cli
import data

ROOT = Path(__file__).resolve().parent.parent

DECODABLE = ("llama3", "digits")


def read_tasks(source, split):
    """data.load_tasks as (tasks, [(task_id, reason), ...]): what these tests compare."""
    tasks, unreadable = data.load_tasks(source, split, quiet=True)
    return tasks, [(tid, reason) for tid, (reason, _) in unreadable.items()]


@pytest.fixture(scope="module")
def arc1():
    """All 800 ARC-AGI-1 tasks, loaded once for the module."""
    return {split: data.load_tasks("arc1", split)[0] for split in ("train", "eval")}


@pytest.fixture(scope="module")
def tok():
    return data.llama3_tokenizer()


def grids_of(tasks):
    """(task id, grid) for every train/test input and output."""
    return [(tid, ex[key]) for tid, task in sorted(tasks.items()) for part in ("train", "test")
            for ex in task[part] for key in ("input", "output") if key in ex]


def grids_in(text, fmt):
    """The grids written in a prompt or completion, in order (blocks between the in/out/end marker lines)."""
    blocks, lines = [], []
    for line in text.split("\n") + [data.END]:
        if line in (data.IN, data.OUT, data.END):
            if lines:
                blocks.append(data.parse_grid("\n".join(lines), fmt))
            lines = []
        else:
            lines.append(line)
    return blocks


def task_grids(task, test_index=0):
    """The grids of a prompt + completion for `task`, in the order they are written."""
    test = task["test"][test_index]
    return [g for ex in task["train"] for g in (ex["input"], ex["output"])] + [test["input"], test["output"]]


def small_task(seed, n_train=2, side=3, n_test=1):
    rng = random.Random(seed)
    grid = lambda: [[rng.randrange(10) for _ in range(side)] for _ in range(side)]  # noqa: E731
    return {"train": [{"input": grid(), "output": grid()} for _ in range(n_train)],
            "test": [{"input": grid(), "output": grid()} for _ in range(n_test)]}


# ----------------------------------------------------------------------------
# symmetries and text formats on every ARC-AGI-1 grid

def test_arc1_has_400_train_and_400_eval_tasks(arc1):
    assert len(arc1["train"]) == 400 and len(arc1["eval"]) == 400


def test_every_arc1_grid_round_trips_through_all_8_symmetries(arc1):
    grids = grids_of(arc1["train"]) + grids_of(arc1["eval"])
    assert len(grids) == 7000  # 2,665 train + 835 test pairs, input and output each
    for tid, grid in grids:
        for k in range(8):
            assert data.undo_dihedral(data.dihedral(grid, k), k) == grid, f"task {tid} k={k}"


def test_only_llama3_and_digits_have_a_decoder():
    # a new decodable format must be added to the round-trip tests below
    assert {name for name, (_, decode) in data.FORMATS.items() if decode} == set(DECODABLE)


@pytest.mark.parametrize("fmt", DECODABLE)
def test_every_arc1_grid_round_trips_through_format_and_parse(arc1, fmt):
    for tid, grid in grids_of(arc1["train"]) + grids_of(arc1["eval"]):
        assert data.parse_grid(data.format_grid(grid, fmt), fmt) == grid, f"task {tid}"
        assert data.parse_output(data.format_completion(grid, fmt), fmt) == grid, f"task {tid}"


def test_k4_is_the_transposition():
    assert data.dihedral([[1, 2, 3], [4, 5, 6]], 4) == [[1, 4], [2, 5], [3, 6]]


def test_k1_to_k3_are_the_rotations():
    g = [[1, 2, 3], [4, 5, 6]]
    assert data.dihedral(g, 2) == [[6, 5, 4], [3, 2, 1]]
    assert data.dihedral(data.dihedral(g, 1), 1) == data.dihedral(g, 2)
    assert data.dihedral(data.dihedral(g, 2), 1) == data.dihedral(g, 3)
    assert data.dihedral(data.dihedral(g, 3), 1) == g


def test_8_symmetries_of_a_non_symmetric_grid_are_8_distinct_grids():
    g = [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    variants = [data.dihedral(g, k) for k in range(8)]
    assert len({json.dumps(v) for v in variants}) == 8
    assert variants[0] == g


@pytest.mark.parametrize("k", range(8))
def test_dihedral_of_a_rectangular_grid_has_the_right_shape(k):
    g = [[c + 10 * r for c in range(5)] for r in range(2)]  # 2x5
    out = data.dihedral(g, k)
    assert (len(out), len(out[0])) == ((5, 2) if k in (1, 3, 4, 6) else (2, 5))
    assert sorted(c for row in out for c in row) == sorted(c for row in g for c in row)
    assert all(type(c) is int for row in out for c in row)  # plain ints, so json.dumps works


# ----------------------------------------------------------------------------
# the real Llama-3 tokenizer: one token per cell

def test_llama3_gives_one_token_per_cell_on_every_arc1_eval_grid(arc1, tok):
    grids = [g for _, g in grids_of(arc1["eval"])]
    encodings = tok.encode_batch([data.format_grid(g, "llama3") for g in grids], add_special_tokens=False)
    text_of = {i: tok.decode([i]) for i in {i for e in encodings for i in e.ids}}
    assert {t for t in text_of.values() if t != "\n"} <= {str(d) * 3 for d in range(10)}
    for grid, enc in zip(grids, encodings):
        h, w = len(grid), len(grid[0])
        assert len(enc.ids) == h * w + (h - 1)
        expected = [t for row in grid for t in [str(c) * 3 for c in row] + ["\n"]][:-1]
        assert [text_of[i] for i in enc.ids] == expected


def test_llama3_prompt_and_completion_tokenize_apart_as_together(arc1, tok):
    tids = random.Random(0).sample(sorted(arc1["eval"]), 25)
    for tid in tids:
        for k in (0, 5):
            view = data.view_task(arc1["eval"][tid], k)
            prompt = data.format_prompt(view, 0, "llama3")
            completion = data.format_completion(view["test"][0]["output"], "llama3")
            whole = tok.encode(prompt + completion, add_special_tokens=False).ids
            apart = tok.encode(prompt, add_special_tokens=False).ids + tok.encode(completion, add_special_tokens=False).ids
            assert whole == apart, f"task {tid} k={k}"
            # every cell, newline and in/out/end marker is one token in the whole sequence too
            cells = sum(len(g) * len(g[0]) for g in task_grids(view))
            markers = sum(line in (data.IN, data.OUT, data.END) for line in (prompt + completion).split("\n"))
            assert len(whole) == cells + (prompt + completion).count("\n") + markers, f"task {tid} k={k}"


def test_choose_format_picks_llama3_for_llama3_and_digits_for_a_per_digit_encoder(tok):
    assert data.choose_format(lambda s: tok.encode(s, add_special_tokens=False).ids) == "llama3"
    assert data.choose_format(lambda s: list(s)) == "digits"


def test_choose_format_refuses_a_tokenizer_with_neither():
    with pytest.raises(cli.OneLineError, match="no one-token-per-cell format"):
        data.choose_format(lambda s: [s])  # the whole text as one token


# ----------------------------------------------------------------------------
# malformed data: each case stops with its own clear message

G = [[1, 2], [3, 4]]
GOOD = {"train": [{"input": G, "output": G}], "test": [{"input": G, "output": G}]}


def with_train_input(grid):
    return {"train": [{"input": grid, "output": G}], "test": [{"input": G}]}


# a bad task beside a good one in the same file: the bad one is skipped, its reason names it and the problem
BAD_TASKS = {
    "task_is_a_list": ([GOOD], "task is a list, not a dict"),
    "task_is_a_string": ("train", "task is a str, not a dict"),
    "missing_train": ({"test": GOOD["test"]}, "'train' is missing"),
    "empty_train": ({"train": [], "test": GOOD["test"]}, "'train' is missing or not a non-empty list"),
    "train_not_a_list": ({"train": GOOD["train"][0], "test": GOOD["test"]}, "'train' is missing or not a non-empty list"),
    "missing_test": ({"train": GOOD["train"]}, "'test' is missing"),
    "empty_test": ({"train": GOOD["train"], "test": []}, "'test' is missing or not a non-empty list"),
    "example_not_a_dict": ({"train": [G], "test": GOOD["test"]}, "train[0] is not a dict with an 'input' grid"),
    "example_without_input": ({"train": [{"output": G}], "test": GOOD["test"]}, "train[0] is not a dict with an 'input'"),
    "train_without_output": ({"train": [{"input": G}], "test": GOOD["test"]}, "train[0].output is not a non-empty list"),
    "test_without_input": ({"train": GOOD["train"], "test": [{"output": G}]}, "test[0] is not a dict with an 'input'"),
    "grid_not_a_list": (with_train_input("0123"), "train[0].input is not a non-empty list of non-empty lists"),
    "grid_of_numbers": (with_train_input([1, 2, 3]), "train[0].input is not a non-empty list of non-empty lists"),
    "empty_grid": (with_train_input([]), "train[0].input is not a non-empty list of non-empty lists"),
    "grid_with_empty_row": (with_train_input([[1, 2], []]), "train[0].input is not a non-empty list"),
    "ragged_grid": (with_train_input([[1, 2], [3]]), "train[0].input is ragged"),
    "31_rows": (with_train_input([[0]] * 31), "train[0].input is 31x1, outside 1..30"),
    "31_columns": (with_train_input([[0] * 31]), "train[0].input is 1x31, outside 1..30"),
    "cell_10": (with_train_input([[1, 10]]), "has cell 10, not an integer colour 0..9"),
    "cell_minus_1": (with_train_input([[-1, 1]]), "has cell -1, not an integer colour 0..9"),
    "cell_string": (with_train_input([[1, "3"]]), "has cell '3', not an integer colour 0..9"),
    "cell_float": (with_train_input([[1.0, 2]]), "has cell 1.0, not an integer colour 0..9"),
    "cell_bool": (with_train_input([[True, 2]]), "has cell True, not an integer colour 0..9"),
    "cell_null": (with_train_input([[None, 2]]), "has cell None, not an integer colour 0..9"),
    "ragged_test_output": ({"train": GOOD["train"], "test": [{"input": G, "output": [[1], [2, 3]]}]},
                           "test[0].output is ragged"),
    "bad_second_train_example": ({"train": GOOD["train"] + [{"input": G, "output": [[11]]}], "test": GOOD["test"]},
                                 "train[1].output has cell 11"),
}


@pytest.mark.parametrize("case", BAD_TASKS)
def test_bad_task_in_a_good_file_is_skipped_with_its_reason(tmp_path, case):
    bad, problem = BAD_TASKS[case]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"good1": GOOD, "bad": bad}))
    tasks, skipped = read_tasks(str(path), "train")
    assert list(tasks) == ["good1"] and tasks["good1"] == GOOD
    assert [tid for tid, _ in skipped] == ["bad"]
    reason = skipped[0][1]
    assert str(path) in reason and "task bad" in reason and problem in reason, reason


def test_load_tasks_reports_each_skipped_task_on_stderr(tmp_path, capsys):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"ok": GOOD, "bad": with_train_input([[1, 2], [3]])}))
    assert list(data.load_tasks(str(path), "train")[0]) == ["ok"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skipped ") and "task bad" in err[0] and "ragged" in err[0]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# whole-file failures: files to write under tmp_path, what to load, the file the message names, the problem
BAD_FILES = {
    "not_json": ({"t.json": "{not json"}, "t.json", "t.json", "not valid JSON"),
    "empty_file": ({"t.json": ""}, "t.json", "t.json", "not valid JSON"),
    "not_utf8": ({"t.json": b"\xff\xfe{}"}, "t.json", "t.json", "not valid JSON"),
    "file_not_found": ({}, "missing.json", "missing.json", "no such file or folder"),
    "top_level_list": ({"t.json": json.dumps([GOOD])}, "t.json", "t.json", "expected a dict of task_id -> task, got a list"),
    "top_level_number": ({"t.json": "42"}, "t.json", "t.json", "expected a dict of task_id -> task, got a int"),
    "empty_dict": ({"t.json": "{}"}, "t.json", "t.json", "no valid tasks"),
    "only_bad_tasks": ({"t.json": json.dumps({"x": with_train_input([[1], [2, 3]])})}, "t.json", "t.json",
                       "no valid tasks; first problem"),
    "folder_without_json": ({"d/notes.txt": "hi"}, "d", "d", "no *.json task files in this folder"),
    "folder_with_only_a_subfolder": ({"d/sub/x.json": "{}"}, "d", "d", "no *.json task files in this folder"),
    "folder_with_only_broken_files": ({"d/b.json": "{"}, "d", "d/b.json", "not valid JSON"),
    "solutions_not_a_dict": ({"x_challenges.json": json.dumps({"a": GOOD}), "x_solutions.json": "[]"},
                             "x_challenges.json", "x_solutions.json", "expected a dict of task_id -> list of output grids"),
    "solutions_not_json": ({"x_challenges.json": json.dumps({"a": GOOD}), "x_solutions.json": "nope"},
                           "x_challenges.json", "x_solutions.json", "not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_raises_data_error_naming_the_file(tmp_path, case):
    files, source, named, problem = BAD_FILES[case]
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(cli.OneLineError) as e:
        read_tasks(str(tmp_path / source), "train")
    message = str(e.value)
    assert str(tmp_path / named) in message and problem in message, message
    assert "\n" not in message


def test_broken_file_in_a_folder_is_one_skipped_task(tmp_path):
    write(tmp_path / "a.json", json.dumps(GOOD))
    write(tmp_path / "b.json", "{")
    tasks, skipped = read_tasks(str(tmp_path), "train")
    assert tasks == {"a": GOOD}
    assert [tid for tid, _ in skipped] == ["b"] and str(tmp_path / "b.json") in skipped[0][1]
    assert "not valid JSON" in skipped[0][1]


def test_single_task_file_missing_a_part_names_the_part(tmp_path):
    path = write(tmp_path / "single.json", json.dumps({"train": GOOD["train"]}))
    with pytest.raises(cli.OneLineError) as e:
        read_tasks(str(path), "train")
    assert "single.json" in str(e.value) and "'test' is missing" in str(e.value)


def test_unknown_split_of_an_embedded_set_is_a_data_error():
    with pytest.raises(cli.OneLineError, match="--split test"):
        read_tasks("arc1", "test")


def test_folder_in_arc_repo_layout_reads_the_split_subfolder(tmp_path):
    write(tmp_path / "training" / "aaa.json", json.dumps(GOOD))
    write(tmp_path / "evaluation" / "bbb.json", json.dumps(small_task(1)))
    train, _ = read_tasks(str(tmp_path), "train")
    evaluation, _ = read_tasks(str(tmp_path), "eval")
    assert train == {"aaa": GOOD}
    assert evaluation == {"bbb": small_task(1)}


def test_folder_of_task_files_uses_file_names_as_task_ids(tmp_path):
    for i in range(3):
        write(tmp_path / f"t{i}.json", json.dumps(small_task(i)))
    tasks, skipped = read_tasks(str(tmp_path), "eval")
    assert tasks == {f"t{i}": small_task(i) for i in range(3)} and skipped == []


def test_single_task_file_is_one_task_named_after_the_file(tmp_path):
    path = write(tmp_path / "007bbfb7.json", json.dumps(GOOD))
    assert read_tasks(str(path), "train") == ({"007bbfb7": GOOD}, [])


def test_kaggle_challenges_get_test_outputs_from_the_solutions_beside_them(tmp_path):
    a, b = small_task(1, n_test=2), small_task(2)
    challenges = {tid: {"train": t["train"], "test": [{"input": x["input"]} for x in t["test"]]}
                  for tid, t in (("a", a), ("b", b))}
    solutions = {tid: [x["output"] for x in t["test"]] for tid, t in (("a", a), ("b", b))}
    path = write(tmp_path / "arc-agi_training_challenges.json", json.dumps(challenges))
    write(tmp_path / "arc-agi_training_solutions.json", json.dumps(solutions))
    tasks, skipped = read_tasks(str(path), "train")
    assert tasks == {"a": a, "b": b} and skipped == []


def test_kaggle_challenges_without_solutions_load_with_test_inputs_only(tmp_path):
    challenges = {"a": {"train": GOOD["train"], "test": [{"input": G}]}}
    path = write(tmp_path / "arc-agi_test_challenges.json", json.dumps(challenges))
    assert read_tasks(str(path), "eval") == (challenges, [])


def kaggle_folder(root):
    """A folder as /kaggle/input/arc-prize-2025 holds it: training and evaluation challenges with their solutions,
    test challenges without, a sample submission."""
    root.mkdir()
    sets = {"training": {f"tr{i}": small_task(i) for i in range(3)},
            "evaluation": {f"ev{i}": small_task(10 + i, n_test=2) for i in range(2)},
            "test": {f"te{i}": small_task(20 + i) for i in range(4)}}
    for name, tasks in sets.items():
        write(root / f"arc-agi_{name}_challenges.json", json.dumps(
            {tid: dict(t, test=[{"input": x["input"]} for x in t["test"]]) for tid, t in tasks.items()}))
        if name != "test":
            write(root / f"arc-agi_{name}_solutions.json",
                  json.dumps({tid: [x["output"] for x in t["test"]] for tid, t in tasks.items()}))
    write(root / "sample_submission.json", json.dumps({}))
    return root, sets


def test_a_kaggle_folder_loads_as_the_kaggle_set_with_its_splits(tmp_path):
    folder, sets = kaggle_folder(tmp_path / "arc-prize-2025")
    assert read_tasks(str(folder), "train") == (sets["training"], [])
    assert read_tasks(str(folder), "eval") == (sets["evaluation"], [])  # answers from the solutions file
    test, skipped = read_tasks(str(folder), "test")
    assert sorted(test) == sorted(sets["test"]) and all("output" not in x for t in test.values() for x in t["test"])
    out = run_data("--dataset", str(folder), "--split", "train", "eval", "--stats")
    assert out.returncode == 0, out.stderr
    assert "train: 3 tasks" in out.stdout and "eval: 2 tasks" in out.stdout, out.stdout


def test_a_split_a_kaggle_folder_lacks_is_one_line_naming_what_it_has(tmp_path):
    folder, _ = kaggle_folder(tmp_path / "k")
    (folder / "arc-agi_test_challenges.json").unlink()
    with pytest.raises(cli.OneLineError, match=r"--split test: .* holds Kaggle challenges for train, eval"):
        read_tasks(str(folder), "test")
    with pytest.raises(cli.OneLineError, match=r"--split test: arc1 has the splits train, eval"):
        read_tasks("arc1", "test")


# ----------------------------------------------------------------------------
# parsing model output: garbage gives None, never an exception

GARBAGE = {
    "empty": ("", DECODABLE),
    "blank_lines": ("\n\n", DECODABLE),
    "words": ("hello", DECODABLE),
    "ragged": ("012\n01", DECODABLE),
    "letter_in_row": ("0a1", DECODABLE),
    "bad_triple_row": ("000111\n00011", DECODABLE),
    "not_a_triple": ("001", ("llama3",)),
    "not_whole_triples": ("0001", ("llama3",)),
    "empty_row_inside": ("000\n\n000", DECODABLE),
    "space_in_row": ("000 111", DECODABLE),
    "commas": ("0,1", DECODABLE),
    "minus": ("-1", DECODABLE),
    "decimal": ("1.0", DECODABLE),
    "arabic_indic_digits": ("١٢", DECODABLE),
    "arabic_indic_triple": ("١١١", DECODABLE),
    "fullwidth_digits": ("０００", DECODABLE),
    "superscript": ("²²²", DECODABLE),
    "31_rows_llama3": ("\n".join(["000"] * 31), ("llama3",)),
    "31_rows_digits": ("\n".join(["0"] * 31), ("digits",)),
    "31_columns_llama3": ("000" * 31, ("llama3",)),
    "31_columns_digits": ("0" * 31, ("digits",)),
    "markers_only": ("in\nout\n", DECODABLE),
    "none": (None, DECODABLE),
    "number": (42, DECODABLE),
    "bytes": (b"000", DECODABLE),
}


@pytest.mark.parametrize("case, fmt", [(case, fmt) for case, (_, fmts) in GARBAGE.items() for fmt in fmts])
def test_parsing_garbage_gives_none(case, fmt):
    text = GARBAGE[case][0]
    assert data.parse_grid(text, fmt) is None
    ended = text + "\n" + data.END if isinstance(text, str) else text
    assert data.parse_output(ended, fmt) is None


@pytest.mark.parametrize("fmt", DECODABLE)
def test_parse_output_without_end_marker_is_none_as_truncated(fmt):
    grid = [[1, 2, 3], [4, 5, 6]]
    assert data.parse_grid(data.format_grid(grid, fmt), fmt) == grid
    assert data.parse_output(data.format_grid(grid, fmt), fmt) is None
    assert data.parse_output(data.format_grid(grid, fmt) + "\n", fmt) is None
    assert data.parse_output(data.format_grid(grid, fmt)[:-4], fmt) is None


@pytest.mark.parametrize("fmt", DECODABLE)
@pytest.mark.parametrize("tail", ["", "\n", "<|eot_id|>", "\nin\n000\nout\n", " garbage end end", "\n\n\n"])
def test_parse_output_reads_the_grid_before_end_and_ignores_what_follows(fmt, tail):
    rng = random.Random(1)
    for grid in ([[7]], [[1, 2, 3]], [[0] * 30] * 30, [[rng.randrange(10) for _ in range(5)] for _ in range(9)]):
        assert data.parse_output(data.format_completion(grid, fmt) + tail, fmt) == grid


@pytest.mark.parametrize("fmt", DECODABLE)
def test_parse_grid_on_random_text_is_none_or_the_grid_written(fmt):
    rng = random.Random(0)
    alphabet = "0000111222333456789\n\n a١"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        grid = data.parse_grid(text, fmt)
        assert grid is None or data.format_grid(grid, fmt) == text.strip(), repr(text)
        data.parse_output(text + data.END, fmt)


@pytest.mark.parametrize("fmt", DECODABLE)
def test_every_start_of_a_parsable_completion_could_be_an_answer(fmt):
    rng = random.Random(2)
    pieces = ["0", "1", "2", "000", "111", "222", "012", "\n", data.END, " ", "e", "x"]
    texts = [data.format_completion(g, fmt) for g in ([[7]], [[0] * 30] * 30, [[1, 2], [3, 4], [5, 6]])]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14))) for _ in range(20000)]
    parsed = 0
    for text in texts:
        if data.parse_output(text, fmt) is not None:
            parsed += 1
            ends = text.index(data.END) + len(data.END)
            assert all(data.could_be_answer(text[:n], fmt) for n in range(ends + 1)), repr(text)
    assert parsed > 20


@pytest.mark.parametrize("fmt", DECODABLE)
@pytest.mark.parametrize("grid, case", [
    ([[1] * 31], "a row of 31 cells"),
    ([[1, 2, 3], [4, 5, 6, 7]], "a row longer than the first"),
    ([[1, 2, 3], [4, 5], [6, 7, 8]], "a finished row shorter than the first"),
    ([[5]] * 31, "31 rows"),
])
def test_a_start_that_can_no_longer_be_a_grid_is_refused_where_it_goes_wrong(fmt, grid, case):
    text = data.format_grid(grid, fmt) + "\n"
    verdicts = [data.could_be_answer(text[:n], fmt) for n in range(len(text) + 1)]
    first_bad = verdicts.index(False)
    assert not any(verdicts[first_bad:]) and data.parse_output(text[:first_bad] + data.END, fmt) is None, case
    assert all(verdicts[:first_bad]) and first_bad > 0


@pytest.mark.parametrize("fmt, text", [("digits", "12\nx"), ("digits", "\n1"), ("digits", "1\n\n"),
                                       ("digits", "e"), ("digits", "12 "), ("llama3", "001"), ("llama3", "000\n001"),
                                       ("llama3", "000\nen\n"), ("digits", "1\nin")])
def test_letters_blank_rows_and_unequal_triples_cannot_be_an_answer(fmt, text):
    assert not data.could_be_answer(text, fmt)
    assert all(data.parse_output(text + tail, fmt) is None for tail in ("\n" + data.END, data.END, "0\n" + data.END))


# ----------------------------------------------------------------------------
# the command line

def run_data(*args):
    return subprocess.run([sys.executable, "data.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_is_quick_and_lists_every_flag():
    t0 = time.time()
    result = run_data("--help")
    assert result.returncode == 0, result.stderr
    assert time.time() - t0 < 15
    for f in dataclasses.fields(data.Config):
        assert "--" + f.name.replace("_", "-") in result.stdout


@pytest.mark.parametrize("script", ["data.py", "train.py", "infer.py", "bench.py"])
def test_help_names_each_default_once(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, COLUMNS="1000")).stdout
    flags = []  # one entry per flag: its line and the help lines under it
    for line in out.splitlines():
        if line.startswith("  --"):
            flags.append(line)
        elif flags and line.startswith("      "):
            flags[-1] += " " + line.strip()
    twice = [f for f in flags if f.count("(default:") > 1 or "(auto:" in f and "(default: auto)" in f]
    assert len(flags) > 5 and not twice, twice


def test_importing_data_and_its_tokenizer_does_not_import_torch():
    code = "import data, sys; data.llama3_tokenizer(); assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, named", [
    (["--dataset", "/nonexistent"], "/nonexistent"),
    (["--dataset", "{tmp}/broken.json"], "broken.json"),
    (["--dataset", "{tmp}/ok.json", "--print", "nosuchtask"], "nosuchtask"),
])
def test_user_mistake_exits_with_one_error_line_and_no_traceback(tmp_path, args, named):
    write(tmp_path / "broken.json", "{")
    write(tmp_path / "ok.json", json.dumps({"a": GOOD}))
    result = run_data(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr


def test_print_writes_a_task_text_that_parses_back(tmp_path):
    task = small_task(3)
    write(tmp_path / "abc.json", json.dumps(task))
    result = run_data("--dataset", str(tmp_path / "abc.json"), "--print", "abc", "--format", "digits")
    assert result.returncode == 0, result.stderr
    assert grids_in(result.stdout.strip(), "digits") == task_grids(task)


# ----------------------------------------------------------------------------
# build_dataset: rows for training

def test_build_dataset_gives_8_rows_per_test_input_with_the_transformed_answer():
    tasks = {"a": small_task(1), "b": small_task(2, n_train=3, side=4), "c": small_task(3, n_test=2)}
    ds, report = data.build_dataset(tasks, "llama3")
    assert {"prompt", "completion", "task_id", "k"} <= set(ds.column_names)
    assert len(ds) == 8 * 4
    assert Counter(ds["task_id"]) == {"a": 8, "b": 8, "c": 16}
    assert Counter(zip(ds["task_id"], ds["k"])) == {(t, k): 1 + (t == "c") for t in "abc" for k in range(8)}
    assert report["trimmed_examples"] == 0 and report["skipped"] == []
    for row in ds:
        task, i = tasks[row["task_id"]], row["test_index"]
        view = data.view_task(task, row["k"])
        assert row["prompt"].endswith(f"\n{data.OUT}\n")
        assert data.parse_output(row["completion"], "llama3") == data.dihedral(task["test"][i]["output"], row["k"])
        assert grids_in(row["prompt"] + row["completion"], "llama3") == task_grids(view, i)


def test_build_dataset_skips_test_inputs_without_an_answer():
    task = {"train": GOOD["train"], "test": [{"input": G}, {"input": G, "output": G}]}
    ds, _ = data.build_dataset({"t": task}, "digits")
    assert len(ds) == 8 and set(ds["test_index"]) == {1}


def square(side, colour):
    return [[colour] * side for _ in range(side)]


def trim_task():
    """Square grids so every symmetry has the same length; train example 1 is the largest."""
    return {"train": [{"input": square(2, 1), "output": square(2, 2)},
                      {"input": square(6, 3), "output": square(6, 4)},
                      {"input": square(3, 5), "output": square(3, 6)}],
            "test": [{"input": square(2, 7), "output": square(2, 8)}]}


def test_fit_task_drops_the_largest_train_example_first_and_counts_it():
    task = trim_task()
    without_largest = dict(task, train=[task["train"][0], task["train"][2]])
    limit = len(data.format_prompt(without_largest, 0, "digits") + data.format_completion(square(2, 8), "digits"))
    fitted, trimmed = data.fit_task(task, 0, "digits", limit, len)
    assert trimmed == 1 and fitted["train"] == without_largest["train"]
    assert data.fit_task(task, 0, "digits", limit + 1000, len) == (task, 0)


def test_build_dataset_reports_trimmed_examples():
    task = trim_task()
    without_largest = dict(task, train=[task["train"][0], task["train"][2]])
    limit = len(data.format_prompt(without_largest, 0, "digits") + data.format_completion(square(2, 8), "digits"))
    ds, report = data.build_dataset({"t": task}, "digits", max_tokens=limit, count_tokens=len)
    assert len(ds) == 8
    assert report["trimmed_examples"] == 8 and report["trimmed_rows"] == 8 and report["skipped"] == []
    for row in ds:
        assert len(row["prompt"] + row["completion"]) <= limit
        assert "333333" not in row["prompt"] and "111111" not in row["prompt"]  # 6x6 gone, 2x2 and 3x3 kept
        assert "11\n11" in row["prompt"] and "555\n555" in row["prompt"]


def test_task_that_does_not_fit_with_one_example_is_skipped_and_reported():
    big = {"train": [{"input": square(10, 1), "output": square(10, 2)}],
           "test": [{"input": square(10, 3), "output": square(10, 4)}]}
    fitted, reason = data.fit_task(big, 0, "digits", 50, len)
    assert fitted is None and "single train example" in reason and "50" in reason
    ds, report = data.build_dataset({"big": big, "small": small_task(1, side=2)}, "digits", max_tokens=100,
                                    count_tokens=len)
    assert set(ds["task_id"]) == {"small"} and len(ds) == 8
    assert len(report["skipped"]) == 8 and all(s.startswith("task big k=") for s in report["skipped"])


def test_colour_permutation_keeps_0_and_is_a_bijection():
    rng = random.Random(0)
    perms = [data.colour_permutation(rng) for _ in range(200)]
    assert all(p[0] == 0 and sorted(p) == list(range(10)) for p in perms)
    assert len({tuple(p) for p in perms}) > 150


def test_build_dataset_colour_perm_maps_every_grid_of_a_row_by_one_permutation_keeping_0():
    task = {"train": [{"input": [list(range(10))], "output": [list(range(9, -1, -1))]}],
            "test": [{"input": [[0, 5, 5]], "output": [[1, 2, 0]]}]}
    ds, _ = data.build_dataset({"t": task}, "digits", symmetries=[0], colour_perm=True, copies=20)
    seen = set()
    for row in ds:
        mapping = {}
        for before, after in zip(task_grids(task), grids_in(row["prompt"] + row["completion"], "digits")):
            for a, b in zip(before[0], after[0]):
                assert mapping.setdefault(a, b) == b  # same colour, same replacement everywhere in the row
        assert mapping[0] == 0 and sorted(mapping.values()) == list(range(10))
        seen.add(tuple(mapping[c] for c in range(10)))
    assert len(seen) > 10


def test_build_dataset_shuffle_examples_permutes_train_examples_only():
    task = small_task(5, n_train=4, n_test=2)
    ds, _ = data.build_dataset({"t": task}, "digits", symmetries=[0], shuffle_examples=True, copies=20)
    assert len(ds) == 40
    pairs = [json.dumps(ex) for ex in task["train"]]
    orders = set()
    for row in ds:
        grids = grids_in(row["prompt"] + row["completion"], "digits")
        test = task["test"][row["test_index"]]
        assert grids[-2:] == [test["input"], test["output"]]
        shown = [json.dumps({"input": grids[j], "output": grids[j + 1]}) for j in range(0, len(grids) - 2, 2)]
        assert sorted(shown) == sorted(pairs)
        orders.add(tuple(pairs.index(s) for s in shown))
    assert len(orders) > 5


# ----------------------------------------------------------------------------
# views for voting and product of experts: a symmetry and a colour permutation, undone exactly

GRID = [[0, 1, 2], [3, 4, 5]]  # not square, every colour distinct: any wrong inverse shows


def test_views_are_the_8_symmetries_then_distinct_colour_permutations_keeping_0():
    assert data.views(3) == [(0, None), (1, None), (2, None)] and data.views(8) == [(k, None) for k in range(8)]
    vs = data.views(40, seed=3)
    assert vs[:8] == data.views(8) and vs == data.views(40, seed=3) and vs != data.views(40, seed=4)
    assert [k for k, _ in vs[8:]] == [i % 8 for i in range(8, 40)]
    assert all(p[0] == 0 and sorted(p) == list(range(10)) and p != list(range(10)) for _, p in vs[8:])
    assert len({(k, tuple(p)) for k, p in vs[8:]}) == 32


def test_training_views_beyond_8_are_each_symmetry_again_under_its_fixed_colour_permutation():
    """--views means one thing in train.py and infer.py: 10 views train on the 8 symmetries, then k=0 and k=1
    again in the colours data.views gives them."""
    task = {"train": [{"input": GRID, "output": GRID}], "test": [{"input": GRID, "output": GRID}]}
    ds, _ = data.build_dataset({"t": task}, "digits", data.views(10, seed=5))
    assert list(ds["k"]) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    for row, (k, perm) in zip(list(ds)[8:], data.views(10, seed=5)[8:]):
        assert row["completion"] == data.format_completion(data.apply_view(GRID, k, perm), "digits")
    assert list(ds)[:8] == list(data.build_dataset({"t": task}, "digits", range(8))[0])


def test_undo_view_inverts_apply_view_which_matches_view_task():
    task = {"train": [{"input": GRID, "output": GRID}], "test": [{"input": GRID}]}
    for k, perm in data.views(24):
        seen = data.apply_view(GRID, k, perm)
        assert seen == data.view_task(task, k, perm)["train"][0]["input"]
        assert data.undo_view(seen, k, perm) == GRID


def test_prompt_view_never_carries_test_outputs(arc1):
    task = arc1["eval"]["00576224"]
    assert all("output" not in t for k, p in data.views(10) for t in data.prompt_view(task, k, p)["test"])


# ----------------------------------------------------------------------------
# test-time training data: demonstrations only

def key(grid):
    return tuple(map(tuple, grid))


def test_ttt_never_trains_on_a_test_output_and_leaves_one_out_on_all_arc1_eval(arc1):
    vs = data.views(10)  # the 8 symmetries and 2 colour-permuted views
    shuffled = 0
    for tid, task in arc1["eval"].items():
        train_out, train_in = {key(ex["output"]) for ex in task["train"]}, {key(ex["input"]) for ex in task["train"]}
        test_out = {key(t["output"]) for t in task["test"]} - train_out
        test_in = {key(t["input"]) for t in task["test"]} - train_in
        samples = data.ttt_tasks(task, vs, random.Random(0))
        n = len(task["train"])
        assert n >= 2 and len(samples) == n * len(vs)  # every arc1 eval task has >= 2 demonstrations
        assert sorted({s["held_out"] for s in samples}) == list(range(n))
        for s in samples:
            t, k, perm = s["task"], s["k"], s["perm"]
            assert len(t["train"]) == n - 1 and len(t["test"]) == 1
            answer = key(data.undo_view(t["test"][0]["output"], k, perm))
            assert answer == key(task["train"][s["held_out"]]["output"])  # the answer is a demonstration's
            for ex in t["train"] + t["test"]:  # no real test grid anywhere, unless a demonstration holds it too
                assert key(data.undo_view(ex["input"], k, perm)) not in test_in
                assert key(data.undo_view(ex["output"], k, perm)) not in test_out
            originals = [key(data.undo_view(ex["input"], k, perm)) for ex in t["train"]]
            others = [key(ex["input"]) for j, ex in enumerate(task["train"]) if j != s["held_out"]]
            assert sorted(originals) == sorted(others)
            shuffled += originals != others
    assert shuffled > 1000  # example order is shuffled


def test_ttt_gives_nothing_for_a_single_demonstration():
    task = small_task(0, n_train=1)
    assert data.leave_one_out(task) == [] and data.ttt_tasks(task, data.views(8), random.Random(0)) == []
    two = small_task(1, n_train=2)
    assert [t["test"][0] for t in data.leave_one_out(two)] == two["train"]


def test_ttt_dataset_rows_answer_a_demonstration_and_fit(arc1):
    tasks = {tid: arc1["eval"][tid] for tid in sorted(arc1["eval"])[:3]}
    ds, report = data.ttt_dataset(tasks, "digits", data.views(2), copies=2)
    assert not report["skipped"] and len(ds) == 2 * 2 * sum(len(t["train"]) for t in tasks.values())
    for r in ds.select(range(0, len(ds), 7)):
        task = tasks[r["task_id"]]
        assert data.undo_view(data.parse_output(r["completion"], "digits"), r["k"]) == \
            task["train"][r["held_out"]]["output"]
    ds, report = data.ttt_dataset(tasks, "digits", data.views(1), max_tokens=60, count_tokens=len)
    assert report["skipped"] and all(len(r["prompt"]) + len(r["completion"]) <= 60 for r in ds)


# ----------------------------------------------------------------------------
# fingerprints: duplicates across sets and the contamination guard

def test_fingerprint_ignores_ids_order_and_test_outputs_but_not_grids():
    task = small_task(2, n_train=3, n_test=2)
    fp = data.task_fingerprint(task)
    assert data.task_fingerprint({"test": task["test"][::-1], "train": task["train"][::-1]}) == fp
    assert data.task_fingerprint(data.strip_outputs(task)) == fp
    changed = json.loads(json.dumps(task))
    changed["train"][0]["output"][0][0] = (changed["train"][0]["output"][0][0] + 1) % 10
    assert data.task_fingerprint(changed) != fp


def test_guard_finds_arc1_eval_inside_arc2_train(arc1):
    arc2_train = data.load_tasks("arc2", "train")[0]
    seen = data.seen_in_training(arc1["eval"], map(data.task_fingerprint, arc2_train.values()))
    assert len(seen) == 375 and all(tid in arc2_train for tid in seen)  # arc2 kept the ids
    assert data.seen_in_training(arc1["eval"], map(data.task_fingerprint, arc1["train"].values())) == ["070dd51e"]


def test_read_sets_counts_each_set_and_keeps_duplicates_once(tmp_path):
    a, b, c = small_task(3), small_task(4), small_task(5)
    for name, tasks in (("one", {"x": a, "y": b}), ("two", {"x": c, "z": json.loads(json.dumps(a))})):
        (tmp_path / name).mkdir()
        for tid, task in tasks.items():
            write(tmp_path / name / f"{tid}.json", json.dumps(task))
    tasks, sources = data.read_sets([str(tmp_path / "one"), str(tmp_path / "two")], ["train"])
    assert [(s["tasks"], s["duplicates"]) for s in sources] == [(2, 0), (2, 1)]
    assert sorted(tasks) == sorted(["x", "y", f"{tmp_path / 'two'}/train/x"]) and tasks["x"] == a
