"""Neighbours -> per-expert scores -> one decision. Pure numpy, shared by routing, calibration
and the evaluation sweep so the three can never disagree.

score_e = (1 - w) * mean of the query's top-k similarities among e's exemplars
          + w * cosine(query, centroid of e's exemplars)

The kNN half follows domains with several clusters (math has arithmetic, proofs and statistics);
the centroid half is robust to a stray generated exemplar and to ambiguous single neighbours.
k=2, w=0.5 won 5-fold cross-validation on the seed exemplars (docs/router.md: 94.6% vs 90.3% for max).

The decision contrasts the best expert with generic off-topic text scored the same way (its
top-k mean): user questions score lower than seed-like text on every expert, off-topic ones
included, so a per-query comparison holds where one absolute threshold per expert does not.
"""

from __future__ import annotations

import numpy as np

from router.types import RouteChoice, ScoringConfig

# Up to this many vectors the search returns every vector, so every expert's score is exact
# (the shipped four experts hold ~430). Above it the search returns the top SEARCH_K and an expert
# with fewer than k of them is padded with the last similarity returned: an upper bound on its
# unseen neighbours, and such an expert cannot be the argmax anyway.
EXHAUSTIVE_MAX = 2048
SEARCH_K = 64


def search_k(ntotal: int) -> int:
    return ntotal if ntotal <= EXHAUSTIVE_MAX else min(SEARCH_K, ntotal)


def expert_scores(sims: np.ndarray, ids: np.ndarray, centroid_sims: np.ndarray,
                  counts: np.ndarray, cfg: ScoringConfig, exhaustive: bool) -> np.ndarray:
    """(B, K) neighbour sims sorted descending + their expert ids -> (B, E) scores.

    counts[e] is how many vectors expert e has in the index (its top-k mean uses at most that).
    """
    n_experts = centroid_sims.shape[1]
    valid = ids >= 0  # HNSW may return -1 when it finds fewer than K
    floor = np.where(valid, sims, np.inf).min(axis=1)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    knn = np.empty((sims.shape[0], n_experts), dtype=np.float64)
    for e in range(n_experts):
        mask = ids == e
        take = mask & (np.cumsum(mask, axis=1) <= cfg.top_k)
        total = np.where(take, sims, 0.0).sum(axis=1)
        got = take.sum(axis=1)
        if exhaustive:
            knn[:, e] = total / max(1, min(cfg.top_k, int(counts[e])))
        else:
            knn[:, e] = (total + (cfg.top_k - got) * floor) / cfg.top_k
    w = cfg.centroid_weight
    return (1.0 - w) * knn + w * centroid_sims


def offtopic_scores(queries: np.ndarray, offtopic: np.ndarray, top_k: int) -> np.ndarray:
    """(B,) mean of each query's top_k similarities among the off-topic vectors (brute force:
    ~100 vectors, 0.01 ms a query), scored like an expert's kNN half."""
    if len(offtopic) == 0:
        return np.full(len(queries), -np.inf)
    sims = queries @ offtopic.T
    k = min(top_k, offtopic.shape[0])
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1).astype(np.float64)


def bars(scores: np.ndarray, thresholds: np.ndarray, offtopic: np.ndarray | None,
         cfg: ScoringConfig) -> np.ndarray:
    """(B,) the score each query's argmax expert must reach to be chosen.

    Without the off-topic contrast: that expert's calibrated threshold. With it: the off-topic
    score minus cfg.offtopic_margin, floored at cfg.threshold_floor x the threshold."""
    thr = thresholds[np.argmax(scores, axis=1)] if len(scores) else np.zeros(0)
    if offtopic is None or cfg.offtopic_margin is None:
        return thr.astype(np.float64)
    return np.maximum(cfg.threshold_floor * thr, offtopic - cfg.offtopic_margin)


def decide(scores: np.ndarray, names: list[str], thresholds: np.ndarray,
           offset: float = 0.0, offtopic: np.ndarray | None = None,
           cfg: ScoringConfig | None = None) -> list[RouteChoice]:
    """Argmax expert if its score clears its bar (+ offset, for the sweep), else base.

    The bar is the expert's own threshold, or with `offtopic` scores (one per query) the
    off-topic contrast of `bars`. The argmax is taken first: a query closest to law but under
    law's bar goes to the base model, not to a farther expert that happens to clear its own.
    """
    cfg = cfg or ScoringConfig()
    contrast = offtopic is not None and cfg.offtopic_margin is not None
    limits = bars(scores, thresholds, offtopic, cfg) + offset
    out = []
    for i, row in enumerate(scores):
        best = int(np.argmax(row))
        name, score, bar = names[best], float(row[best]), float(limits[i])
        by_expert = {n: float(s) for n, s in zip(names, row)}
        off = float(offtopic[i]) if contrast else None
        if contrast:
            why = (f"bar {bar:.3f}: the larger of off-topic {off:.3f} - {cfg.offtopic_margin:g} "
                   f"and {cfg.threshold_floor:g} x threshold {float(thresholds[best]):.3f}")
        else:
            why = f"its threshold {bar:.3f}"
        if score >= bar:
            out.append(RouteChoice(expert=name, score=score, scores_by_expert=by_expert,
                                   threshold=bar, reason=f"{name} scored {score:.3f} >= {why}",
                                   offtopic_score=off))
        else:
            out.append(RouteChoice(expert=None, score=score, scores_by_expert=by_expert,
                                   threshold=bar, offtopic_score=off,
                                   reason=f"best expert {name} scored {score:.3f} < {why}: "
                                   "base model"))
    return out


def centroids(vectors: np.ndarray, ids: np.ndarray, n_experts: int) -> np.ndarray:
    """Mean of each expert's unit vectors, renormalized: (E, dim)."""
    out = np.zeros((n_experts, vectors.shape[1]), dtype=np.float32)
    np.add.at(out, ids, vectors)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """Top-k (sims, positions) by brute force, sorted descending: calibration folds use it so
    they need no FAISS index per fold. Chunked: 256 queries x 100k vectors is 100 MB at most."""
    k = min(k, vectors.shape[0])
    sims_out = np.empty((len(queries), k), dtype=np.float32)
    pos_out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        s = queries[start:start + 256] @ vectors.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else \
            np.tile(np.arange(s.shape[1]), (len(s), 1))
        top = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        sims_out[start:start + 256] = np.take_along_axis(top, order, axis=1)
        pos_out[start:start + 256] = np.take_along_axis(part, order, axis=1)
    return sims_out, pos_out
