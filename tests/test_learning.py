"""What a run learns from: which tokens carry the loss (--loss answer | outputs).

    python -m pytest tests/test_learning.py -q
"""
import json

import pytest

import cli
import data
import models
import train

# a task whose every grid is distinct, so each labelled stretch of tokens names the grid it came from
KNOWN = {"train": [{"input": [[1, 2]], "output": [[3, 4]]}, {"input": [[5, 6]], "output": [[7, 8]]},
                   {"input": [[9, 0]], "output": [[1, 1], [2, 2]]}],
         "test": [{"input": [[3, 3]], "output": [[4, 5, 6]]}]}


def labelled_stretches(tokenizer, row):
    """The decoded text of each run of consecutive labelled tokens of a tokenized row, labels equal to the ids."""
    stretches, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            stretches.append(tokenizer.decode(current))
            current = []
    return stretches + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("make_tokenizer", [models.tiny_tokenizer, models.llama3_hf_tokenizer])
@pytest.mark.parametrize("loss", models.LOSSES)
def test_loss_covers_the_answer_or_every_output_but_the_first(make_tokenizer, loss):
    tokenizer = make_tokenizer()
    fmt = data.choose_format(lambda s: tokenizer.encode(s, add_special_tokens=False))
    eos = tokenizer.eos_token
    grid = lambda g: data.format_grid(g, fmt) + f"\n{data.END}"  # noqa: E731  as the text writes an output
    cfg = train.Config(views=1, max_seq_len=1024, loss=loss)
    (row,), _, _ = train.training_data(cfg, {"t": KNOWN}, tokenizer, fmt)
    answer = [grid([[4, 5, 6]]) + eos]
    if loss == "answer":
        assert labelled_stretches(tokenizer, row) == answer
    else:  # the first train output [[3, 4]] and every input stay masked
        assert labelled_stretches(tokenizer, row) == [grid([[7, 8]]), grid([[1, 1], [2, 2]])] + answer

    # test-time training: each leave-one-out sequence shows 2 demonstrations, the second one's output is learnt
    ttt = train.training_data(train.Config(ttt=True, ttt_views=1, epochs=1, max_seq_len=1024, loss=loss),
                              {"t": KNOWN}, tokenizer, fmt)[0]
    outputs = {grid(ex["output"]) for ex in KNOWN["train"]}
    for row in ttt:
        stretches = labelled_stretches(tokenizer, row)
        assert len(stretches) == (2 if loss == "outputs" else 1)
        assert set(s.removesuffix(eos) for s in stretches) <= outputs and grid([[4, 5, 6]]) + eos not in stretches


def test_loss_outputs_trains_through_the_entry_point_and_is_recorded(tmp_path, capsys):
    family = tmp_path / "family"
    for tid, task in data.colour_family(4, 0)["train"].items():
        cli.write_json(family / f"{tid}.json", task)
    counts = {}
    for loss in models.LOSSES:
        out = tmp_path / loss
        train.main(["--dataset", str(family), "--views", "1", "--max-steps", "1", "--batch-size", "4", "--loss", loss,
                    "--packing", "--save-steps", "1", "--out", str(out)])
        line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("loss: on "))
        counts[loss] = int(line.split(": ")[2].split(" of ")[0].replace(",", ""))
        info = json.loads((out / "config.json").read_text())
        assert info["config"]["loss"] == loss and info["summary"]["steps"] == 1
    # 3x3 grids in the digits format: 12 tokens and the end marker per output; 3 train outputs and the test's
    assert counts == {"answer": 4 * (13 + 1), "outputs": 4 * (13 + 1 + 2 * 13)}
    # the loss is no part of the weights' shape: a resume may change it
    assert "loss" not in train.SHAPE_FLAGS
    train.main(["--resume", "--out", str(tmp_path / "answer"), "--max-steps", "2", "--loss", "outputs"])
    info = json.loads((tmp_path / "answer" / "config.json").read_text())
    assert info["config"]["loss"] == "outputs" and info["summary"]["steps"] == 2


