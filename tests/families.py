"""A synthetic ARC-format task family that a tiny model learns on a CPU in about a minute."""
import json
import random


def colour_mapping_family(seed):
    """Tasks sharing one colour permutation, applied cell by cell to random 3x3 grids. The rule looks the same
    in all 8 symmetric views, so a tiny model can learn it (a flip family cannot: each view flips differently)."""
    mapping = random.Random(seed).sample(range(10), 10)

    def task(rng, n_train=3, side=3):
        pair = lambda g: {"input": g, "output": [[mapping[c] for c in row] for row in g]}
        grid = lambda: [[rng.randrange(10) for _ in range(side)] for _ in range(side)]
        return {"train": [pair(grid()) for _ in range(n_train)], "test": [pair(grid())]}
    return task


def write_family(root, n_train, n_eval, seed=0):
    """ARC repository layout: root/training/*.json and root/evaluation/*.json, one task per file."""
    make, rng = colour_mapping_family(seed), random.Random(seed + 1)
    for split, n in (("training", n_train), ("evaluation", n_eval)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / split / f"{split[:5]}{i:04d}.json").write_text(json.dumps(make(rng)))
    return root
