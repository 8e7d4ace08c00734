"""Why the scoring defaults are what they are: cross-validated top-1 on the exemplars (what chose
the scoring) and the user-style dev split (what chose the decision, issue 17) beside the shipped
routing sets and the user-style test split (reported, never used to choose), per alternative.

Embeds the exemplars once and rebuilds the in-memory router per setting (calibration included).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from core.encoder import MemoEncoder
from router.evaluate import evaluate
from router.types import ScoringConfig

# (label, changes to ScoringConfig): aggregations first, then calibration percentiles.
SETTINGS = [
    ("max (1-NN)", {"top_k": 1, "centroid_weight": 0.0}),
    ("top-2 mean", {"top_k": 2, "centroid_weight": 0.0}),
    ("top-3 mean", {"top_k": 3, "centroid_weight": 0.0}),
    ("top-5 mean", {"top_k": 5, "centroid_weight": 0.0}),
    ("top-10 mean", {"top_k": 10, "centroid_weight": 0.0}),
    ("centroid only", {"centroid_weight": 1.0}),
    ("0.7 top-2 + 0.3 centroid", {"centroid_weight": 0.3}),
    ("0.5 top-1 + 0.5 centroid", {"top_k": 1}),
    ("0.5 top-2 + 0.5 centroid (default)", {}),
    ("0.5 top-3 + 0.5 centroid", {"top_k": 3}),
    ("default, negatives p50", {"negative_percentile": 50.0}),
    ("default, negatives p90", {"negative_percentile": 90.0}),
    # the decision (issue 17): thresholds alone, then the off-topic contrast's settings
    ("thresholds alone (no off-topic contrast)", {"offtopic_margin": None}),
    ("off-topic margin 0.03", {"offtopic_margin": 0.03}),
    ("off-topic margin 0.04", {"offtopic_margin": 0.04}),
    ("off-topic margin 0.06", {"offtopic_margin": 0.06}),
    ("off-topic margin 0.08", {"offtopic_margin": 0.08}),
    ("floor 0.66 x threshold", {"threshold_floor": 0.66}),
    ("floor 1.0 x threshold", {"threshold_floor": 1.0}),
]


def ablation(exemplars: dict, descriptions: dict, encoder,
             sets: dict[str, tuple[np.ndarray, list[str]]]) -> list[dict]:
    """sets: {name: (query vectors, gold domains)}; the first one's numbers are also given at
    the row's top level (the shipped routing sets, as before issue 17)."""
    from router.route import Router

    memo = MemoEncoder(encoder)
    rows = []
    for label, changes in SETTINGS:
        cfg = replace(ScoringConfig(), **changes)
        r = Router.from_exemplars(exemplars, memo, descriptions=descriptions, cfg=cfg)
        per_set = {}
        for name, (vectors, domains) in sets.items():
            m = evaluate(r.names, r.thresholds, r.expert_scores(vectors), domains,
                         offtopic=r.offtopic_scores(vectors), cfg=r.cfg).metrics
            per_set[name] = {"top1": m["top1_accuracy"], "routed": m["routed_accuracy"],
                             "none_recall": m["none_recall"], "overall": m["overall_accuracy"]}
        rows.append({"setting": label, **changes, "cv_top1_exemplars": round(r.info["cv_top1"], 4),
                     **next(iter(per_set.values())), "sets": per_set})
    return rows
