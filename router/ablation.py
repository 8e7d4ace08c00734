"""Why the scoring defaults are what they are: cross-validated top-1 on the exemplars (what chose
them) beside the routing-set numbers (reported, never used to choose), for each alternative.

Embeds the exemplars once and rebuilds the in-memory router per setting (calibration included).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from router.encoder import MemoEncoder
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
]


def ablation(exemplars: dict, descriptions: dict, encoder, query_vectors: np.ndarray,
             domains: list[str]) -> list[dict]:
    from router.route import Router

    memo = MemoEncoder(encoder)
    rows = []
    for label, changes in SETTINGS:
        cfg = replace(ScoringConfig(), **changes)
        r = Router.from_exemplars(exemplars, memo, descriptions=descriptions, cfg=cfg)
        m = evaluate(r.names, r.thresholds, r.expert_scores(query_vectors), domains).metrics
        rows.append({"setting": label, **changes, "cv_top1_exemplars": round(r.info["cv_top1"], 4),
                     "top1": m["top1_accuracy"], "routed": m["routed_accuracy"],
                     "none_recall": m["none_recall"], "overall": m["overall_accuracy"]})
    return rows
