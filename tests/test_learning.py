"""What a run learns from: which tokens carry the loss (--loss answer | outputs).

    python -m pytest tests/test_learning.py -q
"""
import json

import pytest

import data
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


@pytest.mark.parametrize("make_tokenizer", [train.tiny_tokenizer, train.llama3_hf_tokenizer])
@pytest.mark.parametrize("loss", data.LOSSES)
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
        data.write_json(family / f"{tid}.json", task)
    counts = {}
    for loss in data.LOSSES:
        out = tmp_path / loss
        train.main(["--dataset", str(family), "--views", "1", "--max-steps", "1", "--batch-size", "4", "--loss", loss,
                    "--packing", "--out", str(out)])
        line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("loss: on "))
        counts[loss] = int(line.split(": ")[2].split(" of ")[0].replace(",", ""))
        info = json.loads((out / "config.json").read_text())
        assert info["config"]["loss"] == loss and info["summary"]["steps"] == 1
    # 3x3 grids in the digits format: 12 tokens and the end marker per output; 3 train outputs and the test's
    assert counts == {"answer": 4 * (13 + 1), "outputs": 4 * (13 + 1 + 2 * 13)}


def test_packed_batch_gives_the_padded_loss_on_every_output():
    import torch
    tokenizer = train.tiny_tokenizer()
    tasks = dict(sorted(data.load_tasks("arc1", "train")[0].items())[:3])
    ds, _ = data.build_dataset(tasks, "digits", symmetries=[0, 1])
    rows = list(train.tokenize(ds, tokenizer, 100_000, loss="outputs")[0])
    answer_only = list(train.tokenize(ds, tokenizer, 100_000)[0])
    assert sum(r["labels"].count(-100) for r in rows) < sum(r["labels"].count(-100) for r in answer_only)
    model = train.tiny_model(tokenizer, max_seq_len=4096)
    model.config.use_cache = False
    with torch.no_grad():
        padded = model(**train.collate(data.pad_id(tokenizer))(rows)).loss
        assert torch.allclose(model(**train.packed_collate()(rows)).loss, padded, atol=1e-5)
