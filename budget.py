"""--time-budget's planner: a whole command's time shared out task by task, each task's cost predicted from its
tokens at measured rates and learned from the tasks before it; a task gives up views, then rescoring, or is cut."""
import re
from dataclasses import dataclass, field

import data


def budget_seconds(text):
    """Seconds of a --time-budget: 11h, 90m, 600s, 1h30m or a bare number of seconds; 0 for none ("" or 0), None
    for anything else (negative, no number, an unknown unit)."""
    text = text.strip().lower()
    number = r"(\d+(?:\.\d*)?|\.\d+)"
    if re.fullmatch(number, text or "0"):
        return float(text or 0)
    parts = re.fullmatch(f"(?:{number}h)?(?:{number}m)?(?:{number}s)?", text)
    if not parts or not any(parts.groups()):
        return None
    return sum(float(n or 0) * unit for n, unit in zip(parts.groups(), (3600, 60, 1)))


@dataclass
class Plan:
    """What one task runs: its first `views` views, rescored or not, and under --time-budget its share (seconds)
    and when that ends (time.time()), and what it gave up to fit it."""
    views: int
    rescore: bool = True
    share: float = None
    until: float = None
    lost: str = ""


@dataclass
class Budget:
    """--time-budget's planner state: when the whole command's time ends, the tasks not planned yet, each task's
    tokens per view, the seconds per prompt token and per answer token one forward pass took before the first task
    (forward_rates), and what the tasks run so far measured against what those rates predicted, rescoring apart."""
    end: float
    tasks_left: int
    sizes: dict = field(default_factory=dict)  # task id -> task_load
    rates: tuple = (0.0, 0.0)
    predicted_s: float = 0.0
    work_s: float = 0.0
    predicted_score_s: float = 0.0
    score_s: float = 0.0


def budget_share(budget, now):
    """The next task's share: the time left, spread evenly over the tasks left (a fast task leaves more to the rest)."""
    return (budget.end - now) / budget.tasks_left


def task_load(task, shown, n_views, samples, count):
    """[(prompt tokens, answer tokens)] per view of a task whose test input i shows `shown[i]` (view -> (k, perm,
    prompt ids)), each prompt `samples` times (a search: once), and per prompt an answer the size of the largest of
    its test input and demonstration outputs (count(grid): its answer's tokens, EOS included)."""
    load = [[0, 0] for _ in range(n_views)]
    for i, views in shown.items():
        grids = [ex["output"] for ex in task["train"]] + [task["test"][i]["input"]]
        h, w = max(((len(g), len(g[0])) for g in grids), key=lambda s: s[0] * s[1])
        for v, (_, _, ids) in views.items():
            load[v][0] += len(ids) * max(samples, 1)
            load[v][1] += count(data.zero_grid(h, w)) * max(samples, 1)
    return [tuple(v) for v in load]


def view_costs(budget, load, learned=True):
    """(seconds without rescoring, seconds of rescoring) per view of a task of `load` (task_load): forward_rates'
    prediction, scaled (`learned`) by what the tasks run so far took against their prediction."""
    per_prompt, per_answer = budget.rates
    work_k = budget.work_s / budget.predicted_s if learned and budget.predicted_s else 1.0
    score_k = budget.score_s / budget.predicted_score_s if learned and budget.predicted_score_s else 1.0
    return [(work_k * (per_prompt * p + per_answer * a), score_k * per_prompt * (p + a)) for p, a in load]


def plan_task(budget, group, n_views, writeup, now):
    """The next task's Plan (all `n_views` views, rescored) cut to fit its share of `budget` at the cost its tokens
    per view predict (view_costs; under a budget `group` is that one task): fewer views first, down to 1 (writeup
    keeps its 2: one per guess), then no rescoring; None (the task is cut) when the time left would not cover even
    that. Without a budget, the full plan with no share. Counts the task as planned."""
    if budget is None:
        return Plan(n_views)
    share, left = budget_share(budget, now), budget.end - now
    budget.tasks_left -= 1
    plan = Plan(n_views, share=share, until=now + share)
    costs = view_costs(budget, budget.sizes[next(iter(group))])
    cost = lambda views, rescore: sum(w + s * rescore for w, s in costs[:views])  # noqa: E731
    least = n_views if writeup else 1
    if left <= 0 or cost(least, False) > left:
        return None
    if writeup or cost(n_views, True) <= share:
        return plan
    plan.views = max([v for v in range(least, n_views + 1) if cost(v, True) <= share], default=least)
    plan.rescore = cost(plan.views, True) <= share
    plan.lost = ", ".join([f"{plan.views} of {n_views} views"] * (plan.views < n_views)
                          + ["no rescoring (candidates ranked by votes)"] * (not plan.rescore)) + \
        f": its share of --time-budget is {share:.1f} s, its full plan about {cost(n_views, True):.1f} s"
    return plan


def measure(budget, plan, group, seconds, score_s, unsearched=0):
    """Count the task of `group` run under `plan` in `budget`: its seconds against what the rates predicted for
    what ran, less the share of `unsearched` views (searches that ran out of time before them) of its test inputs'
    planned ones."""
    if budget is not None:
        costs = view_costs(budget, budget.sizes[next(iter(group))], learned=False)[:plan.views]
        planned = plan.views * sum(len(task["test"]) for task in group.values())
        budget.predicted_s += sum(w for w, _ in costs) * (1 - unsearched / planned if planned else 1)
        budget.predicted_score_s += sum(s for _, s in costs) * plan.rescore
        budget.work_s += seconds - score_s
        budget.score_s += score_s
