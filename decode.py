"""Decoding: sampling a grid (stopped as soon as its text can no longer be one), the log-probability of given
answers from one prompt prefix, and the depth-first search for every answer above a probability."""
import functools
import hashlib
import math
import time

import data
from cli import OneLineError
from models import encode_completion, pad_id


def answer_tokens(tokenizer, fmt):
    """Tokens of the largest possible answer: a 30x30 grid, its row breaks and end marker, plus EOS."""
    return len(tokenizer.encode(data.format_completion(data.zero_grid(data.MAX_SIDE, data.MAX_SIDE), fmt),
                                add_special_tokens=False)) + 1


def answer_ids(tokenizer, fmt):
    """The token ids an answer is written with (each colour's cell, row end, end marker, EOS), read off answers
    the format writes, so that whatever the tokenizer merges at a row's end is included."""
    grids = ([list(range(10)), list(range(9, -1, -1))], [[c] for c in range(10)], [[0]])
    return sorted({t for g in grids for t in encode_completion(tokenizer, data.format_completion(g, fmt))})


def grid_stopper(tokenizer, fmt, width):
    """A stopping criterion that ends each row of a batch on its own once its text can no longer be an answer
    (data.could_be_answer) or the end marker is written; `stops[i]` is where row i stopped (tokens generated)."""
    import torch
    from transformers import StoppingCriteria
    pieces = {}  # token id -> its text, decoded once

    class GridStop(StoppingCriteria):
        def __init__(self):
            self.texts, self.stops = None, None

        def __call__(self, input_ids, scores, **kwargs):
            if self.texts is None:
                self.texts, self.stops = [""] * len(input_ids), [None] * len(input_ids)
            n = input_ids.shape[1] - width
            for i, token in enumerate(input_ids[:, -1].tolist()):
                if self.stops[i] is not None or token == tokenizer.eos_token_id:
                    self.stops[i] = self.stops[i] or n
                    continue
                if token not in pieces:
                    pieces[token] = tokenizer.decode([token])
                self.texts[i] += pieces[token]
                if data.END in self.texts[i] or not data.could_be_answer(self.texts[i], fmt):
                    self.stops[i] = n
            return torch.tensor([s is not None for s in self.stops], device=input_ids.device)
    return GridStop()


def row_seed(seed, *where):
    """The sampling seed of one prompt: from --seed and the prompt's task, test input, view and sample number only."""
    return int(hashlib.sha256(repr((seed, *where)).encode()).hexdigest()[:15], 16)


def seeded_sampler(seeds, top_k, temperature, device):
    """A logits processor drawing each row's next token (temperature, then top-k, as generate's own sampling) from
    a generator of its own, seeded by `seeds`: a guess depends on its seed only, not on the other prompts of its
    batch nor on how many ran before, so a killed and resumed or sharded run samples what one run would. It
    returns scores where only the drawn token is finite, for generate's greedy step to take."""
    import torch
    from transformers import LogitsProcessor
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    class Sampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.float() / temperature
            if top_k:
                kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, -math.inf)
            probs = scores.softmax(-1)
            picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
            return torch.full_like(scores, -math.inf).scatter(1, picks[:, None], 0.0)
    return Sampler()


