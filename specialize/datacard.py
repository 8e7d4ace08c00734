"""A data card per expert: what the base model wrote, what the filters kept and why they dropped
the rest, whether the kept data is about the domain, and examples a person can read.

Built from a work dir's files alone (any stage may be the last one run: `--stop-after` writes the
card into the work dir for a preview, publish writes it beside the adapter), as `data_card.json`
and the readable `data_card.md` (`format_data_card`), which `selfspec experts show` prints.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from core.jsonl import read_jsonl, write_json
from core.seeds import Domain
from specialize.config import ResponseFilterConfig
from specialize.filter_responses import echo_share
from specialize.quality import build_reference, seed_verbs, task_text, wellformed_verdict

CARD_JSON, CARD_MD = "data_card.json", "data_card.md"
EXAMPLES = 10
# The card's echo rate counts answers with at least this share of their content words taken from
# their own task: fixed here, not the run's filter setting, so cards of runs with the echo filter
# off and on are comparable (docs/quality.md measured 0.8).
ECHO_SHARE = 0.8


def _rows(path: Path) -> list[dict] | None:
    return read_jsonl(path) if path.exists() else None


def _reasons(rows: list[dict]) -> dict[str, int]:
    return dict(Counter(r.get("reason", "?") for r in rows).most_common())


def build_data_card(domain: Domain, workdir: Path, encoder=None, seed: int = 0,
                    stopped_after: str | None = None) -> dict:
    """Counts per stage and per rejection reason, the on-domain and fragment rates of the kept
    instructions, and `EXAMPLES` random kept examples (with their answers once there are any)."""
    stages: dict[str, dict] = {}
    generated = _rows(workdir / "generate" / "instructions.jsonl")
    if generated is not None:
        stages["generate"] = {"candidates": sum(1 for r in generated if not r.get("marker"))}
    kept = _rows(workdir / "filter" / "kept.jsonl")
    if kept is not None:
        rejected = _rows(workdir / "filter" / "rejected.jsonl") or []
        stages["filter"] = {"kept": len(kept), "rejected": _reasons(rejected)}
    for stage, folder in (("respond", "respond"), ("respond_round2", "respond2")):
        answered = _rows(workdir / folder / "responses.jsonl")
        if answered is not None:
            stages[stage] = {"answered": len(answered)}
    for stage, folder in (("filter_responses", "respond_filter"),
                          ("filter_responses_round2", "respond2_filter")):
        train = _rows(workdir / folder / "train.jsonl")
        if train is not None:
            rejected = _rows(workdir / folder / "rejected.jsonl") or []
            stages[stage] = {"kept": len(train), "rejected": _reasons(rejected)}

    card: dict = {"domain": domain.name, "stopped_after": stopped_after, "stages": stages,
                  "on_domain_rate": None, "fragment_rate": None, "echo_rate": None,
                  "examples": []}
    if not kept:
        return card
    texts = [task_text(r["instruction"], r.get("input", "")) for r in kept]
    verbs = seed_verbs(domain)
    fragments = sum(1 for r in kept if wellformed_verdict(r["instruction"], verbs).reason)
    card["fragment_rate"] = round(fragments / len(kept), 4)
    if encoder is not None:
        ref = build_reference(domain, encoder)
        nearest = ref.nearest(texts)
        card["on_domain_rate"] = round(sum(o > r for _, o, _, r in nearest) / len(kept), 4)
        card["off_domain_nearest"] = dict(Counter(
            rival for _, o, rival, r in nearest if r >= o).most_common())

    # Examples come from the final training data when there is one (instruction + answer).
    final = next((_rows(workdir / f / "train.jsonl") for f in ("respond2_filter", "respond_filter")
                  if (workdir / f / "train.jsonl").exists()), None)
    if final:
        min_words = ResponseFilterConfig().echo_min_words
        shares = [echo_share(r["output"], r["instruction"], r.get("input", "")) for r in final]
        echoes = sum(n >= min_words and share >= ECHO_SHARE for share, n in shares)
        card["echo_rate"] = round(echoes / len(final), 4)
    pool = final if final else kept
    rng = random.Random(f"{seed}:{domain.name}:card")
    picked = rng.sample(pool, min(EXAMPLES, len(pool)))
    card["examples"] = [{"instruction": r["instruction"], "input": r.get("input", ""),
                         "output": r.get("output")} for r in picked]
    return card


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_data_card(card: dict) -> str:
    """The card as Markdown, for people (and `selfspec experts show`)."""
    lines = [f"# Data card: {card['domain']}", ""]
    if card.get("stopped_after"):
        lines += [f"Preview: the run stopped after the `{card['stopped_after']}` stage "
                  "(continue it with `--resume`).", ""]
    lines += [f"- on-domain rate of the kept instructions (nearest domain by the router's "
              f"encoder): {_pct(card.get('on_domain_rate'))}",
              f"- fragment rate of the kept instructions: {_pct(card.get('fragment_rate'))}"]
    if card.get("echo_rate") is not None:
        lines.append(f"- echo rate of the training answers (≥ {ECHO_SHARE:.0%} of their content "
                     f"words from their own task): {_pct(card['echo_rate'])}")
    if card.get("off_domain_nearest"):
        near = ", ".join(f"{k} {v}" for k, v in card["off_domain_nearest"].items())
        lines.append(f"- kept instructions nearer another set: {near}")
    lines += ["", "## Stages", "", "| stage | count | rejected (by reason) |", "|---|---|---|"]
    for stage, s in card["stages"].items():
        count = next(f"{k} {v}" for k, v in s.items() if k != "rejected")
        rej = ", ".join(f"{k} {v}" for k, v in s.get("rejected", {}).items()) or "-"
        lines.append(f"| {stage} | {count} | {rej} |")
    lines += ["", f"## {len(card['examples'])} random kept examples", ""]
    for i, ex in enumerate(card["examples"], 1):
        lines.append(f"{i}. **{ex['instruction']}**")
        if ex.get("input"):
            lines.append(f"   - input: {ex['input']}")
        if ex.get("output") is not None:
            out = " ".join(ex["output"].split())
            lines.append(f"   - answer: {out[:600]}{' ...' if len(out) > 600 else ''}")
    return "\n".join(lines) + "\n"


def write_data_card(card: dict, folder: Path) -> Path:
    """`data_card.json` and `data_card.md` into `folder`; returns the Markdown's path."""
    write_json(folder / CARD_JSON, card)
    md = folder / CARD_MD
    md.write_text(format_data_card(card), encoding="utf-8")
    return md
