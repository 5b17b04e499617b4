"""Every picture the scripts draw: a task and its views (data.py --show), a run's loss curve (loss.png), and the
solved tasks, near misses and summary of a scored submission (infer.py --plot)."""
from pathlib import Path

import numpy as np

from cli import safe_name
from data import view_task
from submit import TABLE_KEYS, table_columns


NEAR_MISS = 0.8  # a wrong guess of the right size with at least this fraction of right pixels gets a picture
MAX_PLOTS = 24

ARC_COLOURS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
               "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25"]


def draw_grid(ax, grid, title=""):
    from matplotlib.colors import ListedColormap
    a = np.asarray(grid)
    ax.imshow(a, cmap=ListedColormap(ARC_COLOURS), vmin=0, vmax=9, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, a.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, a.shape[0]), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=8)


def show_task(task, tid, path):
    """PNG: one row per symmetry k, columns are the train pairs then the test pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = task["train"] + task["test"]
    cols = 2 * len(pairs)
    fig, axes = plt.subplots(8, cols, figsize=(1.3 * cols, 1.3 * 8), squeeze=False)
    for k in range(8):
        view = view_task(task, k)
        for j, ex in enumerate(view["train"] + view["test"]):
            test = j >= len(view["train"])
            label = f"test{j - len(view['train'])}" if test else f"ex{j}"
            draw_grid(axes[k, 2 * j], ex["input"], f"k={k} {label} in")
            if "output" in ex:
                draw_grid(axes[k, 2 * j + 1], ex["output"], "out")
            else:
                axes[k, 2 * j + 1].axis("off")
    fig.suptitle(f"task {tid}: the 8 symmetries (rows) of every example (columns)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_results(tasks, guesses, r, folder, title, names):
    """PNGs: each solved task and near miss (test input, expected, guess 1, guess 2) and summary.png.
    Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_task = r["per_task"]
    solved = [tid for tid, t in per_task.items() if t["score"] > 0]
    best = {tid: max((p or 0.0) for pair in t["pixels"] for p in pair) for tid, t in per_task.items()}
    near = sorted((tid for tid in per_task if tid not in solved and best[tid] >= NEAR_MISS), key=lambda t: -best[t])
    written = []
    for tid in (solved + near)[:MAX_PLOTS]:
        task, t = tasks[tid], per_task[tid]
        fig, axes = plt.subplots(len(task["test"]), 4, figsize=(8, 2.2 * len(task["test"])), squeeze=False)
        for i, test in enumerate(task["test"]):
            draw_grid(axes[i, 0], test["input"], f"test {i} input")
            draw_grid(axes[i, 1], test["output"], "expected")
            for g in range(2):
                ax, grid, pixels = axes[i, 2 + g], guesses[tid][i][g], t["pixels"][i][g]
                word = names[g]
                name = f"guess {g + 1}" + (f" ({word})" if word not in ("first", "second") else "")
                if grid is None:
                    ax.axis("off")
                    ax.set_title(f"{name}: no answer", fontsize=8)
                    continue
                verdict = "right" if [t["first"], t["second"]][g][i] else \
                    f"{pixels:.0%} pixels" if pixels is not None else "wrong size"
                draw_grid(ax, grid, f"{name}: {verdict}")
        fig.suptitle(f"task {tid}: {'solved' if tid in solved else 'near miss'} ({title})", fontsize=9)
        fig.tight_layout()
        written.append(folder / f"{safe_name(tid)}.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    values = [r[k] for k in TABLE_KEYS]
    a.bar(range(5), values, color="#0074D9")
    a.set_xticks(range(5), [label.replace(" by ", "\nby ") for label in table_columns(names)], fontsize=7)
    for x, v in enumerate(values):
        a.text(x, v, str(v), ha="center", va="bottom", fontsize=8)
    a.set_title(f"tasks (score {r['score']:.2f} / {r['tasks']} = {r['score_pct']:.1f}%)", fontsize=9)
    pixels = [p for t in per_task.values() for pair in t["pixels"] for p in pair]
    right = sum(x for t in per_task.values() for x in t["first"] + t["second"])
    kinds = dict(right=right, **{"right size only": sum(p is not None for p in pixels) - right,
                                 "wrong size": len(pixels) - r["unanswered"] - sum(p is not None for p in pixels),
                                 "no answer": r["unanswered"]})
    b.bar(range(4), list(kinds.values()), color=["#2ECC40", "#FFDC00", "#FF851B", "#AAAAAA"])
    b.set_xticks(range(4), list(kinds))
    b.set_title(f"all {r['guesses']} guesses", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    written.append(folder / "summary.png")
    fig.savefig(written[-1], dpi=80)
    plt.close(fig)
    return written


def plot_losses(losses, path, title, val_losses=None):
    """loss.png: every logged training loss against its step, and the validation losses when there are."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot([step for step, _ in losses], [loss for _, loss in losses], marker="." if len(losses) < 50 else None,
            label="training loss")
    if val_losses:
        ax.plot([step for step, _ in val_losses], [loss for _, loss in val_losses], marker="o", label="validation loss")
        ax.legend()
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
