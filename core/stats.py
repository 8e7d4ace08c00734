"""Macro-F1 and bootstrap confidence intervals.

With 150-170 items per domain a 95% interval on an accuracy near 0.5 is about +-0.08 wide (it was
+-0.11 with the first 66-81), so a difference of a few points between two targets is noise; the
intervals say so. Resampling is over items, with a
fixed seed (the same indices for every target, so reports are reproducible and comparable); a
paired interval resamples the same items for both targets, which is what a difference needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95


def macro_f1(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    """Mean F1 over the classes seen in gold or (valid) predictions, as scikit-learn's
    f1_score(average="macro"); an invalid prediction (None) is a miss for its gold class."""
    classes = sorted(set(gold) | {p for p in pred if p is not None})
    if not classes:
        return 0.0
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def macro_f1_ci(gold: Sequence[str], pred: Sequence[str | None], resamples: int = RESAMPLES,
                seed: int = 0) -> dict:
    """macro_f1 and its bootstrap interval, vectorized over resamples. A class absent from a
    resample (neither gold nor predicted) is left out of that resample's mean, as scikit-learn
    leaves out labels it does not see."""
    if not gold:
        return {"mean": None, "ci": [None, None]}
    classes = sorted(set(gold) | {p for p in pred if p is not None})
    code = {c: i for i, c in enumerate(classes)}
    g = np.array([code[x] for x in gold])
    p = np.array([code.get(x, -1) if x is not None else -1 for x in pred])
    idx = _indices(len(g), resamples, seed)
    G, P = g[idx], p[idx]
    f1 = np.full((resamples, len(classes)), np.nan)
    for c in range(len(classes)):
        tp = ((G == c) & (P == c)).sum(axis=1)
        denom = 2 * tp + ((G != c) & (P == c)).sum(axis=1) + ((G == c) & (P != c)).sum(axis=1)
        f1[:, c] = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return {"mean": round(macro_f1(gold, pred), 4), "ci": _interval(np.nanmean(f1, axis=1))}


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(samples: np.ndarray) -> list[float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [round(float(lo), 4), round(float(hi), 4)]


def mean_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "ci": [lo, hi]}: a percentile bootstrap interval of the mean over items."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci": [None, None]}
    means = v[_indices(v.size, resamples, seed)].mean(axis=1)
    return {"mean": round(float(v.mean()), 4), "ci": _interval(means)}


def paired_diff(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                seed: int = 0) -> dict:
    """mean(a) - mean(b) over the same items, its paired bootstrap interval, and the share of
    resamples where a does not beat b (a one-sided bootstrap p-value)."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.shape != b_.shape:
        raise ValueError(f"paired scores differ in length: {a_.size} vs {b_.size}")
    if a_.size == 0:
        return {"diff": None, "ci": [None, None], "p_not_better": None}
    d = a_ - b_
    diffs = d[_indices(d.size, resamples, seed)].mean(axis=1)
    return {"diff": round(float(d.mean()), 4), "ci": _interval(diffs),
            "p_not_better": round(float((diffs <= 0).mean()), 4)}
