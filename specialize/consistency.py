"""Self-consistency for closed-form answers (Huang et al., 2022, "Large Language Models Can
Self-Improve"): on a yes/no, multiple-choice or classification task, sample several more answers
with the same prompt and keep the answer only when most samples give its label.

Off by default (`respond.self_consistency` = 0). When on, stage 3 (`specialize/respond.py`)
sends each closed-form task's prompt once more with vLLM's `n` = k, so the prompt is prefilled
once for all k samples, and stores each sample's label beside the answer; stage 4
(`specialize/filter_responses.py`) rejects the answer as "inconsistent" when its own label is not
the majority's. Open-ended tasks are never sampled.

Generated instructions carry no task type (stage 1 writes only instruction and input), so the
type is read from the task's form, in this order:

- multiple choice: the instruction or input lists lettered options "A) ... B) ..." (as the seeds
  do); the label is the option letter the answer starts with, or the option whose text it
  opens with;
- classification: the instruction names its labels as an "or" list after "as", "into", "one
  of", a colon or a parenthesis ("as positive, negative or neutral"); the label is the one the
  answer's first sentence names first;
- yes/no: a question that opens with an auxiliary verb ("Is ...?", "Can ...?", "Does ...?"), not
  a request ("Can you explain ...?") nor an either-or question ("Is X or Y ...?"), or one that
  says "yes or no"; the label is the answer's first word (after "The answer is").

The answer comes first, then the reason, as in the seeds, so only the start of each answer is
read. An answer whose label cannot be read counts as no vote, and a closed-form answer without a
label of its own is rejected as "no_label": it did not answer the question it was asked.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from core.engine import Adapter, Generator, Sampling
from core.eval_formats import first_line, parse_label, parse_letter, parse_yes_no
from specialize.config import RespondConfig
from specialize.prompts import RESPONSE_STOP, clean_response

Form = Literal["yes_no", "multiple_choice", "classification"]
# The label comes first: the seeds' longest opening ("The answer is (B) Hypokalemia.", "Breach
# of contract.") is under 16 tokens, so samples stop well before a full 320-token answer.
SAMPLE_TOKENS = 32


@dataclass(frozen=True)
class ClosedForm:
    form: Form
    labels: tuple[str, ...]  # "yes", "no" | the option letters | the labels the task names
    options: tuple[str, ...] = ()  # multiple choice: each letter's option text


# ---- which tasks are closed-form ----------------------------------------------------------------

# "A) ...", "(B) ...", "C. ...": an option marker at the start or after a space.
_OPTION = re.compile(r"(?:^|(?<=\s))\(?([A-H])[).]\s+\S")
_AUX = frozenset({"is", "are", "was", "were", "am", "do", "does", "did", "can", "could", "will",
                  "would", "shall", "should", "may", "might", "must", "has", "have", "had"})
# "Can you explain ...?" asks for something; it is not a question answered by yes or no.
_REQUEST = re.compile(r"^(?:can|could|would|will)\s+you\b", re.IGNORECASE)
_YES_OR_NO = re.compile(r"\byes\s+or\s+no\b", re.IGNORECASE)
# A label list: "as X, Y or Z", "into X or Y", "one of X, Y or Z", ": X, Y or Z", "(X, Y or Z)";
# not examples ("risk factors such as smoking or obesity").
_LIST_CUE = re.compile(r"(?:(?<!such )\bas|\binto|\bone\s+of|:|\()\s+|\(", re.IGNORECASE)
_LIST_END = re.compile(r"[.?!;)\n]")
MAX_LABEL_WORDS = 4


def lettered_options(text: str) -> dict[str, str]:
    """A lettered option list (A, B, ... in order, at least two): letter -> option text."""
    found: list[re.Match] = []
    for m in _OPTION.finditer(text):
        if m.group(1) == chr(ord("A") + len(found)):
            found.append(m)
    if len(found) < 2:
        return {}
    ends = [m.start() for m in found[1:]] + [len(text)]
    return {m.group(1): text[m.end(1) + 1:end].strip(" ;,\n") for m, end in zip(found, ends)}


def listed_labels(instruction: str) -> tuple[str, ...]:
    """The labels an instruction lists as alternatives ("X, Y or Z"), each of at most
    MAX_LABEL_WORDS words; () when it lists none."""
    for cue in _LIST_CUE.finditer(instruction):
        rest = instruction[cue.end():]
        span = rest[:m.start()] if (m := _LIST_END.search(rest)) else rest
        if " or " not in span:
            continue
        head, last = span.rsplit(" or ", 1)
        parts = [p.strip() for p in head.split(",")] + [last.strip()]
        parts = [p for p in parts if p]
        if len(parts) >= 2 and all(len(p.split()) <= MAX_LABEL_WORDS for p in parts):
            return tuple(parts)
    return ()


def _question(instruction: str) -> str:
    """The sentence that asks: the first one ending in "?", else the whole instruction. A
    sentence ends before a capital ("0.999... exactly" does not end one)."""
    for sentence in re.split(r"(?<=[.?!])\s+(?=[A-Z])", instruction.strip()):
        if sentence.endswith("?"):
            return sentence
    return instruction.strip()


def is_yes_no(instruction: str) -> bool:
    if _YES_OR_NO.search(instruction):
        return True
    q = _question(instruction)
    if not q.endswith("?") or " or " in q:
        return False
    # The auxiliary opens the question or the clause after a lead-in ("When rates rise, do
    # bond prices fall?", "If f'(x) = 0, must ...?").
    clauses = [q, *(c.strip() for c in q.split(",")[1:2])]
    return any(c.split() and c.split()[0].lower() in _AUX and not _REQUEST.match(c)
               for c in clauses)


def closed_form(instruction: str, task_input: str = "") -> ClosedForm | None:
    """The task's closed form, or None for an open-ended task."""
    options = lettered_options(f"{instruction}\n{task_input}")
    if options:
        return ClosedForm("multiple_choice", tuple(options), tuple(options.values()))
    labels = listed_labels(instruction)
    if labels:
        return ClosedForm("classification", labels)
    if is_yes_no(instruction):
        return ClosedForm("yes_no", ("yes", "no"))
    return None


