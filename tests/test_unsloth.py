"""The Unsloth path on a CPU: train.py and infer.py with --backend unsloth, each in a process of its own with
Unsloth's CPU switches (tests/unsloth_cpu.py), on a tiny tied model saved as a folder. Unsloth's loss and
gradients match transformers + peft computed in a process that never imported unsloth, with the whole vocabulary
and with --vocab arc's cut; a cut run trains, resumes, merges and predicts, with its base in 16 bits and in 4 bits;
and the faults found in our Unsloth calls stay fixed.

    python -m pytest tests/test_unsloth.py -q
"""
import json
import sys

import pytest
import torch

import data
import models
import runs
import submit
import train
import unsloth_cpu
from conftest import answer_logits, cpu_setup, trained_tensors, write_family

pytestmark = pytest.mark.skipif(not unsloth_cpu.available(), reason="unsloth is not installed")
POSITIONS = 512  # the tiny model's max_position_embeddings: auto --max-seq-len is capped to it
UNUSED = 200  # words of the tiny model's vocabulary that ARC text never uses: --vocab arc cuts them
KEPT = 17  # the tiny tokenizer's 18 tokens but <pad>: the tied model pads with </s>
SCORES_REL = 3e-4  # fp16 here: cached and full forward scores differ by <= 3.4e-5; a lost prompt moves them by >= 4e-3


def tiny_tokenizer_with_unused_words():
    """The tiny word-level tokenizer with UNUSED more words in its vocabulary (after its own, ids unchanged), as a
    real tokenizer holds far more tokens than the format writes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tiny = models.tiny_tokenizer()
    spec = json.loads(tiny.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"unused{i}": len(vocab) + i for i in range(UNUSED)})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tied_tiny_model(folder):
    """A tiny Llama with tied embeddings (as SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B), pad == eos (as SmolLM2's
    <|im_end|>) and words no ARC text uses, saved as a model folder that Unsloth can load."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = tiny_tokenizer_with_unused_words()
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=POSITIONS,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("unsloth")
    return root, tied_tiny_model(root / "tied"), write_family(root / "family", n_train=6, n_eval=3)


def run(mode, *args, root):
    """A script through Unsloth on the CPU, from a working directory of its own (to see what it leaves there),
    with the Hugging Face cache in the test's folder."""
    work = root / "work"
    work.mkdir(exist_ok=True)
    result = unsloth_cpu.run(mode, *args, cwd=work, env={"HF_HOME": str(root / "hf_home")})
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def trained(setup):
    """One Unsloth run shared by the tests, on the cut vocabulary: 6 steps with a checkpoint at 4, a merged model
    and a validation loss every 3 steps, then resumed to 8. --loss answer: the falling loss and the dfs check below
    are set for the weights it gives (--loss outputs on Unsloth: test_unsloth_loss_on_every_output_...)."""
    root, model, family = setup
    out = root / "runs" / "lora"
    first = run("train", "--backend", "unsloth", "--model", model, "--dataset", family, "--split", "train",
                "--max-steps", "6", "--save-steps", "4", "--logging-steps", "1", "--batch-size", "4",
                "--grad-accum", "1", "--lr", "1e-2", "--vocab", "arc", "--loss", "answer",
                "--no-load-in-4bit", "--merge", "--val-dataset", family, "--val-split", "eval", "--eval-steps", "3",
                "--out", out, root=root)
    info = json.loads((out / "config.json").read_text())
    resumed = run("train", "--resume", "--out", out, "--max-steps", "8", root=root)
    return out, first, info, resumed