def generate(model, tokenizer, prompts, cfg, fmt=None, min_new_tokens=0, seeds=None):
    """Completions of a batch of token-id prompts in one left-padded generate() call, each decoded up to EOS.
    With `fmt`, each row stops as soon as its text can no longer be a grid in that format (grid_stopper): an
    untrained model's guesses end after a few tokens instead of at max_new_tokens. `seeds`: one per prompt, each
    row sampled from its own (seeded_sampler). `min_new_tokens` only serves benchmarks that need a fixed length."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList
    pad = pad_id(tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    sampling = dict(do_sample=True, top_k=cfg.top_k, temperature=cfg.temperature) if cfg.temperature > 0 \
        else dict(do_sample=False, top_k=None, temperature=None)
    if seeds is not None and cfg.temperature > 0:
        sampling = dict(do_sample=False, top_k=None, temperature=None, logits_processor=LogitsProcessorList(
            [seeded_sampler(seeds, cfg.top_k, cfg.temperature, model.device)]))
    # On CPU the default DynamicCache copies every layer's keys and values at each step (torch.cat): at 32 prompts
    # a step costs 4x more than with a preallocated static cache. Unsloth on a GPU keeps its own cache.
    cache = dict(cache_implementation="static") if model.device.type == "cpu" else {}
    # the context bounds the answer too: prompt + answer never exceed max_seq_len
    max_new = min(cfg.max_new_tokens, cfg.max_seq_len - width) if cfg.max_seq_len else cfg.max_new_tokens
    stop = grid_stopper(tokenizer, fmt, width) if fmt and not min_new_tokens else None
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_new, 1),
                             min_new_tokens=min_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stop] if stop else []),
                             **sampling, **cache)
    texts = []
    for i, row in enumerate(out[:, width:].tolist()):
        if stop and stop.stops and stop.stops[i] is not None:
            row = row[:stop.stops[i]]
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row))  # special tokens kept: one inside an answer makes it unparsable
    return texts


def generate_halving(model, tokenizer, prompts, cfg, fmt=None, seeds=None):
    """generate(), retried in two halves when the GPU runs out of memory, so one big batch costs a retry, not
    the run; a single prompt that does not fit is an error naming the flags that help."""
    import torch
    try:
        return generate(model, tokenizer, prompts, cfg, fmt, seeds=seeds)
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise OneLineError(f"GPU out of memory on one prompt of {len(prompts[0])} tokens: lower --max-seq-len "
                               "(tasks are trimmed to fit) or use a GPU with more memory")
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        print(f"note: GPU out of memory at {len(prompts)} prompts per batch, retrying as 2 x {half}; "
              f"a smaller --batch-size avoids the retries")
        return generate_halving(model, tokenizer, prompts[:half], cfg, fmt, seeds and seeds[:half]) + \
            generate_halving(model, tokenizer, prompts[half:], cfg, fmt, seeds and seeds[half:])


def parse_guess(text, fmt):
    """(grid as written, status): status is ok, no_end (a grid so far, cut off before its end marker) or
    unparsable (it can never be a grid); the grid is None unless ok."""
    grid = data.parse_output(text, fmt) if isinstance(text, str) else None
    if grid is not None:
        return grid, "ok"
    return None, "no_end" if isinstance(text, str) and data.could_be_answer(text, fmt) else "unparsable"


def completion_logprobs(model, tokenizer, prompt_ids, completion_ids, batch_size=8, prefixes=None):
    """Summed log-prob of each completion (token ids, EOS included) after its prompt (token ids, BOS included).
    Each distinct prompt is prefilled once (prompts of one length together, up to `batch_size` a pass); every
    completion then runs on top of its prompt's KV cache, longest first in right-padded batches of `batch_size`
    rows that mix the prompts of one length, the cache repeated per row, never recomputed: a test input's 8 views x
    6 candidates cost 8 prompt prefills, not 48. Only completion positions get logits, taken in float32 for
    log_softmax. `prefixes` (prompt tuple -> prompt_prefix's result for that one prompt) supplies caches built
    elsewhere (a dfs search), which are then not prefilled again."""
    import torch
    device, out = next(model.parameters()).device, [0.0] * len(prompt_ids)
    by_length = {}  # prompt length -> prompt -> indices of its completions
    for i, p in enumerate(prompt_ids):
        by_length.setdefault(len(p), {}).setdefault(tuple(p), []).append(i)
    pad = pad_id(tokenizer)  # right padding: a causal row never attends to what follows it
    with torch.inference_mode():
        for group in by_length.values():
            ready = {p: (prefixes or {})[p] for p in group if p in (prefixes or {})}
            todo = [p for p in group if p not in ready]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                kv, first = prompt_prefix(model, chunk)
                ready.update({p: ([(k[j:j + 1], v[j:j + 1]) for k, v in kv], first[j]) for j, p in enumerate(chunk)})
            rows = sorted(((i, p) for p, idx in group.items() for i in idx), key=lambda r: -len(completion_ids[r[0]]))
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                comps = [list(completion_ids[i]) for i, _ in batch]
                width = len(comps[0]) - 1  # the last token is predicted, never fed
                if width == 1:  # a pad after it: one token on a cache is a decoding step to Unsloth (dfs_step)
                    width = 2
                logits = None
                if width:
                    ids = torch.tensor([c[:-1] + [pad] * (width + 1 - len(c)) for c in comps], device=device)
                    logits = model(input_ids=ids, past_key_values=stacked_prefix([ready[p][0] for _, p in batch]),
                                   use_cache=True).logits
                for row, ((i, p), c) in enumerate(zip(batch, comps)):
                    total = ready[p][1][c[0]].item()
                    if len(c) > 1:
                        rest = logits[row, :len(c) - 1].float().log_softmax(-1)
                        total += rest.gather(-1, torch.tensor(c[1:], device=device)[:, None]).sum().item()
                    out[i] = total
    return out


def prompt_prefix(model, prompts):
    """(KV cache tensors [(keys, values)] per layer, log-probs of each prompt's first completion token) of prompts
    of one length, from one forward pass that keeps the last position's logits only."""
    import torch
    out = model(input_ids=torch.tensor([list(p) for p in prompts], device=next(model.parameters()).device),
                use_cache=True, **logits_kept(model, 1))
    return kv_tensors(out.past_key_values), out.logits[:, -1].float().log_softmax(-1)


def logits_kept(model, n):
    """logits_to_keep=n where the model's forward takes it (transformers >= 4.50, Unsloth), else nothing."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(logits_to_keep=n) if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def kv_tensors(cache, length=None):
    """[(keys, values)] per layer of a transformers Cache or of the tuple Unsloth's forward returns, the first
    `length` positions only (all by default)."""
    layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
    return [(k[..., :length, :], v[..., :length, :]) for k, v in layers]


def stacked_prefix(rows):
    """A fresh DynamicCache holding row r's prefix (kv_tensors of one prompt, all of one length) in batch row r: a
    copy per row, made once per batch; the prefix tensors themselves are never written to, so they serve the next
    batch."""
    import torch

    def stacked(tensors):  # one prompt: an expanded view, copied once by the layer's update
        same = all(t is tensors[0] for t in tensors)
        return tensors[0].expand(len(tensors), *tensors[0].shape[1:]) if same else torch.cat(tensors)
    return fresh_cache([[stacked([r[layer][i] for r in rows]) for i in (0, 1)] for layer in range(len(rows[0]))])


def forward_rates(model, prompt_ids, steps=4):
    """(seconds per prompt token, seconds per answer token) of `model`: one forward pass over `prompt_ids` (its
    prefill), then `steps` one-token passes on its cache, as a search or a sampler writes an answer."""
    import torch
    from transformers import DynamicCache
    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else lambda: None
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, cache = dfs_prefill(model, prompt_ids, [], DynamicCache())
        sync()
        t1 = time.perf_counter()
        for step in range(steps):
            logits, cache = dfs_step(model, [int(logits[-1].argmax())], cache, len(prompt_ids) + step)
        sync()
    return (t1 - t0) / len(prompt_ids), (time.perf_counter() - t1) / steps


SPECULATE = 4  # dfs_search's tokens run on where a branch leaves every draft, at first (docs/modes.md: measured)


def dfs(model, prompt_ids, eos_id, max_new_tokens, min_prob, allowed_ids=None, drafts=()):
    """Every completion of `prompt_ids` whose probability under the model is above `min_prob`, as
    [(completion ids without EOS, summed nll including EOS), ...] sorted by nll. See dfs_search."""
    return dfs_search(model, prompt_ids, eos_id, max_new_tokens, min_prob, allowed_ids, drafts)[0]


def draft_trie(drafts):
    """The root of a trie of the draft token paths; a node is [log-probs after its path (None until a forward pass
    gives them), {token: child node}, the index of the first draft through it]."""
    root = [None, {}, 0]
    for d, tokens in enumerate(drafts):
        node = root
        for token in tokens:
            node = node[1].setdefault(token, [None, {}, d])
    return root


def remember(trie, tokens, lps):
    """Write the log-probs of a forward pass into the draft trie: lps[j] follows the last len(lps) tokens' j-th, on
    the path `tokens` (a draft's prefix)."""
    node = trie
    for j, token in enumerate(tokens):
        node = node[1][token]
        if j >= len(tokens) - len(lps):
            node[0] = lps[j - len(tokens) + len(lps)]


def dfs_options(lp, nll, depth, node, ids, eos_id, limit, max_new_tokens):
    """dfs_search's next tokens worth trying after a branch of `depth` tokens and summed `nll`, as (nll, token), in
    the order to pop them: the tokens a draft goes on with last (popped first), then the most likely. `lp`: the
    log-probs of the tokens `ids` after the branch; `node`: the branch's node in the trie (a draft's or a speculated
    chain's)."""
    out = sorted(((c, t) for c, t in zip((nll - lp).tolist(), ids) if c < limit and
                  (t == eos_id or depth + 2 <= max_new_tokens)), reverse=True)  # room left for EOS
    if node[1]:
        out.sort(key=lambda o: o[1] in node[1])
    return out


def dfs_prefill(model, prompt_ids, first, cache, keep=None):
    """(the logits after the prompt + first[:d] for every d, the cache) from one forward pass on the empty `cache`;
    `keep` (a dict) receives the prompt's own prefix for scoring (see dfs_search)."""
    import torch
    out = model(input_ids=torch.tensor([list(prompt_ids) + first], device=next(model.parameters()).device),
                past_key_values=cache, use_cache=True, return_dict=True, **logits_kept(model, len(first) + 1))
    known = out.logits[0, out.logits.shape[1] - len(first) - 1:]  # known[d]: the logits after the prompt + first[:d]
    if keep is not None:  # the prompt's positions only: neither backend writes into these tensors later (dfs_step)
        keep[tuple(prompt_ids)] = (kv_tensors(out.past_key_values, len(prompt_ids)), known[0].float().log_softmax(-1))
    return known, out.past_key_values


def dfs_step(model, tokens, cache, length):
    """(the logits after each of `tokens`, the cache) from one forward pass of `tokens` from position `length`, on
    the first `length` positions of `cache`: a transformers Cache, cropped and grown in place by torch.cat, or the
    (keys, values) per layer that Unsloth's forward returns instead (it never writes into a Cache given to it),
    sliced. Unsloth takes one token on a cache as a decoding step: it needs the position, and it reads the
    positions before it from buffers of its own, copied from the cache at its first step after a longer pass
    (which drops them) and then written one position a step; a depth-first search only returns to a prefix of the
    branch written last, whose positions those buffers hold."""
    import torch
    if hasattr(cache, "crop"):
        excess = cache.get_seq_length() - length
        if excess > 0:
            cache.crop(-excess)  # a count to remove (transformers 5.18 drops the positive length form)
    else:
        cache = tuple(kv_tensors(cache, length))
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(tokens)], device=device), past_key_values=cache, use_cache=True,
                position_ids=torch.arange(length, length + len(tokens), device=device)[None], return_dict=True)
    return out.logits[0, -len(tokens):], out.past_key_values


