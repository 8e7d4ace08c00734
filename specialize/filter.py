"""Stage 2: instruction filtering.

Drops, in this order: empty or placeholder inputs, too short / too long, tasks a text model cannot
do (blacklist), eval-set contamination (shared word n-gram with a held-out item), and near
duplicates (ROUGE-L F1 > 0.7 against the seeds and every instruction kept before it). Every
rejected item is written with its reason. The same `InstructionFilter` decides, batch by batch,
when stage 1 has generated enough; this stage re-runs it over all candidates to write the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from specialize.config import FilterConfig
from specialize.jsonl import read_jsonl, write_json, write_jsonl
from specialize.prompts import Task
from specialize.rouge import RougeIndex, tokenize
from specialize.seeds import Domain

# Template residue a model writes instead of a real input.
_PLACEHOLDER = re.compile(r"<[^>]{0,30}>|\[(insert|your|add|enter)[^\]]*\]|\{[a-z_ ]+\}", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: kept
    detail: str = ""


class InstructionFilter:
    def __init__(self, cfg: FilterConfig, seeds: list[Task], eval_texts: list[str]):
        self.cfg = cfg
        self.pool = RougeIndex([s.instruction for s in seeds])
        self.pool_texts = [f"seed: {s.instruction}" for s in seeds]
        self.eval_ngrams = {g for t in eval_texts for g in _ngrams(tokenize(t),
                                                                 cfg.contamination_ngram)}
        self.blacklist = [(w, re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE)) for w in cfg.blacklist]
        self.kept = 0

    def check(self, task: Task) -> Verdict:
        """Judge one candidate; a kept one joins the pool that later candidates are compared to."""
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
        score, idx = self.pool.max_score(task.instruction, self.cfg.rouge_threshold)
        if score > self.cfg.rouge_threshold:
            return Verdict("near_duplicate", f"rougeL={score:.2f} vs {self.pool_texts[idx]}")
        self.pool.add(task.instruction)
        self.pool_texts.append(f"generated: {task.instruction}")
        self.kept += 1
        return Verdict(None)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def build_filter(domain: Domain, cfg: FilterConfig) -> InstructionFilter:
    seeds = [Task(s.instruction, s.input) for s in domain.seeds]
    eval_texts = [f"{e.question} {e.input}" for e in domain.eval_items]
    return InstructionFilter(cfg, seeds, eval_texts)


def filter_instructions(domain: Domain, cfg: FilterConfig, target: int, workdir: Path) -> dict:
    """Read stage 1's candidates, write kept.jsonl / rejected.jsonl; return counts by reason."""
    candidates = [r for r in read_jsonl(workdir / "generate" / "instructions.jsonl")
                  if not r.get("marker")]
    filt = build_filter(domain, cfg)
    kept, rejected = [], []
    for row in candidates:
        if len(kept) >= target:
            rejected.append({**row, "reason": "surplus", "detail": f"target {target} reached"})
            continue
        verdict = filt.check(Task(row["instruction"], row.get("input", "")))
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
    write_json(out / "config.json", {"filter": cfg.model_dump(mode="json"), "target": target,
                                     "result": summary})
    return summary