@pytest.mark.parametrize("vocab", train.VOCABS)
def test_unsloth_loss_and_gradients_match_transformers_in_a_process_without_unsloth(setup, vocab):
    root, model, family = setup
    if not (root / "reference.pt").exists():
        run("grads", root / "unsloth.pt", model, family, root=root)
        reference = unsloth_cpu.run("reference", root / "reference.pt", model, family, root / "unsloth.pt", cwd=root)
        assert reference.returncode == 0, reference.stdout[-4000:]  # it asserts "unsloth" not in sys.modules itself
    ours = torch.load(root / "unsloth.pt", weights_only=False)[vocab]
    theirs = torch.load(root / "reference.pt")[vocab]
    assert ours["dtype"] == "torch.float16"  # Unsloth on this "GPU" without bf16: fp16, against an fp32 reference
    full = len(tiny_tokenizer_with_unused_words())
    assert full == KEPT + 1 + UNUSED
    assert ours["vocab_size"] == theirs["vocab_size"] == (full if vocab == "full" else KEPT)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-3)
    names = set(ours["grads"])
    assert names == set(theirs["grads"])
    assert {n for n in names if "modules_to_save" in n and "embed_tokens" in n}
    assert {n for n in names if "modules_to_save" in n and "lm_head" in n}
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 2 * len(models.PROJECTIONS)
    for name in names:
        a, b = ours["grads"][name].flatten(), theirs["grads"][name].flatten()
        assert b.norm() > 0, name
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999, name
        assert float(a.norm() / b.norm()) == pytest.approx(1, abs=0.01), name


@pytest.mark.parametrize("vocab", train.VOCABS)
def test_packing_on_unsloth_gives_the_padded_loss_because_it_carries_the_boundaries(setup, vocab):
    """Unsloth finds packed sequences' boundaries only from packed_seq_lengths, which train.py's packed
    batches now carry; without it (position_ids only, as before) the sequences attend to each other."""
    root, model, family = setup
    if not (root / "unsloth.pt").exists():
        run("grads", root / "unsloth.pt", model, family, root=root)
    ours = torch.load(root / "unsloth.pt", weights_only=False)[vocab]
    assert ours["packed_loss"] == pytest.approx(ours["loss"], rel=1e-5)
    # a random tiny model attends almost uniformly, so the leak moves its loss by little, but clearly
    assert abs(ours["unbounded_loss"] - ours["loss"]) > 2e-4 * ours["loss"]


@pytest.mark.parametrize("vocab", train.VOCABS)
def test_unsloth_loss_on_every_output_matches_transformers_padded_and_packed(setup, vocab):
    root, model, family = setup
    if not (root / "reference.pt").exists():
        run("grads", root / "unsloth.pt", model, family, root=root)
        reference = unsloth_cpu.run("reference", root / "reference.pt", model, family, root / "unsloth.pt", cwd=root)
        assert reference.returncode == 0, reference.stdout[-4000:]
    ours = torch.load(root / "unsloth.pt", weights_only=False)[vocab]
    theirs = torch.load(root / "reference.pt")[vocab]
    labelled = lambda batch: int((batch["labels"] != -100).sum())  # noqa: E731
    assert labelled(ours["outputs_batch"]) > labelled(ours["batch"])  # more tokens in the loss, another loss
    assert ours["outputs_loss"] != pytest.approx(ours["loss"], rel=1e-3)
    assert ours["outputs_loss"] == pytest.approx(theirs["outputs_loss"], rel=1e-3)
    assert ours["outputs_packed_loss"] == pytest.approx(ours["outputs_loss"], rel=1e-5)


