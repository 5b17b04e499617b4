"""The synthetic task family (data.colour_family) written in the ARC repository layout, for tests that need it as
files on disk: root/training/*.json and root/evaluation/*.json, one task per file."""
import json

import data


def write_family(root, n_train, n_eval, seed=0):
    for (split, tasks), folder in zip(data.colour_family(n_train, n_eval, seed).items(), ("training", "evaluation")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for tid, task in tasks.items():
            (root / folder / f"{tid}.json").write_text(json.dumps(task))
    return root
