"""Stage 2b (issue 17): the base model writes routing queries the ways users ask.

The router's exemplars were the seeds and a sample of generated instructions: exam-style text,
while users tell a story and ask at the end, use everyday words, type two or three keywords, ask
an exam question, or hand over a task ("draft ..."). In the method's spirit the base model
writes those queries itself. Each prompt asks for one style: a line saying what the style is,
one passage of the domain's corpus to be about (the description's subtopics without a corpus),
and `demos_per_prompt` demonstrations that are the domain's SEEDS rewritten into that style by a
fixed template (`style_demo`). No routing evaluation set is read here: those are held out.

The candidates are filtered like instructions (`QueryFilter`): a length range per style, the
well-formedness check of `quality.py` (not for keywords, which are no sentence by design),
placeholders, eval contamination, near-duplicates by ROUGE-L against the seeds, the shown demos
and every query kept before, and the domain-relevance check of the instruction filter (nearest
reference set must be the domain's own, against the other domains and everyday tasks). Files:
`queries/candidates.jsonl`, `queries/demos.jsonl` (what the prompts showed), `queries/kept.jsonl`,
`queries/rejected.jsonl` (with the reason).
The kept ones become router exemplars at publish (`kept_queries`).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from core.engine import Completion, Generator, Sampling
from core.jsonl import read_jsonl, write_json, write_jsonl
from core.rouge import RougeIndex, tokenize
from core.seeds import Domain
from specialize import quality
from specialize.config import QueriesConfig
from specialize.prompts import Focus, numbered_list_regex, subtopics
from specialize.quality import (
    DANGLING,
    QUESTION_WORDS,
    TASK_VERBS,
    build_reference,
    seed_verbs,
    wellformed_verdict,
)
from specialize.retrieve import load_passages

STAGE = "queries"

# What the prompt says each style is (issue 17's five ways of asking).
STYLE_LINES = {
    "story": "Each one first tells the person's situation in a few sentences, then asks the "
             "question at the end.",
    "lay": "Each one is asked in everyday words by someone with no training in the field, "
           "without technical terms.",
    "keywords": "Each one is two to four bare keywords typed into a search box, no sentence.",
    "exam": "Each one is a precise exam-style question.",
    "task": "Each one asks for a piece of work: draft, write, compute or summarize something.",
}
# Words per query, by style; the upper bound also caps what the guided format lets through.
WORDS = {"story": (15, 120), "lay": (4, 40), "keywords": (2, 5), "exam": (4, 60),
         "task": (4, 60)}
MAX_CHARS = {"story": 700, "lay": 300, "keywords": 60, "exam": 400, "task": 400}
MAX_TOKENS = {"story": 480, "lay": 256, "keywords": 96, "exam": 320, "task": 320}

# The templates that rewrite a seed into a style. They carry the form only; the words of the
# question stay the seed's (a template cannot make a seed lay, the model has to).
STORY_OPENERS = (
    "I am taking an evening class that covers {topic}, and my notes stop making sense at one "
    "point. The teacher is away this week.",
    "This came up at home yesterday while we were talking about {topic}, and nobody could "
    "settle it. I would like a clear answer.",
    "I had to deal with {topic} at work today, and I did not want to admit I was unsure. "
    "Now it bothers me.",
)
LAY_OPENERS = ("In simple words, please: ", "I am not an expert, so plainly: ",
               "Quick question from a beginner: ", "Without the jargon, please: ")
TASK_OPENERS = ("Write a short explanation for a newcomer: ", "Draft a brief note that "
                "answers this: ", "Prepare a one-paragraph summary for a colleague: ")
# Words a keyword query leaves out, besides question words, dangling words and task verbs.
STOPWORDS = frozenset([
    "a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "from", "with", "and", "or",
    "but", "not", "no", "nor", "as", "is", "are", "was", "were", "be", "been", "being", "it",
    "its", "this", "that", "these", "those", "there", "their", "they", "them", "he", "she", "his",
    "her", "you", "your", "we", "our", "i", "my", "me", "do", "does", "did", "done", "what",
    "which", "who", "whom", "whose", "when", "where", "why", "how", "than", "then", "so", "such",
    "can", "could", "should", "would", "will", "shall", "may", "might", "must", "one", "two",
    "three", "each", "every", "some", "any", "all", "both", "between", "about", "into", "over",
    "under", "after", "before", "during", "main", "usually", "generally", "often", "most", "more",
    "less", "give", "gives", "given", "say", "says", "said", "state", "states", "name", "names",
    "whether", "if", "also", "only", "other", "same"])


@dataclass(frozen=True)
class Query:
    text: str
    style: str


def content_words(text: str) -> list[str]:
    """The words a keyword query would keep, lowercased, once each, in order."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'\-]*", text)]
    return [w for w in dict.fromkeys(words) if w not in STOPWORDS and w not in QUESTION_WORDS
            and w not in DANGLING and w not in TASK_VERBS and len(w) > 2]


