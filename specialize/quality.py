"""Judgements of what a small base model gets wrong when it writes instructions.

A 135M model sampled at temperature 1.0 writes mostly noise: off-topic questions, sentence
fragments, inputs that have nothing to do with their instruction (issue 16 lists kept examples).
The rule filters of `filter.py` never look at meaning, so this module adds three checks:

- **Domain relevance** (`DomainReference`): the router's sentence encoder embeds the candidate,
  its own domain (seeds and the description's clauses), every other available domain's seeds, and a
  generic set of everyday tasks (`offtopic.txt`). The candidate's score against each reference set
  is the mean cosine to its `top_k` nearest members (one close seed is not enough, a whole
  neighbourhood is). It is kept only if its own domain scores highest, by `relevance_margin`.
- **Well-formedness** (`wellformed_verdict`): at least one sentence is a question or an imperative
  (a known task verb first, or one a seed of the domain starts with), and the text does not stop on
  a dangling word ("Is the probability of"). An input must belong to its instruction: cosine
  between the two embeddings of at least `min_input_similarity`.
- **The base model's own judgement** (`instruction_perplexities`): the mean per-token negative
  log-likelihood of the task under the base model, through vLLM's prompt logprobs. Noise written at
  temperature 1.0 is improbable even to the model that wrote it; the threshold is relative to the
  seeds' own median, so it carries over to another base model.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.encoder import MemoEncoder, load_encoder
from core.engine import TokenRequest
from core.seeds import Domain, available_domains, load_domain, seeds_root

OFFTOPIC_FILE = Path(__file__).resolve().parent / "offtopic.txt"
GENERIC = "generic"  # the name the everyday reference set carries in verdicts and data cards

QUESTION_WORDS = frozenset([
    "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "is", "are", "was",
    "were", "do", "does", "did", "can", "could", "should", "would", "will", "has", "have",
    "had", "may", "might", "must", "shall", "am"])
# Imperatives a task may start with, besides the first word of any seed of the domain.
TASK_VERBS = frozenset([
    "explain", "describe", "list", "name", "identify", "classify", "summarize", "summarise",
    "compute", "calculate", "write", "draft", "give", "define", "compare", "contrast",
    "extract", "determine", "state", "outline", "suggest", "rewrite", "translate", "estimate",
    "find", "choose", "select", "decide", "answer", "read", "convert", "provide", "create",
    "generate", "rank", "tell", "evaluate", "assess", "discuss", "predict", "interpret",
    "label", "match", "categorize", "categorise", "sort", "simplify", "solve", "prove", "show",
    "derive", "check", "verify", "analyze", "analyse", "recommend", "propose", "paraphrase",
    "design", "plan", "prepare", "make", "fill", "complete", "correct", "edit", "use", "apply",
    "express", "factor", "expand", "differentiate", "integrate", "round", "count", "multiply",
    "divide", "add", "subtract", "reduce", "justify", "illustrate", "mention", "note", "report",
    "review", "scan", "spot", "flag", "highlight", "pick", "order", "arrange", "restate",
    "split", "group", "compose", "tag", "mark", "indicate", "consider", "imagine", "assume",
    "suppose", "let", "pull", "condense", "distinguish", "assign", "help", "value", "sketch",
    "rephrase", "tabulate"])
# Openers of a leading clause: "Given ..., what ...", "In a cohort study, ..."; the task comes
# after the first comma.
LEAD_INS = frozenset([
    "given", "based", "using", "for", "in", "if", "after", "from", "assuming", "when", "during",
    "with", "on", "at", "as", "before", "without", "under", "according"])
# A sentence that ends on one of these was cut off mid-phrase.
DANGLING = frozenset([
    "of", "the", "a", "an", "to", "and", "or", "but", "with", "for", "in", "on", "at", "by",
    "from", "that", "which", "as", "is", "are", "was", "were", "be", "than", "then", "into",
    "about", "its", "their", "his", "her", "my", "your", "our"])

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")  # "2.5%" stays inside its sentence
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


@dataclass(frozen=True)
class QualityVerdict:
    reason: str | None  # None: passes
    detail: str = ""


def load_offtopic(path: Path = OFFTOPIC_FILE) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def description_clauses(description: str) -> list[str]:
    """The description, and each of its clauses of 2+ words: "mechanisms of disease" lies much
    closer to a question about a disease than the whole multi-topic paragraph does."""
    parts = re.split(r"[.;:,()]", description)
    return [description] + [p.strip() for p in parts if len(p.split()) >= 2]


def task_text(instruction: str, input_: str = "") -> str:
    return f"{instruction}\n{input_}".strip() if input_ else instruction.strip()


# ---- well-formedness ----------------------------------------------------------------------------

def _first_word(text: str) -> str:
    m = _WORD.search(text)
    return m.group(0).lower() if m else ""


def _is_task_sentence(sentence: str, verbs: frozenset[str]) -> bool:
    s = sentence.strip()
    if s.endswith("?"):
        return True
    first = _first_word(s)
    if first in QUESTION_WORDS or first in verbs:
        return True
    if first in LEAD_INS and "," in s:
        return _is_task_sentence(s.split(",", 1)[1], verbs)
    return False


def wellformed_verdict(instruction: str, verbs: frozenset[str] = TASK_VERBS) -> QualityVerdict:
    """A fragment or a statement is no task: some sentence must ask or command, and the text must
    not end on a dangling word. Deliberately simple; every shipped seed passes (tested)."""
    text = instruction.strip()
    words = _WORD.findall(text)
    if not words:
        return QualityVerdict("fragment", "no words")
    if not re.search(r"[.?!:)\"']$", text):
        # Cut off ("Is the probability of") or no sentence at all: a list's last item may lack
        # its full stop, so only a dangling last word or a missing task marks a fragment.
        last = text.split()[-1].lower()
        if last in DANGLING:
            return QualityVerdict("fragment", f"ends on {last!r}")
        if not _is_task_sentence(text, verbs):
            return QualityVerdict("fragment", "no question or imperative, no final punctuation")
    if not any(_is_task_sentence(s, verbs) for s in _SENTENCE_END.split(text)):
        return QualityVerdict("not_a_task", "no sentence asks a question or gives a command")
    return QualityVerdict(None)


def seed_verbs(domain: Domain) -> frozenset[str]:
    """The task verbs plus the first word of each seed that is no question: a seed starting
    "In a cohort study, ..." or "A drug's name ..." adds no verb (lead-ins and function words are
    left out, else "In there upon." would read as a task)."""
    firsts = {_first_word(s.instruction) for s in domain.seeds
              if not s.instruction.rstrip().endswith("?")}
    return TASK_VERBS | (firsts - LEAD_INS - DANGLING - QUESTION_WORDS)


# ---- domain relevance ---------------------------------------------------------------------------

class DomainReference:
    """Embedded reference sets: the domain's own, every other available domain's, the generic."""

    def __init__(self, encoder, own: str, sets: dict[str, list[str]], top_k: int = 3):
        if own not in sets or len(sets) < 2:
            raise ValueError(f"reference sets need {own!r} and at least one other: {list(sets)}")
        self.encoder, self.own, self.top_k = encoder, own, top_k
        self.names = list(sets)
        self.vectors = {n: encoder.encode(texts) for n, texts in sets.items()}

    def scores(self, vecs: np.ndarray) -> dict[str, np.ndarray]:
        """Per reference set: each row's mean cosine to its `top_k` nearest members."""
        out = {}
        for name, ref in self.vectors.items():
            sims = vecs @ ref.T
            k = min(self.top_k, ref.shape[0])
            out[name] = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
        return out

    def nearest(self, texts: Sequence[str]) -> list[tuple[str, float, str, float]]:
        """Per text: (own name, own score, the best-scoring other set, its score)."""
        if not texts:
            return []
        sc = self.scores(self.encoder.encode(list(texts)))
        rows = []
        for i in range(len(texts)):
            rival = max((n for n in self.names if n != self.own), key=lambda n: sc[n][i])
            rows.append((self.own, float(sc[self.own][i]), rival, float(sc[rival][i])))
        return rows

    def verdicts(self, texts: Sequence[str], margin: float = 0.0) -> list[QualityVerdict]:
        out = []
        for own, own_s, rival, rival_s in self.nearest(texts):
            if own_s - rival_s < margin:
                out.append(QualityVerdict("off_domain", f"closer to {rival} ({rival_s:.2f}) "
                                                        f"than to {own} ({own_s:.2f})"))
            else:
                out.append(QualityVerdict(None))
        return out


