"""Stage 5b: the new expert against its base model on the domain's validation split.

`seeds/<domain>/validation.jsonl` has the format of `eval.jsonl` but is never read by `selfspec
eval`, so routing decisions taken on it do not tune the reported numbers. It runs right after
training, in the training process, on the PEFT model already in memory: the base model is the
same model under `disable_adapter()`, so the measurement loads nothing.

Items are scored by likelihood only (no generation), with the prompts of core/eval_formats.py:

    multiple_choice  cloze: each option's summed log-likelihood as the reply to the question
                     (options not listed); the highest per character wins (acc_norm, the
                     eval's headline for this type)
    yes_no           the question + "Answer yes or no."; the reply "Yes"/"yes" against
                     "No"/"no" (log-sum-exp of each pair); a stable stand-in for the eval's
                     greedy first word
    classification   the labels scored as cloze options after the eval's prompt

Short answers need generation and are left out. The per-item 0/1 scores of expert and base give
the paired bootstrap of core/stats.py: diff, its 95% interval, P(not better).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

# evaluation's own prompts, scoring rules and bootstrap (core/), so this gain and `selfspec eval`
# agree on what an item is worth.
from core.eval_formats import score_multiple_choice, user_text
from core.seeds import Domain, EvalItem, load_jsonl
from core.stats import paired_diff
from specialize.config import GainConfig

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.jsonl"
METRIC = "validation_score"
SCORED = ("multiple_choice", "yes_no", "classification")
YES, NO = ("Yes", "yes"), ("No", "no")


def load_validation(domain: Domain, cfg: GainConfig) -> list[EvalItem]:
    """The domain's scorable validation items (a bad file fails here, before any model loads);
    [] when the domain has no validation split. max_items takes them round-robin over types."""
    path = domain.root / VALIDATION_FILE
    if not cfg.enabled or not path.is_file():
        return []
    items = [it for it in load_jsonl(path, EvalItem) if it.type in SCORED]
    if cfg.max_items is None or cfg.max_items >= len(items):
        return items
    by_type: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        by_type[it.type].append(it)
    picked: list[EvalItem] = []
    while len(picked) < cfg.max_items:
        for queue in by_type.values():
            if queue and len(picked) < cfg.max_items:
                picked.append(queue.pop(0))
    return picked


def measure_gain(model, tokenizer, items: list[EvalItem], cfg: GainConfig,
                 seed: int = 0) -> dict | None:
    """{metric, expert, base, diff, ci, p_not_better, n} (registry.GainInfo's fields) for a
    PEFT model, or None without items."""
    if not items:
        return None
    was_training = model.training
    model.eval()  # no LoRA dropout
    try:
        expert = score_items(model, tokenizer, items)
        with model.disable_adapter():
            base = score_items(model, tokenizer, items)
    finally:
        model.train(was_training)
    d = paired_diff(expert, base, cfg.resamples, seed)
    return {"metric": METRIC,
            "expert": round(sum(expert) / len(expert), 4),
            "base": round(sum(base) / len(base), 4),
            "diff": d["diff"], "ci": d["ci"], "p_not_better": d["p_not_better"],
            "n": len(items)}


def score_items(model, tokenizer, items: list[EvalItem]) -> list[float]:
    """Each item's 0/1 score under `model` as it is (adapter on or off)."""
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    spans = []  # per item: (first pair, number of pairs)
    for it in items:
        ctx = chat_ids(tokenizer, user_text(it))
        conts = _continuations(it)
        spans.append((len(pairs), len(conts)))
        pairs += [(ctx, tuple(tokenizer.encode(c, add_special_tokens=False))) for c in conts]
    ll = continuation_logliks(model, pairs)
    scores = []
    for it, (at, n) in zip(items, spans):
        got = ll[at:at + n]
        if it.type == "yes_no":
            yes, no = _logsumexp(got[:len(YES)]), _logsumexp(got[len(YES):])
            scores.append(float(("yes" if yes > no else "no") == it.answer.lower()))
        elif it.type == "multiple_choice":
            scores.append(score_multiple_choice(it, got).score)
        else:  # classification: the labels as cloze options, normalized by length
            labels = it.labels or []
            best = max(range(len(labels)), key=lambda i: got[i] / max(1, len(labels[i])))
            scores.append(float(labels[best] == it.answer))
    return scores


def _continuations(item: EvalItem) -> list[str]:
    if item.type == "yes_no":
        return [*YES, *NO]
    if item.type == "multiple_choice":
        return list(item.options or [])
    return list(item.labels or [])


def chat_ids(tokenizer, user: str) -> tuple[int, ...]:
    """The user turn in the chat template, tokenized as training and the eval tokenize it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return tuple(tokenizer.encode(text, add_special_tokens=False))


# Items whose contexts go through the model together. Few large calls beat many small ones on a
# busy CPU, where each call pays a fixed cost per layer; 8 contexts of ~50 tokens stay small.
ITEMS_PER_CALL = 8


def continuation_logliks(model, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]
                         ) -> list[float]:
    """Summed log-probability of each continuation after its context. Consecutive pairs with the
    same context (an item's options) share one pass over it: the contexts of several items run
    in one left-padded call, and their KV cache then serves every longer continuation in a
    second call; a one-token continuation ("Yes") is read from the first. About 4x fewer tokens
    than scoring each (context + option) sequence whole."""
    import torch

    groups: list[tuple[tuple[int, ...], list[int]]] = []  # (context, indices into pairs)
    for i, (ctx, _) in enumerate(pairs):
        if groups and groups[-1][0] == ctx:
            groups[-1][1].append(i)
        else:
            groups.append((ctx, [i]))
    out = [0.0] * len(pairs)
    with torch.no_grad():
        for at in range(0, len(groups), ITEMS_PER_CALL):
            _score_groups(model, groups[at:at + ITEMS_PER_CALL], pairs, out)
    return out


def _score_groups(model, groups, pairs, out: list[float]) -> None:
    import torch

    device = next(model.parameters()).device
    lens = [len(ctx) for ctx, _ in groups]
    n = max(lens)
    # Left padding puts every context's last token in the last column; positions are passed so
    # that padding does not shift them.
    ids = torch.tensor([[0] * (n - k) + list(ctx) for (ctx, _), k in zip(groups, lens)],
                       device=device)
    mask = torch.tensor([[0] * (n - k) + [1] * k for k in lens], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # each continuation's 1st token
    rows = []  # (group, pair index) of continuations longer than one token
    for g, (_, members) in enumerate(groups):
        for i in members:
            cont = pairs[i][1]
            out[i] = float(first[g, cont[0]]) if cont else 0.0
            if len(cont) > 1:
                rows.append((g, i))
    if not rows:
        return
    # The rest of each longer continuation, right after its own context's cached keys: one
    # right-padded row per continuation (padding after a row's tokens cannot reach them).
    rest = [pairs[i][1][:-1] for _, i in rows]
    m = max(map(len, rest))
    cache = res.past_key_values
    cache.batch_select_indices(torch.tensor([g for g, _ in rows], device=device))
    ids = torch.tensor([list(r) + [0] * (m - len(r)) for r in rest], device=device)
    rmask = torch.tensor([[1] * len(r) + [0] * (m - len(r)) for r in rest], device=device)
    attn = torch.cat([mask[[g for g, _ in rows]], rmask], dim=-1)
    pos = torch.tensor([[lens[g] + j for j in range(m)] for g, _ in rows], device=device)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                   use_cache=True).logits
    for row, (_, i) in enumerate(rows):
        cont = pairs[i][1]
        logp = torch.log_softmax(logits[row, :len(cont) - 1].float(), dim=-1)
        out[i] += float(logp[torch.arange(len(cont) - 1, device=device),
                             torch.tensor(cont[1:], device=device)].sum())


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))

