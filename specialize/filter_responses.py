"""Stage 4: response filtering. Drops empty answers, degenerate repetition loops (a small model's
typical failure under greedy decoding) and answers cut off by the token limit; writes the
final training set `train.jsonl` and every rejected response with its reason."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from core.jsonl import read_jsonl, write_json, write_jsonl
from core.rouge import tokenize
from specialize.config import ResponseFilterConfig


def response_verdict(row: dict, cfg: ResponseFilterConfig) -> tuple[str | None, str]:
    text = row.get("response", "")
    if len(text.strip()) < cfg.min_chars:
        return "empty", ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        line, n = Counter(lines).most_common(1)[0]
        if n >= cfg.max_line_repeats:
            return "repetition", f"line repeated {n}x: {line[:60]}"
    tokens = tokenize(text)
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    if len(grams) >= 20:
        ratio = len(set(grams)) / len(grams)
        if ratio < cfg.min_distinct_ngram_ratio:
            return "repetition", f"distinct 4-gram ratio {ratio:.2f}"
    # After the loop checks: a loop that ran into the limit is reported as the loop it is.
    if cfg.drop_truncated and row.get("finish_reason") == "length":
        return "truncated", "hit max_tokens"
    return None, ""


def filter_responses(cfg: ResponseFilterConfig, workdir: Path, stage: str = "respond") -> dict:
    rows = read_jsonl(workdir / stage / "responses.jsonl")
    kept, rejected = [], []
    for row in rows:
        reason, detail = response_verdict(row, cfg)
        if reason is None:
            kept.append({"id": row["id"], "instruction": row["instruction"],
                         "input": row.get("input", ""), "output": row["response"]})
        else:
            rejected.append({**row, "reason": reason, "detail": detail})
    out = workdir / f"{stage}_filter"
    write_jsonl(out / "train.jsonl", kept)
    write_jsonl(out / "rejected.jsonl", rejected)
    counts = dict(Counter(r["reason"] for r in rejected))
    summary = {"responses": len(rows), "kept": len(kept), "rejected": counts}
    write_json(out / "config.json", {"filter": cfg.model_dump(mode="json"), "result": summary})
    return summary