def dfs_start(model, prompt_ids, eos_id, allowed_ids, drafts, keep):
    """dfs_search's start, under inference_mode: (log_probs(logits) -> the searched tokens' log-probs, the searched
    token ids, the draft trie holding the log-probs of one prefill of the prompt + the first draft, that draft: the
    branch the cache holds, the cache)."""
    import torch
    from transformers import DynamicCache
    device = next(model.parameters()).device
    ids = None if allowed_ids is None else torch.tensor(sorted({*allowed_ids, eos_id}), device=device)
    log_probs = lambda logits: logits.float().log_softmax(-1).double()[..., slice(None) if ids is None else ids]  # noqa: E731
    trie, held = draft_trie(drafts), drafts[0] if drafts else []
    known, cache = dfs_prefill(model, prompt_ids, held, DynamicCache(), keep)
    trie[0], known = log_probs(known[0]), log_probs(known[1:])
    remember(trie, held, known)
    return log_probs, list(range(known.shape[-1])) if ids is None else ids.tolist(), trie, held, cache


def chain(tokens, lps):
    """A trie node whose log-probs are lps[0], and below it the path `tokens`, the j-th node holding lps[j + 1]."""
    node = top = [lps[0], {}, None]
    for j, token in enumerate(tokens):
        node = node[1].setdefault(token, [lps[j + 1], {}, None])
    return top