def reference_sets(domain: Domain, root: Path | None = None) -> dict[str, list[str]]:
    """Own seeds + description clauses; every other domain under the seeds root (the shipped ones
    for a domain given as a folder elsewhere); the generic everyday tasks."""
    sets = {domain.name: [task_text(s.instruction, s.input) for s in domain.seeds]
            + description_clauses(domain.description)}
    for name in available_domains(root or seeds_root()):
        if name == domain.name:
            continue
        other = load_domain(name, root or seeds_root())
        sets[name] = [task_text(s.instruction, s.input) for s in other.seeds]
    sets[GENERIC] = load_offtopic()
    return sets


def build_reference(domain: Domain, encoder, top_k: int = 3,
                    root: Path | None = None) -> DomainReference:
    return DomainReference(encoder, domain.name, reference_sets(domain, root), top_k)


def input_similarity(encoder, instruction: str, input_: str) -> float:
    a, b = encoder.encode([instruction, input_])
    return float(a @ b)


@functools.cache
def load_default_encoder():
    """The router's embedded encoder (all-MiniLM-L6-v2, offline), built once per process (~10 s),
    only when a check needs it (sentence-transformers loads inside `load_encoder`)."""
    return MemoEncoder(load_encoder(None))


# ---- the base model's judgement -----------------------------------------------------------------

PERPLEXITY_PREFIX = "Task: "  # gives the first word of the task a context to be scored in


def instruction_perplexities(generator, texts: Sequence[str]) -> list[float]:
    """Mean per-token negative log-likelihood (nats) of each text under the base model, from one
    vLLM batch with prompt logprobs (the engine evaluation scores with; no second model).
    The generation engine has no LoRA: vLLM 0.32's CPU LoRA logits wrapper (an engine started
    with LoRA and no explicit target list) crashes on prompt logprobs."""
    tok = generator.tokenizer
    prefix = len(tok.encode(PERPLEXITY_PREFIX, add_special_tokens=False))
    reqs = [TokenRequest(tuple(tok.encode(PERPLEXITY_PREFIX + t, add_special_tokens=False)),
                         prompt_logprobs=True) for t in texts]
    out = []
    for req, res in zip(reqs, generator.complete_tokens(reqs)):
        lps = [lp for lp in (res.prompt_logprobs or ())[prefix:] if lp is not None]
        out.append(-sum(lps) / len(lps) if lps else math.inf)
    return out
