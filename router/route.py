"""`Router`: text in, `RouteChoice` out. Imports numpy and FAISS, never Ray or vLLM, so `serve/`
can hold one in its ingress; the encoder (torch) is loaded only when a Router is built or loaded.

    router = Router.load("experts")             # builds/refreshes the index beside the registry
    router.route("what is consideration?")      # RouteChoice(expert='law', score=0.52, ...)
    router.route_batch(["...", "..."])          # one encoder call for the batch
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from router.calibrate import calibrate
from router.encoder import Encoder, load_encoder
from router.scoring import centroids, decide, expert_scores, search_k
from router.types import RouteChoice, RouterError, ScoringConfig
from router.vectors import build_faiss_index, index_contents, index_kind, search

log = logging.getLogger(__name__)


class Router:
    def __init__(self, encoder: Encoder, index, names: list[str], thresholds: Sequence[float],
                 cfg: ScoringConfig | None = None, info: dict | None = None):
        if not names:
            raise RouterError("a router needs at least one expert")
        if index.d != encoder.dim:
            raise RouterError(f"the index holds {index.d}-dim vectors but encoder "
                              f"{encoder.name} makes {encoder.dim}-dim ones: rebuild the index")
        self.encoder, self.index, self.names = encoder, index, list(names)
        self.cfg = cfg or ScoringConfig()
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        vectors, self.ids = index_contents(index)
        self.counts = np.bincount(self.ids, minlength=len(names))
        self.centroids = centroids(vectors, self.ids, len(names))
        self.k = search_k(index.ntotal)
        self.kind = index_kind(index)
        self.info = info or {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_exemplars(cls, exemplars: Mapping[str, Sequence[str]],
                       encoder: Encoder | str | None = None,
                       descriptions: Mapping[str, str] | None = None,
                       cfg: ScoringConfig | None = None,
                       thresholds: Mapping[str, float] | None = None,
                       kind: str = "auto") -> Router:
        """Embed, index and calibrate in memory (router.index saves what this builds).
        kind: "auto" (exact below vectors.HNSW_MIN_VECTORS, HNSW above), "flat" or "hnsw"."""
        encoder = load_encoder(encoder)
        cfg = cfg or ScoringConfig()
        names = sorted(exemplars)
        if not names:
            raise RouterError("no experts to route to: run `selfspec specialize --all` first")
        texts, ids, holdable = [], [], []
        for e, name in enumerate(names):
            seen = dict.fromkeys(t.strip() for t in exemplars[name] if t and t.strip())
            desc = (descriptions or {}).get(name, "").strip()
            if not seen and not desc:
                raise RouterError(f"expert {name!r} has no exemplars: re-publish it")
            texts += list(seen)
            holdable += [True] * len(seen)
            if desc:  # indexed, never held out: one long paragraph, not a query-like text
                texts.append(desc)
                holdable.append(False)
            ids += [e] * (len(texts) - len(ids))
        vectors = encoder.encode(texts)
        if vectors.shape != (len(texts), encoder.dim) or not np.isfinite(vectors).all():
            raise RouterError(f"encoder {encoder.name} returned {vectors.shape} vectors for "
                              f"{len(texts)} texts (dim {encoder.dim}), or non-finite values")
        ids_arr = np.asarray(ids, dtype=np.int64)
        info: dict = {"n_vectors": len(texts)}
        if thresholds is None:
            cal = calibrate(vectors, ids_arr, np.asarray(holdable), len(names), cfg)
            thr = cal.thresholds
            info.update(calibration=dict(zip(names, cal.stats)), cv_top1=cal.cv_top1)
        else:
            missing = sorted(set(names) - set(thresholds))
            if missing:
                raise RouterError(f"thresholds given for some experts but not {missing}")
            thr = np.array([thresholds[n] for n in names])
            info["calibration"] = "given"
        index = build_faiss_index(vectors, ids_arr, kind)
        return cls(encoder, index, names, thr, cfg, info)

    @classmethod
    def load(cls, experts_dir: str | os.PathLike, encoder: Encoder | str | None = None,
             rebuild: bool = False) -> Router:
        """The router for a registry: builds its index if missing or stale (see router.index)."""
        from router.index import load_router
        return load_router(experts_dir, encoder=encoder, rebuild=rebuild)

    # ---------------------------------------------------------------- routing
    def route(self, text: str) -> RouteChoice:
        return self.route_batch([text])[0]

    def route_batch(self, texts: Sequence[str]) -> list[RouteChoice]:
        if isinstance(texts, str):
            raise RouterError("route_batch takes a list of queries; use route() for one")
        out: list[RouteChoice | None] = [None] * len(texts)
        todo = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise RouterError(f"query #{i} is a {type(t).__name__}, not text")
            if not t.strip():
                out[i] = RouteChoice(None, 0.0, {}, None, "empty query: base model")
                continue
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates from undecodable bytes
                raise RouterError(f"query #{i} is not valid Unicode text ({e.reason} at "
                                  f"position {e.start}): decode it as UTF-8 first") from None
            todo.append(i)
        if todo:
            vecs = self.encoder.encode([texts[i] for i in todo])
            for i, choice in zip(todo, self.score_vectors(vecs)):
                out[i] = choice
        return out  # type: ignore[return-value]

    def score_vectors(self, vectors: np.ndarray) -> list[RouteChoice]:
        """Encoded queries -> choices (the bench times this apart from the encoder)."""
        return decide(self.expert_scores(vectors), self.names, self.thresholds)

    def expert_scores(self, vectors: np.ndarray) -> np.ndarray:
        sims, ids = search(self.index, vectors, self.k)
        return expert_scores(sims, ids, vectors @ self.centroids.T, self.counts, self.cfg,
                             exhaustive=self.k == self.index.ntotal and self.kind == "flat")

    def is_stale(self) -> bool:
        """True when the registry this router was loaded from has been published to since."""
        from specialize.registry import load_registry
        where = self.info.get("experts_dir")
        return where is not None and \
            load_registry(where).revision != self.info.get("registry_revision")

    def describe(self) -> str:
        thr = ", ".join(f"{n} {t:.3f}" for n, t in zip(self.names, self.thresholds))
        return (f"{len(self.names)} experts, {self.index.ntotal} exemplar vectors "
                f"({self.kind} index), encoder {self.encoder.name}; thresholds: {thr}")