def speculation(drafts, path, most):
    """Up to `most` tokens that may follow `path`: those at the same positions of the draft longer than `path`
    that agrees with it at the most positions (the first such draft on a tie), none if no draft agrees anywhere."""
    best, agree = None, 0
    for draft in drafts:
        if len(draft) > len(path):
            same = sum(a == b for a, b in zip(draft, path))
            if same > agree:
                best, agree = draft, same
    return [] if best is None or most <= 0 else list(best[len(path):len(path) + most])


def shared_length(a, b, most):
    """How many leading tokens `a` and `b` share, at most `most`."""
    n = 0
    while n < most and n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def dfs_search(model, prompt_ids, eos_id, max_new_tokens, min_prob, allowed_ids=None, drafts=(), deadline=None,
               keep=None, speculate=None):
    """(found, finished, forwards): dfs()'s completions, False when time.time() passed `deadline` first (what was
    found so far is kept), and the forward passes made after the prompt's. A branch grows while its summed negative
    log-likelihood stays below -log(min_prob); one reaching EOS (within max_new_tokens, EOS counted) is a
    completion, so at most 1/min_prob exist. One KV cache serves the whole search: a new branch crops it back to
    where it leaves the branch the cache holds (dfs_step), so memory is one branch's, not a beam's.
    `drafts`: token paths (without EOS) that may be answers, verified in one forward pass each instead of one per
    token: the first runs with the prompt; another runs whole, from where it leaves the cached branch, when the
    search first reaches a branch of it that no pass computed yet. Every position's log-probs are kept in a trie of
    the drafts, whose nodes the search then expands with no forward pass; it forwards only where it leaves every
    draft or a draft ends. Where it leaves them, a pass also runs up to `speculate` (default SPECULATE) tokens on,
    twice as many each time the search followed the last ones to their end: those at the same positions of the
    draft that agrees most with the branch (an ARC answer is often a draft with a few cells changed; after a
    changed cell the draft goes on as before), then followed as a draft is. A draft changes what a search costs,
    never what it finds. `allowed_ids` (EOS is always allowed) limits the tokens searched, e.g. to those the text
    format can write; their log-probs are NOT renormalised over the allowed tokens: every nll is the model's own,
    the one a teacher-forced pass (completion_logprobs) gives, so min_prob means the model's probability. `keep`, a
    dict, receives the prompt's prefix (prompt_prefix's form) under tuple(prompt_ids): scoring then starts from the
    search's own prefill instead of forwarding the prompt again."""
    import torch
    if deadline is not None and time.time() > deadline:  # not even the prefill
        return [], False, 0
    with torch.inference_mode():
        walk, cache = dfs_walk(model, prompt_ids, eos_id, max_new_tokens, min_prob, allowed_ids, drafts, deadline,
                               keep, speculate)
        try:
            tokens, length, _ = next(walk)
            while True:
                logits, cache = dfs_step(model, tokens, cache, length)
                tokens, length, _ = walk.send(logits)
        except StopIteration as stop:
            return stop.value


