"""Stage 2: instruction filtering.

Drops, in this order: empty or placeholder inputs, too short / too long, tasks a text model cannot
do (blacklist), eval-set contamination (shared word n-gram with a held-out item), fragments and
statements that are no task, near duplicates (ROUGE-L F1 > 0.7 against the seeds and every
instruction kept before it), inputs unrelated to their instruction, off-domain tasks, and tasks
the base model itself finds improbable (the last three from `quality.py`, each switchable in
`FilterConfig`). Every rejected item is written with its reason. The same `InstructionFilter` decides, batch by batch,
when stage 1 has generated enough; this stage re-runs it over all candidates to write the files.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.jsonl import read_jsonl, write_json, write_jsonl
from core.rouge import RougeIndex, tokenize
from core.seeds import Domain
from specialize.config import FilterConfig
from specialize.prompts import Task
from specialize.quality import (
    TASK_VERBS,
    DomainReference,
    build_reference,
    input_similarity,
    instruction_perplexities,
    load_default_encoder,
    seed_verbs,
    task_text,
    wellformed_verdict,
)

log = logging.getLogger(__name__)

# Template residue a model writes instead of a real input.
_PLACEHOLDER = re.compile(r"<[^>]{0,30}>|\[(insert|your|add|enter)[^\]]*\]|\{[a-z_ ]+\}", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: kept
    detail: str = ""


class InstructionFilter:
    """`reference` (relevance and the input check) and `judge` (texts -> the base model's mean
    token NLL) are optional so that rule-only filters need no model; `build_filter` passes what
    the config turns on."""

    def __init__(self, cfg: FilterConfig, seeds: list[Task], eval_texts: list[str],
                 reference: DomainReference | None = None, judge=None,
                 verbs: frozenset[str] = TASK_VERBS):
        self.cfg = cfg
        self.reference, self.judge, self.verbs = reference, judge, verbs
        self.seed_texts = [task_text(s.instruction, s.input) for s in seeds]
        self.nll: dict[str, float] = {}
        self.max_nll: float | None = None
        self.pool = RougeIndex([s.instruction for s in seeds])
        self.pool_texts = [f"seed: {s.instruction}" for s in seeds]
        self.eval_ngrams = {g for t in eval_texts for g in _ngrams(tokenize(t),
                                                                 cfg.contamination_ngram)}
        self.blacklist = [(w, re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE)) for w in cfg.blacklist]
        self.kept = 0

    def check(self, task: Task) -> Verdict:
        """Judge one candidate; a kept one joins the pool that later candidates are compared to."""
        verdict = self._rules(task)
        if verdict.reason:
            return verdict
        score, idx = self.pool.max_score(task.instruction, self.cfg.rouge_threshold)
        if score > self.cfg.rouge_threshold:
            return Verdict("near_duplicate", f"rougeL={score:.2f} vs {self.pool_texts[idx]}")
        verdict = self._judge_meaning(task)
        if verdict.reason:
            return verdict
        self.pool.add(task.instruction)
        self.pool_texts.append(f"generated: {task.instruction}")
        self.kept += 1
        return Verdict(None)

    def _rules(self, task: Task) -> Verdict:
        """The checks that need neither the pool nor a model."""
        words = len(task.instruction.split())
        if not task.instruction.strip():
            return Verdict("empty")
        if _PLACEHOLDER.search(task.instruction) or _PLACEHOLDER.search(task.input):
            return Verdict("placeholder", _PLACEHOLDER.search(task.instruction + task.input)[0])
        if words < self.cfg.min_words:
            return Verdict("too_short", f"{words} words")
        if words > self.cfg.max_words:
            return Verdict("too_long", f"{words} words")
        for word, pattern in self.blacklist:
            if pattern.search(task.instruction):
                return Verdict("not_text_task", word)
        text_ngrams = set(_ngrams(tokenize(f"{task.instruction} {task.input}"),
                                  self.cfg.contamination_ngram))
        shared = text_ngrams & self.eval_ngrams
        if shared:
            return Verdict("eval_contamination", " ".join(next(iter(shared))))
        if self.cfg.wellformed:
            v = wellformed_verdict(task.instruction, self.verbs)
            if v.reason:
                return Verdict(v.reason, v.detail)
        return Verdict(None)


    def _judge_meaning(self, task: Task) -> Verdict:
        """The model-based checks, cheapest first: encoder (input fit, relevance), then the base
        model's perplexity."""
        text = task_text(task.instruction, task.input)
        if self.reference is not None:
            if self.cfg.wellformed and task.input.strip():
                sim = input_similarity(self.reference.encoder, task.instruction, task.input)
                if sim < self.cfg.min_input_similarity:
                    return Verdict("input_unrelated", f"cosine {sim:.2f} to the instruction")
            if self.cfg.relevance:
                v = self.reference.verdicts([text], self.cfg.relevance_margin)[0]
                if v.reason:
                    return Verdict(v.reason, v.detail)
        if self.judge is not None:
            self._score([task])
            nll = self.nll[text]
            if nll > self.max_nll:
                ratio = math.exp(nll - self.max_nll) * self.cfg.max_perplexity_ratio
                return Verdict("improbable", f"perplexity {math.exp(nll):.0f} = {ratio:.1f} x "
                                             "the seeds' median")
        return Verdict(None)

    def warm(self, tasks: list[Task]) -> None:
        """Stage 1, per generated batch: embed the candidates that pass the rule checks in one
        encoder call, and score them in one engine batch, for `check` to find ready. On 2 CPU
        cores the router's encoder takes ~12x longer per text one at a time than in a batch of
        100, and one prompt-logprobs request per candidate would be one engine call each: at the
        paper's 5,000 kept (15,000+ candidates) the difference between minutes and hours."""
        todo = [t for t in tasks if self._rules(t).reason is None]
        self._embed(todo)
        self._score(todo)

    def prefetch(self, tasks: list[Task]) -> None:
        """Stage 2: embed and score all its candidates in one batch each (every candidate gets
        its perplexity in the output files, rejected or not)."""
        self._embed(tasks)
        self._score(tasks)

    def _embed(self, tasks: list[Task]) -> None:
        """For a remembering encoder (the default MemoEncoder), which then serves the checks."""
        encoder = None if self.reference is None else self.reference.encoder
        if encoder is None or not hasattr(encoder, "memo"):
            return
        texts = []
        for t in tasks:
            texts.append(task_text(t.instruction, t.input))
            if self.cfg.wellformed and t.input.strip():  # input_similarity embeds both halves
                texts += [t.instruction, t.input]
        todo = [t for t in dict.fromkeys(texts) if t not in encoder.memo]
        if todo:
            encoder.encode(todo)

    def _score(self, tasks: list[Task]) -> None:
        """The base model's mean token NLL of each task not scored yet, in one engine batch; the
        seeds' median, which the threshold is relative to, is scored on first use."""
        if self.judge is None:
            return
        if self.max_nll is None:
            seeds = self.judge(self.seed_texts)
            self.max_nll = statistics.median(seeds) + math.log(self.cfg.max_perplexity_ratio)
        todo = list(dict.fromkeys(t for t in (task_text(x.instruction, x.input) for x in tasks)
                                  if t not in self.nll))
        if todo:
            self.nll.update(zip(todo, self.judge(todo)))


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def build_filter(domain: Domain, cfg: FilterConfig, generator=None,
                 encoder=None) -> InstructionFilter:
    """The filter the config asks for. `generator`: the run's engine, needed by the perplexity
    check; `encoder`: defaults to the router's embedded one, loaded once per process."""
    seeds = [Task(s.instruction, s.input) for s in domain.seeds]
    eval_texts = [f"{e.question} {e.input}" for e in domain.eval_items]
    reference = None
    if cfg.relevance or cfg.wellformed:
        reference = build_reference(domain, encoder or load_default_encoder(),
                                    cfg.relevance_top_k)
    judge = None
    if cfg.max_perplexity_ratio is not None:
        if generator is None:
            raise ConfigError("the perplexity filter needs the base model's engine: pass the "
                              "run's generator, or set filter.max_perplexity_ratio to None")
        if hasattr(generator, "complete_tokens"):
            def judge(texts):
                return instruction_perplexities(generator, texts)
        else:  # an engine without prompt logprobs (a test's fake): say so, do not fail the run
            log.warning("%s: perplexity filter off, the engine returns no prompt logprobs",
                        domain.name)
    return InstructionFilter(cfg, seeds, eval_texts, reference, judge, seed_verbs(domain))


