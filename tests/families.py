"""Synthetic ARC-format task families that a tiny model can learn on a CPU in minutes."""
import json
import random


def colour_mapping_task(rng, n_train=3, side=3):
    """A task whose rule is a fixed colour mapping: 3 colours map to 3 others, cell by cell. Every colour of the
    test input appears in the train inputs, so the examples determine the answer."""
    src = rng.sample(range(10), 3)
    mapping = dict(zip(src, rng.sample(range(10), 3)))

    def grid():
        while True:
            g = [[rng.choice(src) for _ in range(side)] for _ in range(side)]
            if len({c for row in g for c in row}) == 3:
                return g

    pair = lambda g: {"input": g, "output": [[mapping[c] for c in row] for row in g]}
    return {"train": [pair(grid()) for _ in range(n_train)], "test": [pair(grid())]}


def write_family(root, n_train, n_eval, seed=0, make=colour_mapping_task):
    """ARC repository layout: root/training/*.json and root/evaluation/*.json, one task per file."""
    rng = random.Random(seed)
    for split, n in (("training", n_train), ("evaluation", n_eval)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / split / f"{split[:5]}{i:04d}.json").write_text(json.dumps(make(rng)))
    return root