def style_demo(style: str, seed: str, topic: str, rng: random.Random,
               df: dict[str, int] | None = None) -> str | None:
    """One seed instruction rewritten into `style` by a template; None when it cannot be (a
    seed with fewer than two content words has no keyword form). `topic`: what a story says
    it is about; `df`: in how many seeds each word occurs, so that keywords are the seed's
    three most specific words (in their order), not its first three."""
    seed = " ".join(seed.split())
    lower = seed[:1].lower() + seed[1:]
    if style == "exam":
        return seed
    if style == "keywords":
        content = content_words(seed)
        if len(content) < 2:
            return None
        chosen = set(sorted(content, key=lambda w: (df or {}).get(w, 0))[:3])
        return " ".join(w for w in content if w in chosen)
    if style == "lay":
        return rng.choice(LAY_OPENERS) + lower
    if style == "story":
        return rng.choice(STORY_OPENERS).format(topic=topic) + " " + seed
    if style == "task":
        first = re.match(r"[A-Za-z]+", seed)
        if first and first.group(0).lower() in TASK_VERBS:
            return seed  # already a task
        return rng.choice(TASK_OPENERS) + lower
    raise ValueError(f"unknown query style {style!r}")


def build_query_prompt(domain: Domain, style: str, demos: list[str], focus: Focus) -> str:
    """Plain completion: what the style is, what to be about, the demos numbered 1..k, then item
    k+1 opened for the model."""
    about = (f"The next questions are about the subject of this {domain.name} passage:\n"
             f"{focus.passage.strip()}" if focus.passage else
             f"The next questions are about {focus.subtopic.strip()}.")
    body = "".join(f"{i}. {d}\n" for i, d in enumerate(demos, 1))
    return (f"Here are questions that people typed into a {domain.name} help chat. "
            f"{STYLE_LINES[style]}\nThey are about {domain.name}: {domain.description.strip()}\n"
            f"{about}\n\n{body}{len(demos) + 1}.")


def query_list_regex(first: int, max_items: int, max_chars: int) -> str:
    """vLLM structured outputs: item `first` (its number is in the prompt), then up to
    `max_items - 1` more, one line each, numbered in order."""
    line = rf"[^\n]{{2,{max_chars}}}\n"
    return numbered_list_regex(rf" {line}", lambda n: rf"{n}\. {line}", first, max_items)


_ITEM = re.compile(r"^\s*(\d{1,3})\s*[.)]\s*", re.MULTILINE)
_LABEL = re.compile(r"^(?:question|query|q)\s*:\s*", re.IGNORECASE)


def parse_query_list(completion: Completion, first: int) -> list[str]:
    """The numbered items from `first` on; an item cut by the token limit is dropped, and a
    restart of the list from 1 (the model copying the demos) is ignored."""
    text = f"{first}." + completion.text
    starts = list(_ITEM.finditer(text))
    items: list[tuple[int, str]] = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        value = text[m.end():end].split("\n\n")[0]
        value = _LABEL.sub("", " ".join(value.split()).replace("**", "")).strip().strip('"')
        items.append((int(m.group(1)), value.strip()))
    if completion.finish_reason == "length" and items:
        items.pop()
    return [v for n, v in items if n >= first and v]