def dfs_walk(model, prompt_ids, eos_id, max_new_tokens, min_prob, allowed_ids, drafts, deadline, keep, speculate):
    """(dfs_search's search after its prefill, as a generator, the prefill's cache): the generator yields each
    forward pass it needs as (tokens, length, needed), the tokens to run from position `length` on the first
    `length` positions of the branch the pass before ran, is sent back the logits after each of them, or after
    the first `needed` at least (the rest are a draft's or speculated: a later pass runs them when the search
    gets there), and returns dfs_search's (found, finished, forwards). Whoever runs the passes owns the cache:
    dfs_search one search's, dfs_batch several in one batch."""
    drafts = [list(d)[:max(max_new_tokens - 1, 0)] for d in drafts]
    log_probs, searched, trie, held, cache = dfs_start(model, prompt_ids, eos_id, allowed_ids, drafts, keep)
    options = functools.partial(dfs_options, ids=searched, eos_id=eos_id, limit=-math.log(min_prob),
                                max_new_tokens=max_new_tokens)
    return dfs_walking(len(prompt_ids), eos_id, max_new_tokens, log_probs, options, trie, held, drafts, deadline,
                       SPECULATE if speculate is None else speculate), cache


def dfs_walking(n, eos_id, max_new_tokens, log_probs, options, trie, held, drafts, deadline, base):
    """dfs_walk's generator: the search of dfs_search's docstring over a prompt of `n` tokens whose prefill gave
    `trie` (dfs_start)."""
    found, path, forwards, run = [], [], 0, base
    stack = [(options(trie[0], 0.0, 0, trie), trie)]  # per depth: (tokens still to try, its trie node)
    while stack:
        if deadline is not None and time.time() > deadline:
            return sorted(found, key=lambda f: f[1]), False, forwards
        todo, node = stack[-1]
        if not todo:
            stack.pop()
            del path[-1:]  # the root's entry has no token
            continue
        nll, token = todo.pop()
        if token == eos_id:
            found.append((list(path), nll))
            continue
        path.append(token)
        child = node[1].get(token)
        if child is None or child[0] is None:  # one pass: a whole draft when on one, else the branch's new tokens
            if child is None:  # twice as far when the last speculation was followed to its end, as far as a draft
                run = 2 * run if len(path) == len(held) + 1 and path[:-1] == held else base
            goal = drafts[child[2]] if child is not None else \
                path + speculation(drafts, path, min(run, max_new_tokens - len(path) - 1))
            start = shared_length(held, goal, len(path) - 1)
            logits = yield goal[start:], n + start, len(path) - start  # the logits of all, or of the first needed
            goal = goal[:start + len(logits)]
            forwards, held, lps = forwards + 1, list(goal), log_probs(logits)
            if child is not None:
                remember(trie, goal, lps)
            else:  # the branch's node and the speculated tokens after it, as a draft's nodes
                child = chain(goal[len(path):], lps[len(path) - start - 1:])
        stack.append((options(child[0], nll, len(path), child), child))
    return sorted(found, key=lambda f: f[1]), True, forwards