def test_outputs_is_the_default_writeup_gives_the_write_ups_recipe_and_a_run_from_before_keeps_answer(tmp_path,
                                                                                                      capsys):
    family = tmp_path / "family"
    for tid, task in data.colour_family(4, 0)["train"].items():
        cli.write_json(family / f"{tid}.json", task)
    flags = ["--dataset", str(family), "--views", "1", "--max-steps", "1", "--batch-size", "4"]
    train.main([*flags, "--out", str(tmp_path / "default")])
    train.main([*flags, "--writeup", "--out", str(tmp_path / "writeup")])
    said = capsys.readouterr().out
    assert "writeup: --vocab full --loss answer (the write-up's recipe)" in said
    configs = {name: json.loads((tmp_path / name / "config.json").read_text())["config"]
               for name in ("default", "writeup")}
    assert [(c["loss"], c["vocab"]) for c in configs.values()] == [("outputs", "arc"), ("answer", "full")]
    with pytest.raises(SystemExit) as e:
        train.main([*flags, "--writeup", "--loss", "outputs", "--out", str(tmp_path / "clash")])
    assert str(e.value) == "error: --writeup sets --vocab full --loss answer: drop --loss outputs or --writeup"
    assert not (tmp_path / "clash").exists()

    # a run saved before --loss existed (no `loss` in its config.json) was trained on the answer: resumed, it stays so
    path = tmp_path / "default" / "config.json"
    info = json.loads(path.read_text())
    del info["config"]["loss"]
    path.write_text(json.dumps(info))
    train.main(["--resume", "--out", str(tmp_path / "default"), "--max-steps", "2"])
    assert "inherited: loss answer" in capsys.readouterr().out
    assert json.loads(path.read_text())["config"]["loss"] == "answer"


def test_packed_batch_gives_the_padded_loss_on_every_output():
    import torch
    tokenizer = models.tiny_tokenizer()
    tasks = dict(sorted(data.load_tasks("arc1", "train")[0].items())[:3])
    ds, _ = data.build_dataset(tasks, "digits", symmetries=[0, 1])
    rows = list(train.tokenize(ds, tokenizer, 100_000, loss="outputs")[0])
    answer_only = list(train.tokenize(ds, tokenizer, 100_000)[0])
    assert sum(r["labels"].count(-100) for r in rows) < sum(r["labels"].count(-100) for r in answer_only)
    model = models.tiny_model(tokenizer, max_seq_len=4096)
    model.config.use_cache = False
    with torch.no_grad():
        padded = model(**train.collate(models.pad_id(tokenizer))(rows)).loss
        assert torch.allclose(model(**train.packed_collate()(rows)).loss, padded, atol=1e-5)


# ----------------------------------------------------------------------------
# example pools: a folder of files, each a list of input/output pairs (RE-ARC's layout)

def write_pool(folder, n_pairs=12, seed=0):
    """Two pools of the colour-mapping family (data.colour_family: one rule, pairs of random 3x3 grids), and three
    broken files: one pair only, a ragged grid, bad JSON."""
    family = data.colour_family(2, 0, seed)["train"]
    rng = __import__("random").Random(seed)
    for tid, task in family.items():
        pairs = task["train"] + task["test"]
        mapping = {c: o for p in pairs for row_i, row_o in zip(p["input"], p["output"]) for c, o in zip(row_i, row_o)}
        grids = [[[rng.randrange(10) for _ in range(3)] for _ in range(3)] for _ in range(n_pairs)]
        pool = [{"input": g, "output": [[mapping.get(c, c) for c in row] for row in g]} for g in grids]
        cli.write_json(folder / f"{tid}.json", pool)
    cli.write_json(folder / "lonely.json", [{"input": [[1]], "output": [[2]]}])
    cli.write_json(folder / "ragged.json", [{"input": [[1]], "output": [[2]]},
                                             {"input": [[1, 2], [3]], "output": [[1]]}])
    (folder / "broken.json").write_text("[{")
    return folder


def captured_rows(monkeypatch):
    """The prompt/completion rows train.py tokenizes, as the run builds them."""
    rows = []
    real = train.tokenize

    def tokenize(ds, *args, **kw):
        rows.extend(ds)
        return real(ds, *args, **kw)
    monkeypatch.setattr(train, "tokenize", tokenize)
    return rows


def demonstrations(prompt):
    return prompt.count(f"{data.OUT}\n") - 1