def filter_instructions(domain: Domain, cfg: FilterConfig, target: int, workdir: Path,
                        generator=None, encoder=None) -> dict:
    """Read stage 1's candidates, write kept.jsonl / rejected.jsonl; return counts by reason."""
    candidates = [r for r in read_jsonl(workdir / "generate" / "instructions.jsonl")
                  if not r.get("marker")]
    filt = build_filter(domain, cfg, generator, encoder)
    filt.prefetch([Task(r["instruction"], r.get("input", "")) for r in candidates])
    kept, rejected = [], []
    for row in candidates:
        if len(kept) >= target:
            rejected.append({**row, "reason": "surplus", "detail": f"target {target} reached"})
            continue
        verdict = filt.check(Task(row["instruction"], row.get("input", "")))
        nll = filt.nll.get(task_text(row["instruction"], row.get("input", "")))
        if nll is not None:  # the base model's mean token NLL, kept for the data's readers
            row = {**row, "nll": round(nll, 3)}
        if verdict.reason is None:
            kept.append(row)
        else:
            rejected.append({**row, "reason": verdict.reason, "detail": verdict.detail})
    out = workdir / "filter"
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "rejected.jsonl", rejected)
    counts: dict[str, int] = {}
    for r in rejected:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    summary = {"candidates": len(candidates), "kept": len(kept), "rejected": counts}
    perplexity = None if filt.max_nll is None else {
        "max_nll": round(filt.max_nll, 3),
        "seeds_median_nll": round(filt.max_nll - math.log(cfg.max_perplexity_ratio), 3)}
    write_json(out / "config.json", {"filter": cfg.model_dump(mode="json"), "target": target,
                                     "perplexity": perplexity, "result": summary})
    return summary