def dfs_batch(model, searches, eos_id, min_prob, allowed_ids=None, deadline=None, keep=None, speculate=None):
    """dfs_search of several prompts, [(prompt ids, max_new_tokens, drafts)], at once: each prefilled alone, then
    one forward pass a round serves every search still running, its tokens a row of one batch (Slots): a search
    costs the round's one weight read, not its own. Per search, dfs_search's (found, finished, forwards): the same
    completions at the same nll (to float rounding), forwards the passes it asked for (a few more than alone where
    a round ran a draft's or speculated tokens only part of the way: see Slots.step). Through transformers' forward
    only: it reads a 4-D attention mask, which Unsloth's does not."""
    import torch
    if deadline is not None and time.time() > deadline:
        return [([], False, 0) for _ in searches]
    out, asked = [None] * len(searches), {}

    def advance(s, logits=None):
        try:
            asked[s] = next(walks[s]) if logits is None else walks[s].send(logits)
        except StopIteration as stop:
            out[s] = stop.value
            asked.pop(s, None)
    with torch.inference_mode():
        walks, caches = map(list, zip(*(dfs_walk(model, ids, eos_id, max_new, min_prob, allowed_ids, drafts, deadline,
                                                 keep, speculate) for ids, max_new, drafts in searches)))
        slots = Slots(caches, next(model.parameters()).device)
        del caches  # Slots holds them copied into one batch: the prefills' own are freed
        for s in range(len(walks)):
            advance(s)
        while asked:
            for s, logits in slots.step(model, asked).items():
                advance(s, logits)
    return out