# ---- the filter ---------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"<[^>]{0,30}>|\[[^\]]{0,30}\]|\{[a-z_ ]+\}", re.IGNORECASE)


class QueryFilter:
    """The instruction filter's checks, per style. `reference`: the domain-relevance check of
    `quality.py` (None: off, for rule-only tests)."""

    def __init__(self, domain: Domain, cfg: QueriesConfig, reference=None,
                 shown: list[str] = ()):  # type: ignore[assignment]
        self.cfg, self.reference = cfg, reference
        self.verbs = seed_verbs(domain)
        self.pool = RougeIndex([s.instruction for s in domain.seeds] + list(shown))
        self.eval_ngrams = {g for e in domain.eval_items
                            for g in _ngrams(tokenize(f"{e.question} {e.input}"), 8)}

    def rules(self, q: Query) -> tuple[str | None, str]:
        words = len(q.text.split())
        lo, hi = WORDS[q.style]
        if _PLACEHOLDER.search(q.text):
            return "placeholder", _PLACEHOLDER.search(q.text)[0]
        if words < lo:
            return "too_short", f"{words} words ({q.style}: {lo}-{hi})"
        if words > hi:
            return "too_long", f"{words} words ({q.style}: {lo}-{hi})"
        if set(_ngrams(tokenize(q.text), 8)) & self.eval_ngrams:
            return "eval_contamination", "shares 8 words with an eval item"
        if q.style == "keywords":
            if q.text.rstrip().endswith("?") or q.text.split()[-1].lower() in DANGLING:
                return "not_keywords", "a sentence or a cut phrase"
        else:
            v = wellformed_verdict(q.text, self.verbs)
            if v.reason:
                return v.reason, v.detail
        return None, ""

    def check_all(self, queries: list[Query]) -> list[tuple[str | None, str]]:
        """Verdicts in order; a kept query joins the pool that later ones are compared to. The
        relevance check embeds every candidate that passed the rules in one encoder call."""
        verdicts = [self.rules(q) for q in queries]
        passing = [i for i, (r, _) in enumerate(verdicts) if r is None]
        relevance = dict(zip(passing, self.reference.verdicts(
            [queries[i].text for i in passing], self.cfg.relevance_margin)
            if self.reference is not None and passing else []))
        for i in passing:
            q = queries[i]
            score, _ = self.pool.max_score(q.text, self.cfg.rouge_threshold)
            if score > self.cfg.rouge_threshold:
                verdicts[i] = ("near_duplicate", f"rougeL={score:.2f}")
            elif i in relevance and relevance[i].reason:
                verdicts[i] = (relevance[i].reason, relevance[i].detail)
            else:
                self.pool.add(q.text)
        return verdicts


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ---- the stage ----------------------------------------------------------------------------------

