"""Stage 4: response filtering. Drops empty answers, degenerate repetition loops (a small model's
typical failure under greedy decoding), answers cut off by the token limit, when
`max_echo_share` is set, answers that mostly restate their own task and, when stage 3 sampled
votes (`respond.self_consistency`), closed-form answers that the samples' majority does not back
("inconsistent") or that give no label ("no_label"); writes the final training set `train.jsonl`
and every rejected response with its reason."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from core.jsonl import read_jsonl, write_json, write_jsonl
from core.rouge import tokenize
from specialize.config import ResponseFilterConfig
from specialize.consistency import consistency_verdict

# Function words carry no answer: "The bond is a loan" and "What is a bond?" share "is" and "a"
# without the answer echoing anything. yes/no are the verdict of a closed-form answer, not an echo.
_FUNCTION_WORDS = """
a an the and or but nor so if then than that this these those there here of to in on at by for
with from into onto about as is are was were be been being am do does did done have has had
having it its he she they them their his her we our you your i me my not no yes can could
will would shall should may might must what which who whom whose when where why how also just
very more most such each any all some other both only own same too"""
STOPWORDS = frozenset(_FUNCTION_WORDS.split())


def content_words(text: str) -> list[str]:
    """The words an echo is counted on: rouge tokens less function words, single characters
    (option letters, variable names) and numbers. Numbers are left out both ways: a worked
    solution restates the given numbers and a result may equal one of them ("Answer: 13" for
    "What is 26 / 2 if x = 13?"), so neither makes an answer an echo or saves one from it."""
    return [t for t in tokenize(text) if len(t) > 1 and not t.isdigit() and t not in STOPWORDS]


def echo_share(response: str, instruction: str, task_input: str = "") -> tuple[float, int]:
    """The share of the answer's content words (counted with repeats) that occur in its own
    instruction or input, and how many content words the answer has."""
    words = content_words(response)
    if not words:
        return 0.0, 0
    task = set(content_words(instruction)) | set(content_words(task_input))
    return sum(w in task for w in words) / len(words), len(words)


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
    if cfg.max_echo_share is not None:
        share, n = echo_share(text, row.get("instruction", ""), row.get("input", ""))
        # Short answers are exempt: closed-form answers are short and may only repeat the task.
        if n >= cfg.echo_min_words and share >= cfg.max_echo_share:
            return "echo", f"{share:.0%} of {n} content words from the task"
    if row.get("consistency"):  # only closed-form tasks, only when stage 3 sampled votes
        return consistency_verdict(text, row["consistency"])
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
    if voted := sum(1 for r in rows if r.get("consistency")):
        summary["closed_form_voted"] = voted  # the answers the self-consistency vote judged
    write_json(out / "config.json", {"filter": cfg.model_dump(mode="json"), "result": summary})
    return summary
