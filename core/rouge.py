"""ROUGE-L F1 near-duplicate search that scales to the paper's ~5K instructions per domain.

Self-Instruct compares every new instruction against the whole pool with `rouge_score`: O(N^2)
LCS computations in Python, minutes at 5K. Here an inverted index gives, for every pool item at
once (numpy), an upper bound on its ROUGE-L F1 with the query: the LCS of two token sequences is
at most their multiset token overlap, so F1 <= 2*overlap/(len_a+len_b). Exact LCS runs only for
the few items whose bound clears the threshold. Scores equal `rouge_score`'s rougeL F-measure
(same tokenization, no stemming); a test checks that.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, runs of [a-z0-9] (non-ASCII letters drop)."""
    return _TOKEN.findall(text.lower())


def lcs_len(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    ta = tokenize(a) if isinstance(a, str) else a
    tb = tokenize(b) if isinstance(b, str) else b
    if not ta or not tb:
        return 0.0
    lcs = lcs_len(ta, tb)
    return 0.0 if lcs == 0 else 2 * lcs / (len(ta) + len(tb))


class _Growable:
    """An int32 array appended to in amortized O(1) (capacity doubles), read as a view: a
    posting list kept as a Python list had to be converted to numpy on every query, O(pool) per
    query for common words like "the", which made a 5K pool's filter quadratic in practice."""

    __slots__ = ("data", "size")

    def __init__(self):
        self.data, self.size = np.empty(8, dtype=np.int32), 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[:self.size]


class RougeIndex:
    """A growing pool of texts; `max_score(text)` is the highest ROUGE-L F1 against the pool."""

    def __init__(self, texts: list[str] = ()):  # type: ignore[assignment]
        self._tokens: list[list[str]] = []
        self._lengths = _Growable()
        self._postings: dict[str, tuple[_Growable, _Growable]] = {}
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._tokens)

    def add(self, text: str) -> None:
        tokens = tokenize(text)
        idx = len(self._tokens)
        self._tokens.append(tokens)
        self._lengths.append(len(tokens))
        for tok, count in Counter(tokens).items():
            if tok not in self._postings:
                self._postings[tok] = (_Growable(), _Growable())
            ids, counts = self._postings[tok]
            ids.append(idx)
            counts.append(count)

    def max_score(self, text: str, threshold: float = 0.0) -> tuple[float, int | None]:
        """Best ROUGE-L F1 and the pool index that reached it.

        Only items whose upper bound exceeds `threshold` are scored exactly, so the returned score
        is exact whenever it is above the threshold (the only case a filter acts on).
        """
        tokens = tokenize(text)
        n = len(self._tokens)
        if not tokens or n == 0:
            return 0.0, None
        overlap = np.zeros(n, dtype=np.int32)
        for tok, count in Counter(tokens).items():
            if tok in self._postings:
                ids, counts = self._postings[tok]
                overlap[ids.view()] += np.minimum(counts.view(), count)
        bound = 2.0 * overlap / (len(tokens) + self._lengths.view().astype(np.float64))
        # Sort only the items that could clear the threshold (a handful), not the whole pool.
        cand = np.flatnonzero(bound > threshold)
        best, best_idx = 0.0, None
        for i in cand[np.argsort(-bound[cand], kind="stable")]:
            if bound[i] <= max(threshold, best):
                break  # sorted: nothing further can beat what we have
            score = rouge_l(tokens, self._tokens[i])
            if score > best:
                best, best_idx = score, int(i)
        return best, best_idx
