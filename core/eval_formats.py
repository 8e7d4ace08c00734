"""What the model is asked for each eval item type, and how its answer is scored.

Zero-shot, one user turn rendered with the base model's chat template (the experts were trained on
exactly that: user = instruction, a blank line, the input). Per type:

    multiple_choice  scored twice, each with its own prompt:
                     cloze: user: the question (+ input); the options are NOT listed. Each
                     option's text is scored as the assistant's reply by its summed
                     log-likelihood, as lm-evaluation-harness scores ARC or HellaSwag. acc: the
                     highest sum wins; acc_norm: the highest sum per character of the option
                     wins (lm-eval's acc_norm), so long options are not penalized for length.
                     generative: user: the question (+ input), the options listed as "A. ...",
                     one a line, + "Answer with the letter."; greedy; the letter the reply
                     starts with (after an "Answer:" label, "(", "Option"), else invalid. This
                     is how a user asks through the endpoint; the cloze score needs no
                     instruction following, so a small model can differ a lot between the two.
    yes_no           user: the question (+ input) + "Answer yes or no."; greedy; the reply's
                     first word, normalized, must be yes or no (anything else is invalid).
    classification   user: the question + input + "Answer with one of: <labels>."; greedy; the
                     label the reply names first (the longer one on a tie), else invalid.
    short_answer     user: the question (+ input) + "Answer with just the answer, no
                     explanation."; greedy; exact match of the reply's first line against the
                     answer or an alias after normalization, and ROUGE-L F1 against the best one.

Every item gets one `score` in {0, 1}: acc_norm for multiple choice (the headline; chosen before
seeing any numbers, because option lengths here range from 1 to 122 characters), correct for
yes/no and classification, exact match for short answers. A domain's headline is their mean.
`score_generative` is the same mean with the generative letter in place of acc_norm.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from core.chat import Task, user_message
from core.rouge import rouge_l
from core.seeds import EvalItem

FORMATS = ("multiple_choice", "yes_no", "classification", "short_answer")
YES_NO = "Answer yes or no."
CLASSIFY = "Answer with one of: {labels}."
SHORT = "Answer with just the answer, no explanation."
LETTER = "Answer with the letter."
# Replies only need to be long enough to hold the answer: a yes/no fits in 8 tokens, the longest
# label ("randomized controlled trial") in 16, a short answer in 32, a letter after a lead-in
# such as "The answer is (B)" in 8.
MAX_TOKENS = {"yes_no": 8, "classification": 16, "short_answer": 32, "generative": 8}


def letter_index(letter: str) -> int:
    return ord(letter) - ord("A")


def user_text(item: EvalItem) -> str:
    """The user turn the model (and, for `auto`, the router) sees for this item."""
    base = user_message(Task(item.question, item.input))
    if item.type == "multiple_choice":
        return base
    if item.type == "yes_no":
        return f"{base}\n\n{YES_NO}"
    if item.type == "classification":
        return f"{base}\n\n{CLASSIFY.format(labels=', '.join(item.labels or []))}"
    return f"{base}\n\n{SHORT}"


def letter_text(item: EvalItem) -> str:
    """The user turn of a generative multiple-choice item: the options listed, then LETTER."""
    base = user_message(Task(item.question, item.input))
    options = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(item.options or []))
    return f"{base}\n\n{options}\n\n{LETTER}"


# ---------------------------------------------------------------- normalization
# Numbers keep their decimal point and sign ("7.4" must not become "74"); a minus is a sign only
# when it does not follow a word ("B-12" is "b 12", "-3" is "-3"). Everything else that is not a
# letter or digit separates tokens, so "$52." and "52" agree, and so do "33.3%" and "33.3".
_TOKENS = re.compile(r"(?<![\w.])-\d+(?:\.\d+)?|\d+(?:\.\d+)?|[^\W\d_]+")
_ARTICLES = frozenset({"a", "an", "the"})


def normalize(text: str) -> str:
    """SQuAD-style answer normalization (lowercase, no punctuation or articles), number-aware."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2212", "-").replace("\u2013", "-")  # minus sign, en dash
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000
    return " ".join(t for t in _TOKENS.findall(text) if t not in _ARTICLES)


