"""Routing accuracy on labelled queries (`{"query", "domain"}` lines, domain "none" for none).

Three numbers, kept apart because they fail differently:
  top-1 accuracy   in-domain queries whose highest-scoring expert is the right one (retrieval);
  routed accuracy  in-domain queries actually sent to the right expert (a fallback to the base
                   model counts as a miss);
  none recall      no-expert queries sent to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.scoring import decide

NONE = "none"


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    scores: np.ndarray  # (N, E) per-expert scores, for the sweep
    truth: list[str]  # labels: expert names or "none"
    predicted: list[str]


def evaluate(names: list[str], thresholds: np.ndarray, scores: np.ndarray,
             domains: list[str]) -> Evaluation:
    """Score matrix + gold domains -> metrics. Domains with no expert count as "none": the best
    such a query can get is the base model."""
    unknown = sorted({d for d in domains if d != NONE and d not in names})
    truth = [d if d in names else NONE for d in domains]
    predicted = [c.expert or NONE for c in decide(scores, names, thresholds)]
    top1 = [names[int(i)] for i in np.argmax(scores, axis=1)] if len(scores) else []
    metrics = summarize(names, truth, predicted, top1)
    metrics["domains_without_expert"] = unknown
    return Evaluation(metrics, scores, truth, predicted)


def summarize(names: list[str], truth: list[str], predicted: list[str], top1: list[str]) -> dict:
    labels = list(names) + [NONE]
    ind = [i for i, t in enumerate(truth) if t != NONE]
    off = [i for i, t in enumerate(truth) if t == NONE]
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(truth, predicted):
        confusion[labels.index(t), labels.index(p)] += 1
    per_class = {}
    for j, lab in enumerate(labels):
        tp, col, row = confusion[j, j], confusion[:, j].sum(), confusion[j, :].sum()
        per_class[lab] = {"precision": _ratio(tp, col), "recall": _ratio(tp, row),
                          "support": int(row)}
    return {
        "n": len(truth), "n_in_domain": len(ind), "n_none": len(off),
        "top1_accuracy": _ratio(sum(top1[i] == truth[i] for i in ind), len(ind)),
        "routed_accuracy": _ratio(sum(predicted[i] == truth[i] for i in ind), len(ind)),
        "none_recall": _ratio(sum(predicted[i] == NONE for i in off), len(off)),
        "overall_accuracy": _ratio(sum(p == t for p, t in zip(predicted, truth)), len(truth)),
        "per_class": per_class, "labels": labels, "confusion": confusion.tolist(),
    }


def sweep(ev: Evaluation, names: list[str], thresholds: np.ndarray,
          offsets: np.ndarray | None = None) -> list[dict]:
    """Metrics when every per-expert threshold moves by the same offset (0 = calibrated)."""
    offsets = np.round(np.arange(-0.15, 0.1501, 0.01), 4) if offsets is None else offsets
    top1 = [names[int(i)] for i in np.argmax(ev.scores, axis=1)]
    rows = []
    for off in offsets:
        pred = [c.expert or NONE for c in decide(ev.scores, names, thresholds, float(off))]
        m = summarize(names, ev.truth, pred, top1)
        rows.append({"offset": float(off), "routed_accuracy": m["routed_accuracy"],
                     "none_recall": m["none_recall"], "overall_accuracy": m["overall_accuracy"]})
    return rows


def format_report(m: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    lines = [
        (f"top-1 accuracy (in-domain, best-scoring expert): {pct(m['top1_accuracy'])} "
         f"of {m['n_in_domain']}"),
        f"routed accuracy (in-domain, sent to the right expert): {pct(m['routed_accuracy'])}",
        f"no-expert queries sent to the base model: {pct(m['none_recall'])} of {m['n_none']}",
        f"overall accuracy: {pct(m['overall_accuracy'])} of {m['n']}",
        "", f"{'class':14s} {'precision':>9s} {'recall':>7s} {'n':>5s}"]
    for lab, c in m["per_class"].items():
        lines.append(f"{lab:14s} {pct(c['precision']):>9s} {pct(c['recall']):>7s} "
                     f"{c['support']:>5d}")
    if m.get("domains_without_expert"):
        lines.append(f"\nno expert for {', '.join(m['domains_without_expert'])}: those queries "
                     "count as correct when sent to the base model")
    return "\n".join(lines)


def _ratio(a, b) -> float | None:
    return round(float(a) / b, 4) if b else None
