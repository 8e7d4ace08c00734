"""Routing accuracy on labelled queries (`{"query", "domain"}` lines, domain "none" for none).

Three numbers, kept apart because they fail differently:
  top-1 accuracy   in-domain queries whose highest-scoring expert is the right one (retrieval);
  routed accuracy  in-domain queries actually sent to the right expert (a fallback to the base
                   model counts as a miss);
  none recall      no-expert queries sent to the base model.
Queries tagged with a style (the user-style sets) are also counted per style: the share routed
right (expert or base), and the in-domain and no-expert halves of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.scoring import decide
from router.types import ScoringConfig

NONE = "none"


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    scores: np.ndarray  # (N, E) per-expert scores, for the sweep
    truth: list[str]  # labels: expert names or "none"
    predicted: list[str]
    offtopic: np.ndarray | None = None  # (N,) off-topic scores, when the router contrasts
    cfg: ScoringConfig | None = None


def evaluate(names: list[str], thresholds: np.ndarray, scores: np.ndarray,
             domains: list[str], styles: list[str | None] | None = None,
             offtopic: np.ndarray | None = None,
             cfg: ScoringConfig | None = None) -> Evaluation:
    """Score matrix + gold domains -> metrics. Domains with no expert count as "none": the best
    such a query can get is the base model. `offtopic` (one score per query) and `cfg` decide as
    the router does (Router.offtopic_scores); without them the thresholds alone decide."""
    unknown = sorted({d for d in domains if d != NONE and d not in names})
    truth = [d if d in names else NONE for d in domains]
    predicted = [c.expert or NONE for c in decide(scores, names, thresholds, offtopic=offtopic,
                                                  cfg=cfg)]
    top1 = [names[int(i)] for i in np.argmax(scores, axis=1)] if len(scores) else []
    metrics = summarize(names, truth, predicted, top1)
    metrics["domains_without_expert"] = unknown
    if styles is not None and any(styles):
        metrics["per_style"] = per_style(truth, predicted, styles)
    return Evaluation(metrics, scores, truth, predicted, offtopic, cfg)


def per_style(truth: list[str], predicted: list[str], styles: list[str | None]) -> dict:
    """{style: {accuracy, n, routed (in-domain), none_recall}}; untagged queries are "-"."""
    out = {}
    for style in dict.fromkeys(s or "-" for s in styles):
        idx = [i for i, s in enumerate(styles) if (s or "-") == style]
        ind = [i for i in idx if truth[i] != NONE]
        off = [i for i in idx if truth[i] == NONE]
        out[style] = {"accuracy": _ratio(sum(predicted[i] == truth[i] for i in idx), len(idx)),
                      "n": len(idx),
                      "routed": _ratio(sum(predicted[i] == truth[i] for i in ind), len(ind)),
                      "none_recall": _ratio(sum(predicted[i] == NONE for i in off), len(off))}
    return out


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
    """Metrics when every query's bar moves by the same offset (0 = as routed)."""
    offsets = np.round(np.arange(-0.15, 0.1501, 0.01), 4) if offsets is None else offsets
    top1 = [names[int(i)] for i in np.argmax(ev.scores, axis=1)]
    rows = []
    for off in offsets:
        pred = [c.expert or NONE for c in decide(ev.scores, names, thresholds, float(off),
                                                 offtopic=ev.offtopic, cfg=ev.cfg)]
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
    if m.get("per_style"):
        lines += ["", f"{'style':14s} {'right':>7s} {'routed':>7s} {'none':>7s} {'n':>5s}"
                  "   (right: expert or base as labelled; routed: in-domain; none: off-topic)"]
        for style, c in m["per_style"].items():
            lines.append(f"{style:14s} {pct(c['accuracy']):>7s} {pct(c['routed']):>7s} "
                         f"{pct(c['none_recall']):>7s} {c['n']:>5d}")
    if m.get("domains_without_expert"):
        lines.append(f"\nno expert for {', '.join(m['domains_without_expert'])}: those queries "
                     "count as correct when sent to the base model")
    return "\n".join(lines)


def _ratio(a, b) -> float | None:
    return round(float(a) / b, 4) if b else None