# "Answer: x", "Final answer - x", "The answer is x": a label before the answer, not part of it
_LEAD_IN = re.compile(r"^(?:(?:the\s+)?(?:final\s+)?answer\s*[:\-]|the\s+answer\s+is\b:?)\s*",
                      re.IGNORECASE)


def first_line(text: str) -> str:
    """The reply's first non-empty line, without a leading answer label or markdown bold."""
    for line in text.strip().splitlines():
        line = line.replace("**", "").strip()
        if line:
            return _LEAD_IN.sub("", line)
    return ""


def parse_yes_no(text: str) -> str | None:
    words = normalize(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


# The letter opens the reply: "B", "B.", "(B)", "B) Mitral valve", "Option B", "**B**". A capital
# followed by a space and a lowercase word is an article or a pronoun ("A mitral valve", "I
# think"), not a choice.
_LETTER = re.compile(r"^(?:(?i:option|choice|letter)\s+)?[(\[]?([A-Za-z])(?![\w'])(?!\s+[a-z])")


def parse_letter(text: str, n_options: int) -> str | None:
    """The option letter the reply starts with, uppercased; None when it names none of the
    first n_options letters. A lowercase letter counts only alone or closed ("b", "b)", "b.")."""
    m = _LETTER.match(first_line(text))
    if not m:
        return None
    letter = m.group(1)
    if letter.islower():
        rest = first_line(text)[m.end():].lstrip()
        if rest and rest[0] not in ".)]:":
            return None
        letter = letter.upper()
    return letter if 0 <= letter_index(letter) < n_options else None


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label the reply mentions first (whole words); on a tie the longer label."""
    hay = f" {normalize(text)} "
    best: tuple[int, int, str] | None = None
    for label in labels:
        needle = normalize(label)
        at = hay.find(f" {needle} ") if needle else -1
        if at >= 0 and (best is None or (at, -len(needle)) < best[:2]):
            best = (at, -len(needle), label)
    return best[2] if best else None


# ---------------------------------------------------------------- per-item scores
@dataclass(frozen=True)
class ItemScore:
    score: float  # the headline per-item score in {0, 1}
    pred: str | None  # the chosen option letter / label / yes|no / the extracted answer
    gold: str
    valid: bool = True  # False: the reply named no yes/no or label
    acc: float | None = None  # multiple choice: unnormalized log-likelihood argmax
    generative: float | None = None  # multiple choice: the generated letter is right
    generative_pred: str | None = None  # the letter parsed from the reply (None: invalid)
    generative_valid: bool | None = None  # the reply started with an option letter
    rouge_l: float | None = None  # short answers

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def score_multiple_choice(item: EvalItem, logliks: list[float],
                          reply: str | None = None) -> ItemScore:
    """Cloze from the options' log-likelihoods; generative from the reply to letter_text, if
    given (its fields stay None otherwise)."""
    options = item.options or []
    gold = letter_index(item.answer)
    best = max(range(len(options)), key=lambda i: logliks[i])
    # lm-eval's acc_norm divides by the continuation's length in characters (bytes for ASCII).
    best_norm = max(range(len(options)), key=lambda i: logliks[i] / max(1, len(options[i])))
    gen = parse_letter(reply, len(options)) if reply is not None else None
    return ItemScore(score=float(best_norm == gold), pred=chr(ord("A") + best_norm),
                     gold=item.answer, acc=float(best == gold),
                     generative=None if reply is None else float(gen == item.answer),
                     generative_pred=gen,
                     generative_valid=None if reply is None else gen is not None)


def score_generation(item: EvalItem, reply: str) -> ItemScore:
    if item.type == "yes_no":
        pred = parse_yes_no(reply)
        gold = item.answer.lower()
        return ItemScore(float(pred == gold), pred, gold, valid=pred is not None)
    if item.type == "classification":
        pred = parse_label(reply, item.labels or [])
        return ItemScore(float(pred == item.answer), pred, item.answer, valid=pred is not None)
    if item.type == "short_answer":
        answer = first_line(reply)
        golds = [item.answer, *item.aliases]
        got = normalize(answer)
        em = bool(got) and any(got == normalize(g) for g in golds)
        return ItemScore(float(em), answer, item.answer,
                         rouge_l=max(rouge_l(answer, g) for g in golds))
    raise ValueError(f"{item.id}: {item.type} is scored by log-likelihood, not generation")
