"""Per-expert thresholds from held-out exemplars (k-fold), never from the routing sets.

Each fold holds out a fifth of every expert's exemplars (descriptions stay in: they are a
different kind of text), scores them against the rest exactly as routing does, and records:
  positives of e: e's held-out exemplars scored on e;
  negatives of e: the other experts' held-out exemplars scored on e.
threshold_e = the 75th percentile of e's negatives, floored at half the median of e's positives
(the floor only acts when domains are so far apart that negatives are noise).

Held-out seed instructions are long and templated, so they score ~0.1 higher on their own expert
than short user questions do. A low percentile of the positives (p5: 0.26-0.33 on the seeds)
routes only 88.2% of in-domain queries to the right expert, while the negatives' p75 (0.23-0.27)
keeps 94.5% of off-topic queries off the experts and routes 93.5% of in-domain queries
(docs/router.md has the table of rules tried).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.scoring import centroids, exact_neighbours, expert_scores, search_k
from router.types import RouterError, ScoringConfig

MIN_NEGATIVES = 10  # fewer gives a percentile that one exemplar can move by 0.05
MAX_HELDOUT_PER_EXPERT = 200  # enough for a stable 75th percentile; keeps big indexes cheap


@dataclass(frozen=True)
class Calibration:
    thresholds: np.ndarray  # (E,)
    stats: list[dict]  # per expert: rule, counts and the percentiles behind its threshold
    cv_top1: float | None  # argmax accuracy on held-out exemplars (a sanity number)


def calibrate(vectors: np.ndarray, ids: np.ndarray, holdable: np.ndarray, n_experts: int,
              cfg: ScoringConfig) -> Calibration:
    rng = np.random.default_rng(cfg.seed)
    fold = np.full(len(ids), -1)
    for e in range(n_experts):
        pos = np.flatnonzero((ids == e) & holdable)
        if len(pos) < 2:
            continue  # one exemplar cannot be both held out and represented
        rng.shuffle(pos)
        pos = pos[:MAX_HELDOUT_PER_EXPERT]
        fold[pos] = np.arange(len(pos)) % cfg.folds

    positives: list[list[float]] = [[] for _ in range(n_experts)]
    negatives: list[list[float]] = [[] for _ in range(n_experts)]
    hits = total = 0
    for f in range(cfg.folds):
        held = np.flatnonzero(fold == f)
        if len(held) == 0:
            continue
        rest = np.flatnonzero(fold != f)
        k = search_k(len(rest))
        sims, pos = exact_neighbours(vectors[held], vectors[rest], k)
        rest_ids = ids[rest]
        counts = np.bincount(rest_ids, minlength=n_experts)
        cents = centroids(vectors[rest], rest_ids, n_experts)
        scores = expert_scores(sims, rest_ids[pos], vectors[held] @ cents.T, counts, cfg,
                               exhaustive=k == len(rest))
        for row, e_true in zip(scores, ids[held]):
            hits += int(np.argmax(row) == e_true)
            total += 1
            for e in range(n_experts):
                (positives if e == e_true else negatives)[e].append(float(row[e]))

    thresholds = np.zeros(n_experts, dtype=np.float64)
    stats = []
    for e in range(n_experts):
        p, n = np.array(positives[e]), np.array(negatives[e])
        if len(n) >= MIN_NEGATIVES:
            thr, rule = np.percentile(n, cfg.negative_percentile), \
                f"negatives p{cfg.negative_percentile:g}"
            floor = cfg.positive_median_fraction * np.median(p) if len(p) else -np.inf
            if floor > thr:
                thr, rule = floor, f"{cfg.positive_median_fraction:g} x positives median"
        elif len(p):
            thr, rule = np.percentile(p, cfg.positive_percentile), \
                f"positives p{cfg.positive_percentile:g} (too few other-expert exemplars)"
        else:
            raise RouterError(f"expert #{e} has fewer than 2 exemplars and there are no other "
                              "experts to calibrate its threshold against: add exemplars")
        thresholds[e] = thr
        stats.append({"rule": rule, "threshold": round(float(thr), 4), "positives": len(p),
                      "negatives": len(n),
                      "positives_p5": _pct(p, 5), "positives_median": _pct(p, 50),
                      "negatives_median": _pct(n, 50), "negatives_p75": _pct(n, 75)})
    return Calibration(thresholds, stats, hits / total if total else None)


def _pct(a: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(a, q)), 4) if len(a) else None