def test_unsloth_run_trains_embeddings_and_resumes(setup, trained):
    root, model, _ = setup
    out, first, info, resumed = trained
    assert info["backend"] == "unsloth" and "--backend unsloth" in info["why"] and info["lora"]
    assert "backend: unsloth" in first
    keep = info["keep_ids"]
    assert info["vocab"] == "arc" and len(keep) == KEPT
    losses = [loss for _, loss in info["summary"]["losses"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from safetensors.torch import load_file
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    # the trained copies (peft also saves the cut base's rows, as for any resized vocabulary)
    trained_embed = [v for k, v in adapter.items() if "embed_tokens.modules_to_save" in k]
    trained_head = [v for k, v in adapter.items() if "lm_head.modules_to_save" in k]
    assert len(trained_embed) == len(trained_head) == 1
    assert trained_embed[0].shape[0] == trained_head[0].shape[0] == len(keep)
    start = load_file(model / "model.safetensors")["model.embed_tokens.weight"].float()[keep]
    assert not torch.allclose(trained_embed[0].float(), start, atol=1e-3)
    assert not torch.allclose(trained_head[0].float(), start, atol=1e-3)  # started as the tied copy
    assert "resume: from" in resumed and "checkpoint-6" in resumed  # the Trainer saves its last step too
    summary = json.loads((out / "config.json").read_text())["summary"]
    assert summary["resumed_from"] == 6 and summary["steps"] == 8


def test_unsloth_run_reports_a_validation_loss_kept_across_its_resume(trained):
    out, first, info, resumed = trained
    assert "| val loss " in first and "val: " in first
    summary = json.loads((out / "config.json").read_text())["summary"]
    assert [step for step, _ in summary["val_losses"]] == [3, 6, 8]  # 3 from the checkpoint resumed, 8: the end
    assert all(0 < loss < 10 for _, loss in summary["val_losses"])


@pytest.fixture(scope="module")
def predicted(setup, trained):
    """One Unsloth process on the trained run (its import costs the most): infer.py predicts the eval split, then
    the scores of unsloth_cpu.scores are written. (its output, the scores)"""
    root, _, family = setup
    out = trained[0]
    output = run("scores", root / "scores.json", out, family, "--backend", "unsloth", "--model", out, "--dataset",
                 family, "--split", "eval", "--max-new-tokens", "12", "--out", root / "submission.json", root=root)
    return output, json.loads((root / "scores.json").read_text())


def test_unsloth_run_predicts_a_valid_submission(setup, predicted):
    root, _, family = setup
    output = predicted[0]
    assert "backend: unsloth (--backend unsloth)" in output and "Unsloth should be imported before" not in output
    tasks, _ = data.load_tasks(str(family), "eval")
    submission = json.loads((root / "submission.json").read_text())
    submit.check_submission(submission, tasks, "submission")
    assert set(submission) == set(tasks)


def test_unsloth_scores_on_a_shared_prefix_and_dfs_nlls_equal_full_forward_ones(predicted):
    """Unsloth's forward returns its cache instead of filling the one given, and takes one token on a cache as a
    decoding step (its position needed): infer.py's cached scores of real prompts' candidates, in 2 views, equal a
    full forward per pair and rank alike; dfs finds each completion at the nll a full forward gives, the same ones
    with its longest as a draft (fewer passes) and with other drafts (wrong, too long, off the format, every
    answer), and the scores from the caches it kept are the full forward ones."""
    r = predicted[1]
    assert r["dtype"] == "torch.float16"
    assert 2 in r["lengths"] and min(r["lengths"]) == 2 < max(r["lengths"])  # one completion token fed, and many
    assert r["cached"] == pytest.approx(r["full"], rel=SCORES_REL)
    ranks = lambda s: [sorted(range(4), key=lambda j: -s[i + j]) for i in range(0, len(s), 4)]  # noqa: E731
    assert ranks(r["cached"]) == ranks(r["full"])
    search = r["dfs"]
    assert search["finished"] and search["kept"] == 1
    tokens, nll = [t for t, _ in search["found"]], [nll for _, nll in search["found"]]
    assert max(map(len, tokens)) >= 2 and search["forwards"] > len(tokens)  # branches cropped and grown
    assert nll == pytest.approx([-s for s in search["full"]], rel=SCORES_REL)
    assert search["from_search"] == pytest.approx(search["full"], rel=SCORES_REL)
    assert [t for t, _ in search["again"]] == tokens and search["again_forwards"] < search["forwards"]
    assert [nll for _, nll in search["again"]] == pytest.approx(nll, rel=SCORES_REL)
    for drafted in search["drafted"]:  # drafts verified in one pass each: the same answers at the same nll
        assert [t for t, _ in drafted] == tokens
        assert [nll for _, nll in drafted] == pytest.approx(nll, rel=SCORES_REL)


def test_unsloth_merge_of_a_tied_base_keeps_the_trained_head(trained):
    """Unsloth's merged save of an untied-on-purpose base wrote no lm_head and said tied. The merged
    folder holds the cut vocabulary and its own tokenizer."""
    out, info = trained[0], trained[2]
    from safetensors.torch import load_file
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["tie_word_embeddings"] is False
    weights = load_file(out / "merged" / "model.safetensors")
    head = [v for k, v in load_file(out / "final" / "adapter_model.safetensors").items()
            if "lm_head.modules_to_save" in k][0]
    assert torch.allclose(weights["lm_head.weight"].float(), head.float(), atol=1e-2)
    assert not torch.allclose(weights["lm_head.weight"].float(), weights["model.embed_tokens.weight"].float(),
                              atol=1e-3)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert torch.allclose(reloaded.lm_head.weight.float(), head.float(), atol=1e-2)
    assert reloaded.config.vocab_size == len(info["keep_ids"]) == reloaded.model.embed_tokens.weight.shape[0]
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert len(tokenizer) == len(info["keep_ids"]) and reloaded.config.eos_token_id == tokenizer.eos_token_id


def test_unsloth_is_imported_before_transformers_and_leaves_no_cache_in_the_working_directory(setup, trained):
    """Unsloth comes before transformers (its patches hold only then); its compiled cache and embedding offload stay
    out of the user's way."""
    root = setup[0]
    out, first, _, resumed = trained
    for output in (first, resumed):
        assert "Unsloth should be imported before" not in output
        assert "Traceback" not in output
    assert not list((root / "work").iterdir())
    assert list((root / "hf_home" / "arc-lora").glob("unsloth_compiled_cache-*"))


def test_auto_max_seq_len_is_capped_at_the_models_positions(trained):
    """Unsloth scales RoPE past the model's positions, transformers does not: auto stays within them."""
    _, first, info, _ = trained
    assert f"auto: max_seq_len {POSITIONS} (the model's max_position_embeddings" in first
    assert "auto: max_seq_len 128 (the longest sequence is" in first  # then cut to what the family's data needs
    assert info["max_seq_len"] == 128 and info["rope_scaling"] is None


def test_pad_and_eos_agree_between_backends(setup, trained):
    """Unsloth replaces a pad equal to eos (SmolLM2's <|im_end|>); the run keeps the model's own."""
    model = setup[1]
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(trained[0] / "final")
    _, plain = models.load_base(str(model), models.make_setup("auto", "transformers"))
    assert (saved.pad_token, saved.eos_token) == (plain.pad_token, plain.eos_token) == ("</s>", "</s>")
    assert "unsloth" not in sys.modules


def test_full_finetune_past_the_positions_records_16_bits_and_rope_scaling(setup):
    """A --full-finetune run on Unsloth (which turns 4 bits off) is recorded as 16-bit; a
    --max-seq-len given past the model's positions is kept, said, and its RoPE scaling recorded."""
    root, model, family = setup
    out = root / "runs" / "full"
    output = run("train", "--backend", "unsloth", "--model", model, "--dataset", family, "--split", "train",
                 "--limit", "2", "--views", "1", "--max-steps", "1", "--full-finetune", "--vocab", "full",
                 "--max-seq-len", str(2 * POSITIONS), "--out", out, root=root)
    info = json.loads((out / "config.json").read_text())
    assert info["load_in_4bit"] is False and info["lora"] is False
    assert info["max_seq_len"] == 2 * POSITIONS
    assert info["rope_scaling"] == {"type": "linear", "factor": 2.0, "positions": POSITIONS}
    assert "Unsloth scales RoPE linearly by 2" in output
    assert runs.read_run(out).load_in_4bit is False


def test_base_and_adapter_on_a_4bit_base_load_the_4bit_repo(tmp_path):
    """--model unsloth/llama-3-8b-bnb-4bit --adapter DIR loaded the 16-bit repo (a 16 GB download)."""
    (tmp_path / "adapter").mkdir()
    for name, four in (("unsloth/llama-3-8b-bnb-4bit", True), ("unsloth/llama-3-8b", False)):
        run_ = runs.find_run(name, str(tmp_path / "adapter"))
        assert run_.load_in_4bit is four and run_.backend == "unsloth"


@pytest.fixture(scope="module")
def four_bit(setup):
    """An Unsloth run on the base loaded in 4 bits (unsloth_cpu.patch_4bit): 2 steps and a checkpoint, resumed to 3
    with --merge at a constant learning rate, then infer.py on its adapter through Unsloth."""
    root, model, family = setup
    out = root / "runs" / "four"
    common = ["--backend", "unsloth", "--model", model, "--dataset", family, "--split", "train", "--load-in-4bit",
              "--vocab", "arc", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--scheduler", "constant",
              "--warmup", "0", "--save-steps", "2", "--logging-steps", "1", "--out", out]
    trained = run("train", *common, "--max-steps", "2", root=root)
    trained += run("train", *common, "--max-steps", "3", "--resume", "--merge", root=root)
    predicted = run("infer", "--backend", "unsloth", "--model", out, "--dataset", family, "--split", "eval",
                    "--limit", "1", "--temperature", "0", "--max-new-tokens", "24", root=root)
    return out, trained, predicted


def test_unsloth_trains_resumes_and_predicts_on_a_4bit_base(four_bit):
    out, trained, predicted = four_bit
    model_lines = [line for line in trained.splitlines() if line.startswith("model: ")]
    assert len(model_lines) == 2 and all("4-bit (bitsandbytes, 14 Linear4bit layers; compute float16)" in x
                                         for x in model_lines), model_lines
    info = json.loads((out / "config.json").read_text())
    assert info["load_in_4bit"] is True and info["summary"]["steps"] == 3 and info["summary"]["resumed_from"] == 2
    final, before = trained_tensors(out / "final"), trained_tensors(out / "checkpoints" / "checkpoint-2")
    assert len(final) == 4 * len(models.PROJECTIONS) + len(models.EMBEDDINGS) and final.keys() == before.keys()
    for key, value in final.items():  # the LoRA factors, embed_tokens and lm_head all moved in the resumed step
        assert not torch.equal(value, before[key]), key
    weights = next(line for line in predicted.splitlines() if line.startswith("weights: "))
    assert "4-bit (bitsandbytes, 14 Linear4bit layers" in weights and ", merged" not in weights
    assert json.loads((out / "results.limit-1.json").read_text())["tasks"] == 1


def test_unsloth_merges_a_4bit_run_into_its_16bit_base(setup, four_bit):
    """Unsloth's merged_16bit adds the LoRA to the base's own 16-bit weights, read again from its folder, not to the
    4-bit weights it trained on: the merged model differs from the trained one by the quantization error."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, model, family = setup
    out, _, _ = four_bit
    base, merged = load_file(model / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    lora, scale = trained_tensors(out / "final"), 16 / 16 ** 0.5  # rsLoRA: alpha / sqrt(r)
    factors = [k for k in lora if k.endswith(".lora_A.weight")]
    assert len(factors) == 2 * len(models.PROJECTIONS)
    for key in factors:
        name = key.replace("base_model.model.", "", 1).replace(".lora_A", "")
        delta = scale * lora[key.replace("lora_A", "lora_B")] @ lora[key]
        assert torch.allclose(merged[name].float(), base[name] + delta, atol=1e-3), name
    adapter, tokenizer = models.load_model(runs.read_run(out), cpu_setup())  # the 4-bit base, transformers' path
    assert models.quantized_layers(adapter) == 2 * len(models.PROJECTIONS)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids, trained = answer_logits(adapter, tokenizer, family, "train")
    merged_ids, merged_logits = answer_logits(reloaded, AutoTokenizer.from_pretrained(out / "merged"), family, "train")
    assert torch.equal(ids, merged_ids)
    agree = (trained.argmax(-1) == merged_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.98, agree  # 0.992 measured: the quantization error moves a few tokens