# ---- the label an answer gives ------------------------------------------------------------------

def first_sentence(text: str) -> str:
    line = first_line(text)
    return re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0]


def answer_label(text: str, form: ClosedForm) -> str | None:
    """The label the answer opens with, normalized (yes/no lowercase, the option letter, the
    task's own spelling of a label); None when it opens with none."""
    if form.form == "yes_no":
        return parse_yes_no(first_line(text))
    if form.form == "multiple_choice":
        # The letter, else the option whose text the answer opens with ("A firearm." for
        # "D) A firearm").
        letter = parse_letter(text, len(form.labels))
        named = parse_label(first_sentence(text), [o for o in form.options if o])
        return letter or (form.labels[form.options.index(named)] if named else None)
    return parse_label(first_sentence(text), list(form.labels))


# ---- sampling (stage 3) and the vote (stage 4) --------------------------------------------------

def sample_votes(generator: Generator, prompts: list[str], tasks: list, cfg: RespondConfig,
                 adapter: Adapter | None = None) -> list[dict | None]:
    """For each prompt of a batch: None for an open-ended task; for a closed-form one, the
    form, its labels and the labels of `cfg.self_consistency` answers sampled with the same
    prompt (one request per prompt, vLLM's `n`)."""
    forms = [closed_form(t.instruction, t.input) for t in tasks]
    closed = [i for i, f in enumerate(forms) if f is not None]
    votes: list[dict | None] = [None] * len(tasks)
    if not closed or not cfg.self_consistency:
        return votes
    # No per-request seed: vLLM's CPU worker fails when chunked prefill splits a long prompt
    # that carries one (see docs/quality.md); the engine's seed keeps runs repeatable.
    sampling = Sampling(temperature=cfg.consistency_temperature, max_tokens=SAMPLE_TOKENS,
                        repetition_penalty=cfg.repetition_penalty, stop=RESPONSE_STOP,
                        n=cfg.self_consistency)
    completions = generator.complete([prompts[i] for i in closed], sampling, adapter=adapter)
    for i, c in zip(closed, completions):
        form = forms[i]
        votes[i] = {"form": form.form, "labels": list(form.labels), "options": list(form.options),
                    "votes": [answer_label(clean_response(s), form)
                              for s in (c.samples or (c.text,))]}
    return votes


def consistency_verdict(response: str, record: dict) -> tuple[str | None, str]:
    """(None, "") when the answer is kept: at least half of the samples give the answer's own
    label and no other label gets as many votes. Else ("inconsistent", the tally), or
    ("no_label", why) for an answer that opens with no label at all."""
    form = ClosedForm(record["form"], tuple(record["labels"]), tuple(record.get("options", ())))
    own = answer_label(response, form)
    votes = record["votes"]
    if own is None:
        return "no_label", f"the answer opens with no {form.form.replace('_', '/')} label"
    counts = Counter(v for v in votes if v is not None)
    rival = max((n for label, n in counts.items() if label != own), default=0)
    if 2 * counts[own] >= len(votes) and counts[own] > rival:
        return None, ""
    tally = ", ".join(f"{label} {n}" for label, n in counts.most_common()) or "no labels"
    return "inconsistent", f"answer {own}; {len(votes)} samples: {tally}"
