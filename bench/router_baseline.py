"""TF-IDF nearest-centroid baseline, in numpy (scikit-learn is not a dependency).

Same exemplars, same calibration rule and the same decision as the router, only the vectors
differ: sublinear word TF-IDF instead of MiniLM, and the centroid alone (the classic baseline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from router.calibrate import calibrate
from router.scoring import centroids
from router.types import ScoringConfig

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(["a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for",
                   "from", "how", "i", "in", "is", "it", "me", "my", "of", "on", "or", "that",
                   "the", "this", "to", "was", "what", "when", "which", "who", "why", "with",
                   "you", "your"])


def _tokens(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class TfidfCentroid:
    def __init__(self, exemplars: Mapping[str, Sequence[str]],
                 descriptions: Mapping[str, str] | None = None):
        self.names = sorted(exemplars)
        texts, ids, holdable = [], [], []
        for e, name in enumerate(self.names):
            texts += list(exemplars[name])
            holdable += [True] * len(exemplars[name])
            if descriptions and descriptions.get(name):
                texts.append(descriptions[name])
                holdable.append(False)
            ids += [e] * (len(texts) - len(ids))
        docs = [_tokens(t) for t in texts]
        self.vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
        df = np.zeros(len(self.vocab))
        for d in docs:
            df[[self.vocab[w] for w in set(d)]] += 1
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1.0  # smoothed, as scikit-learn does
        vectors = self.transform(texts)
        ids_arr = np.asarray(ids)
        self.centroids = centroids(vectors, ids_arr, len(self.names))
        self.cfg = ScoringConfig(centroid_weight=1.0)
        self.thresholds = calibrate(vectors, ids_arr, np.asarray(holdable), len(self.names),
                                    self.cfg).thresholds

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.vocab)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in _tokens(t):
                if w in self.vocab:
                    out[r, self.vocab[w]] += 1
        out = np.where(out > 0, 1 + np.log(np.maximum(out, 1)), 0) * self.idf  # sublinear tf
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return self.transform(texts) @ self.centroids.T
