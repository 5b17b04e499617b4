"""The recipes: for each model, every setting a flag left on auto takes. train.py's automatic settings and its --help
both read this table, so the help cannot drift from what a run does."""
from hub import GPU_MODEL, SMOLLM2

# model -> settings of its auto flags; any other model (a hub name, a folder) takes the Llama-3-8B row, the
# write-up's LoRA recipe; "cpu": what differs on a CPU
RECIPES = {
    GPU_MODEL: dict(full_finetune=False, max_steps=-1, max_seq_len=8192, batch_size=2, grad_accum=4, lr=2e-4,
                    optim="adamw_8bit", load_in_4bit=True),
    # SmolLM2-135M: 16 sequences per step, as the 8B recipe's 2 x 4 would be too few for a model this fast
    SMOLLM2: dict(full_finetune=False, max_steps=-1, max_seq_len=8192, batch_size=4, grad_accum=4, lr=4e-4,
                  optim="adamw_8bit", load_in_4bit=True),
    # 0.5M parameters from random weights: a full fine-tune (its lr; a tiny LoRA takes the LoRA row's), a few
    # minutes on 2 cores
    "tiny": dict(full_finetune=True, max_steps=-1, max_seq_len=1024, batch_size=16, grad_accum=1, lr=1e-3,
                 optim="adamw_torch", load_in_4bit=False, cpu=dict(max_steps=300)),
}
ON_CPU = dict(optim="adamw_torch", load_in_4bit=False)  # bitsandbytes' 8-bit AdamW needs a GPU; small models train
# in fp32 on a CPU
WRITEUP_RECIPE = dict(vocab="full", loss="answer")  # --writeup: the write-up's recipe where our measured defaults differ
WRITEUP_FLAGS = " ".join(f"--{k} {v}" for k, v in WRITEUP_RECIPE.items())
NAMES = {GPU_MODEL: "Llama-3-8B (any other model too)", SMOLLM2: SMOLLM2, "tiny": "tiny"}


def recipe(model, gpu, full_finetune=None):
    """The auto settings of `model` on this device; a LoRA on a model whose row is a full fine-tune takes the LoRA
    row's learning rate."""
    row = RECIPES.get(model, RECIPES[GPU_MODEL])
    out = {k: v for k, v in row.items() if k != "cpu"}
    if not gpu:
        out.update(ON_CPU, **row.get("cpu", {}))
    if full_finetune is False and row["full_finetune"]:
        out["lr"] = RECIPES[GPU_MODEL]["lr"]
    return out


def shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.0e}".replace("e-0", "e-")
    return "from --epochs" if value == -1 else str(value)


def auto_help(name):
    """What --NAME takes on auto, per model (and on a CPU where that differs), for its help text."""
    said = {}
    for model, row in RECIPES.items():
        text = shown(row[name])
        cpu = {**ON_CPU, **row.get("cpu", {})}.get(name, row[name])
        if cpu != row[name]:
            text += f" ({shown(cpu)} on a CPU)"
        said.setdefault(text, []).append(NAMES[model])
    return "auto: " + "; ".join(f"{text} for {' and '.join(models)}" for text, models in said.items())
