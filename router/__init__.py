"""Embedding router: pick the right expert for each query, or none (the base model).

Public surface (semantic-router's Route/Router/Encoder/Index, kept small):
    Router, RouteChoice, RouterError, ScoringConfig, ensure_index

Importing `router` is cheap (the CLI parser imports it): numpy, FAISS and the encoder load when
`Router` / `ensure_index` are first touched.
"""

from __future__ import annotations

from router.types import RouteChoice, RouterError, ScoringConfig

__all__ = ["RouteChoice", "Router", "RouterError", "ScoringConfig", "ensure_index"]


def __getattr__(name: str):
    if name == "Router":
        from router.route import Router
        return Router
    if name == "ensure_index":
        from router.index import ensure_index
        return ensure_index
    raise AttributeError(f"module 'router' has no attribute {name!r}")