def generate_queries(domain: Domain, cfg: QueriesConfig, generator: Generator, workdir: Path,
                     seed: int = 0, encoder=None) -> dict:
    """Write `cfg.candidates` queries spread over the styles, filter them, write the files.
    `encoder`: for the relevance check; default the router's embedded one."""
    started = time.time()
    out = workdir / STAGE
    write_json(out / "config.json", cfg.model_dump(mode="json"))
    rng = random.Random(f"{seed}:{domain.name}:queries")
    seeds = [s.instruction for s in domain.seeds if not s.input]
    seeds = seeds or [s.instruction for s in domain.seeds]
    topics = subtopics(domain.description)
    df: dict[str, int] = {}
    for s in seeds:
        for w in content_words(s):
            df[w] = df.get(w, 0) + 1
    focuses = [Focus(passage=p) for p in (load_passages(domain.corpus_dir, cfg.focus_words)
                                          if domain.corpus_dir else [])] \
        or [Focus(subtopic=t) for t in topics]

    per_style = dict(zip(cfg.styles, _spread(cfg.candidates, len(cfg.styles))))
    prompts: dict[tuple[str, int], list[str]] = {}  # (style, first item number) -> prompts
    shown: list[str] = []
    for style, want in per_style.items():
        for _ in range(-(-want // cfg.items_per_prompt)):
            demos = []
            for s in rng.sample(seeds, len(seeds)):
                d = style_demo(style, s, story_topic(s, topics, domain.name), rng, df)
                if d is not None:
                    demos.append(d)
                if len(demos) == cfg.demos_per_prompt:
                    break
            shown += demos
            prompts.setdefault((style, len(demos) + 1), []).append(
                build_query_prompt(domain, style, demos, rng.choice(focuses)))

    got: dict[str, list[Query]] = {s: [] for s in cfg.styles}
    for (style, first), batch in prompts.items():
        # One engine call per style: each has its own format bound and token budget.
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=MAX_TOKENS[style], stop=("\n\n",),
                            regex=query_list_regex(first, cfg.items_per_prompt,
                                                   MAX_CHARS[style]))
        got[style] += [Query(text, style) for c in generator.complete(batch, sampling)
                       for text in parse_query_list(c, first)]
    candidates = [q for style, want in per_style.items() for q in got[style][:want]]
    write_jsonl(out / "candidates.jsonl", [{"query": q.text, "style": q.style}
                                          for q in candidates])
    write_jsonl(out / "demos.jsonl", [{"demo": d} for d in shown])
    result = filter_queries(domain, cfg, out, encoder)
    return {**result, "seconds": round(time.time() - started, 1)}


def filter_queries(domain: Domain, cfg: QueriesConfig, out: Path, encoder=None) -> dict:
    """Filter `out/candidates.jsonl` into kept.jsonl / rejected.jsonl; counts by reason and style.
    Separate from generation so a filter setting can be re-run on the same candidates. The
    demos the prompts showed (`demos.jsonl`) join the near-duplicate pool: a copied demo is
    a seed in disguise."""
    rows = read_jsonl(out / "candidates.jsonl")
    shown = [r["demo"] for r in read_jsonl(out / "demos.jsonl")] \
        if (out / "demos.jsonl").exists() else []
    # Looked up at call time, like the pipeline's: tests swap in a light encoder.
    encoder = encoder or quality.load_default_encoder()
    reference = build_reference(domain, encoder, cfg.relevance_top_k)
    filt = QueryFilter(domain, cfg, reference, shown)
    verdicts = filt.check_all([Query(r["query"], r["style"]) for r in rows])
    kept = [r for r, (reason, _) in zip(rows, verdicts) if reason is None]
    rejected = [{**r, "reason": reason, "detail": detail}
                for r, (reason, detail) in zip(rows, verdicts) if reason is not None]
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "rejected.jsonl", rejected)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    by_style = {s: {"candidates": sum(r["style"] == s for r in rows),
                    "kept": sum(r["style"] == s for r in kept)} for s in cfg.styles}
    return {"candidates": len(rows), "kept": len(kept), "rejected": reasons,
            "by_style": by_style}


def story_topic(seed: str, topics: list[str], fallback: str) -> str:
    """The description's subtopic that shares most words with the seed (a story about
    "counting and probability" before a dice question); the domain's name if none does."""
    words = set(content_words(seed))
    best = max(topics, key=lambda t: len(words & set(content_words(t))), default=fallback)
    return best if words & set(content_words(best)) else fallback


def kept_queries(workdir: Path, n: int) -> list[str]:
    """Up to `n` kept queries for the router, taken in turn from each style so that no style
    crowds out the others; [] when the stage did not run."""
    path = workdir / STAGE / "kept.jsonl"
    if n <= 0 or not path.exists():
        return []
    by_style: dict[str, list[str]] = {}
    for r in read_jsonl(path):
        by_style.setdefault(r["style"], []).append(r["query"])
    out: list[str] = []
    while len(out) < n and any(by_style.values()):
        for queue in by_style.values():
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]