def test_a_pool_draws_new_demonstrations_each_epoch_and_skips_broken_files(tmp_path, monkeypatch, capsys):
    pool = write_pool(tmp_path / "pool")
    rows = captured_rows(monkeypatch)
    train.main(["--dataset", str(pool), "--views", "2", "--epochs", "3", "--pool-examples", "2", "--max-steps", "1",
                "--batch-size", "4", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr()
    for name, why in (("lonely", "lonely.json: a pool holds 1 pair; it needs at least 2"), ("ragged", "is ragged"),
                      ("broken", "not valid JSON")):
        line, = [s for s in printed.err.splitlines() if f"{name}.json" in s]
        assert line.startswith("skipped ") and why in line
    assert f"data: {pool} train: 2 example pools, 3 invalid skipped" in printed.out
    # 2 tasks x 2 views x 3 epochs, each with 2 demonstrations and a test pair of its own draw
    assert len(rows) == 12 and all(demonstrations(r["prompt"]) == 2 for r in rows)
    for tid in ("train0000", "train0001"):
        for k in (0, 1):
            drawn = [r["prompt"] + r["completion"] for r in rows if r["task_id"] == tid and r["k"] == k]
            assert len(drawn) == len(set(drawn)) == 3  # a new draw each epoch
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["fingerprints"] == ["id:train0000", "id:train0001"]  # infer.py's guard knows pooled tasks by id
    assert data.seen_in_training({"train0001": data.colour_family(2, 0)["train"]["train0001"], "other": KNOWN},
                                 info["fingerprints"]) == ["train0001"]

    tasks = data.load_tasks(str(pool), "train", quiet=True)[0]
    def draw(seed):
        return data.build_dataset(tasks, "digits", [0], seed=seed, copies=2, pool_examples=2)[0]["prompt"]
    assert draw(1212) == [r["prompt"] for r in rows if r["k"] == 0 and r["copy"] < 2] == draw(1212) != draw(7)


# ----------------------------------------------------------------------------
# weights per dataset: NAME:N repeats a set's sequences N times per epoch

def test_repeat_factors_multiply_each_sets_sequences_and_are_recorded(tmp_path, capsys):
    from conftest import write_family
    small, big = write_family(tmp_path / "small", 2, 0, seed=5), write_family(tmp_path / "big", 3, 0, seed=6)
    out = tmp_path / "run"
    train.main(["--dataset", f"{small}:3", str(big), "--views", "2", "--max-steps", "1", "--batch-size", "4",
                "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"data: {small} train: 2 tasks (x3 per epoch)" in printed
    assert f"data: {small} train x3: 12 sequences (67%)" in printed  # 2 tasks x 2 views x 3
    assert f"data: {big} train x1: 6 sequences (33%)" in printed
    info = json.loads((out / "config.json").read_text())
    assert [(s["dataset"], s["repeat"], s["sequences"]) for s in info["trained_on"]] == [(str(small), 3, 12),
                                                                                        (str(big), 1, 6)]
    assert info["config"]["dataset"] == [f"{small}:3", str(big)] and info["summary"]["sequences"] == 18
    with pytest.raises(SystemExit, match=f"--dataset {small}:0: the repeat factor after ':' must be >= 1"):
        train.main(["--dataset", f"{small}:0", "--out", str(tmp_path / "bad")])


# ----------------------------------------------------------------------------
# a validation loss on held-out tasks' test outputs

def orange_pixels(png):
    """Pixels of matplotlib's second line colour (#ff7f0e): the validation curve in loss.png."""
    import matplotlib.image
    import numpy as np
    rgb = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(rgb - np.array([1.0, 0.498, 0.055])).max(axis=-1) < 0.08).sum())


def test_validation_loss_falls_on_the_family_and_is_printed_recorded_and_drawn(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--dataset", "family", "--val-dataset", "family", "--val-split", "eval", "--val-limit", "6",
                "--max-steps", "25", "--eval-steps", "10", "--logging-steps", "5", "--batch-size", "8",
                "--out", str(out)])
    printed = capsys.readouterr().out
    assert "val: family eval: 6 tasks -> 6 sequences" in printed
    step_10, = [s for s in printed.splitlines() if s.startswith("step    10/25")]
    assert "| loss " in step_10 and "| val loss " in step_10  # one line: training and validation loss
    summary = json.loads((out / "config.json").read_text())["summary"]
    steps, losses = zip(*summary["val_losses"])
    assert steps == (10, 20, 25) and losses[-1] < losses[0] and summary["val_loss"] == losses[-1]  # 25: the end
    assert f"val loss {losses[-1]:.4f}" in printed
    assert orange_pixels(out / "loss.png") > 50

    plain = tmp_path / "plain"  # off by default: no validation, no second curve
    train.main(["--dataset", "family", "--max-steps", "5", "--logging-steps", "5", "--limit", "8",
                "--out", str(plain)])
    assert "val_loss" not in json.loads((plain / "config.json").read_text())["summary"]
    assert orange_pixels(plain / "loss.png") == 0