class Slots:
    """The KV caches of several searches in one batch, a row each. A search's branch is the list of slots its row
    holds it in, in order; a pass writes each row's new tokens into slots at the end, new to every row, and a
    4-D attention mask lets each new token see only its own row's listed slots and its own tokens before it, at
    its own positions (position_ids): a search that crops its branch lists fewer slots, and the others never see
    a slot of its. Rows of searches that ended, and slots no branch lists, are dropped when they are half the
    cache (one copy)."""

    def __init__(self, caches, device):
        import torch
        layers = [kv_tensors(c) for c in caches]
        self.device, self.rows = device, list(range(len(caches)))  # rows[i]: the search in batch row i
        self.slots = {s: list(range(t[0][0].shape[-2])) for s, t in enumerate(layers)}
        width = max(map(len, self.slots.values()))
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[-2]))  # noqa: E731
        self.cache = fresh_cache([[torch.cat([pad(t[layer][i]) for t in layers]) for i in (0, 1)]
                                  for layer in range(len(layers[0]))])

    def step(self, model, asked):
        """{search: the logits after each of its tokens run} of one forward pass of every search in `asked`,
        {search: (tokens, length, needed)} as dfs_walk yields them: each runs its first `most` tokens (all when
        fewer), `most` the longest run that fills at least half the batch's cells with tokens, or the most any
        search needs: the rest would be padding in the other rows, costing as many tokens as they fill."""
        import torch
        for s, (_, length, _) in asked.items():
            self.slots[s] = self.slots[s][:length]
        self.compact(asked)
        lengths = sorted(len(tokens) for tokens, _, _ in asked.values())
        most = max([needed for _, _, needed in asked.values()] +
                   [k for k in lengths if 2 * sum(min(n, k) for n in lengths) >= len(lengths) * k])
        asked = {s: (tokens[:most], length, needed) for s, (tokens, length, needed) in asked.items()}
        width = self.cache.get_seq_length()
        ids = torch.zeros(len(self.rows), most, dtype=torch.long)
        positions = torch.zeros(len(self.rows), most, dtype=torch.long)
        mask = torch.zeros(len(self.rows), 1, most, width + most, dtype=torch.bool)
        mask[:, 0, :, width:] = torch.ones(most, most, dtype=torch.bool).tril()
        for row, s in enumerate(self.rows):
            tokens, length, _ = asked[s]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            positions[row] = torch.arange(length, length + most)
            mask[row, 0, :, self.slots[s]] = True
        out = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device), past_key_values=self.cache, use_cache=True,
                    return_dict=True)
        got = {}
        for row, s in enumerate(self.rows):
            n = len(asked[s][0])
            self.slots[s] += range(width, width + n)
            got[s] = out.logits[row, :n]
        return got

    def compact(self, asked):
        """Drop the rows of searches not in `asked` (ended), and the slots no branch lists once they are half the
        cache."""
        import torch
        rows = [row for row, s in enumerate(self.rows) if s in asked]
        width = max(len(self.slots[self.rows[row]]) for row in rows)
        if len(rows) == len(self.rows) and 2 * len(rows) * width > len(self.rows) * self.cache.get_seq_length():
            return
        index = torch.tensor([(self.slots[self.rows[r]] + [0] * width)[:width] for r in rows], device=self.device)
        pick = lambda x: x[rows].gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))  # noqa
        self.cache = fresh_cache([[pick(x) for x in kv] for kv in kv_tensors(self.cache)])
        self.rows = [self.rows[r] for r in rows]
        for s in self.rows:
            self.slots[s] = list(range(len(self.slots[s])))


def fresh_cache(layers):
    """A transformers DynamicCache holding [(keys, values)] per layer."""
    from transformers import DynamicCache
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer)
    return cache
