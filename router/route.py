"""`Router`: text in, `RouteChoice` out. Imports numpy and FAISS, never Ray or vLLM, so `serve/`
can hold one in its ingress; the encoder (torch) is loaded only when a Router is built or loaded.

    router = load_router("experts")             # router.index: builds/refreshes the index on disk
    router.route("what is consideration?")      # RouteChoice(expert='law', score=0.52, ...)
    router.route_batch(["...", "..."])          # one encoder call for the batch
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from core.encoder import Encoder, load_encoder
from core.registry import load_registry
from router.calibrate import calibrate
from router.offtopic import OFF_TOPIC
from router.scoring import centroids, decide, expert_scores, offtopic_scores, search_k
from router.types import RouteChoice, RouterError, ScoringConfig
from router.vectors import build_faiss_index, index_contents, index_kind, search

log = logging.getLogger(__name__)


class Router:
    def __init__(self, encoder: Encoder, index, names: list[str], thresholds: Sequence[float],
                 cfg: ScoringConfig | None = None, info: dict | None = None,
                 offtopic: np.ndarray | None = None):
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
        # (n, dim) vectors of generic off-topic text: the contrast in scoring.decide (None: off)
        self.offtopic = None if offtopic is None else \
            np.ascontiguousarray(offtopic, dtype=np.float32)
        if self.offtopic is not None and (self.offtopic.ndim != 2 or
                                          self.offtopic.shape[1] != encoder.dim):
            raise RouterError(f"the off-topic vectors are {self.offtopic.shape} but encoder "
                              f"{encoder.name} makes {encoder.dim}-dim ones: rebuild the index")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_exemplars(cls, exemplars: Mapping[str, Sequence[str]],
                       encoder: Encoder | str | None = None,
                       descriptions: Mapping[str, str] | None = None,
                       cfg: ScoringConfig | None = None,
                       thresholds: Mapping[str, float] | None = None,
                       kind: str = "auto", offtopic: Sequence[str] | None = None) -> Router:
        """Embed, index and calibrate in memory (router.index saves what this builds).
        kind: "auto" (exact below vectors.HNSW_MIN_VECTORS, HNSW above), "flat" or "hnsw".
        offtopic: generic text for the contrast (None: router/offtopic.py; () or a
        cfg.offtopic_margin of None: no contrast, thresholds alone)."""
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
        if cfg.offtopic_margin is None:
            offtopic = ()
        generic = list(dict.fromkeys(t.strip() for t in (OFF_TOPIC if offtopic is None
                                                         else offtopic) if t and t.strip()))
        everything = encoder.encode(texts + generic)  # one call: batches fill better
        if everything.shape != (len(texts) + len(generic), encoder.dim) or \
                not np.isfinite(everything).all():
            raise RouterError(f"encoder {encoder.name} returned {everything.shape} vectors for "
                              f"{len(texts) + len(generic)} texts (dim {encoder.dim}), or "
                              "non-finite values")
        vectors, generic_vecs = everything[:len(texts)], everything[len(texts):]
        ids_arr = np.asarray(ids, dtype=np.int64)
        info: dict = {"n_vectors": len(texts)}
        kept = _offtopic_kept(generic_vecs, vectors, ids_arr, len(names), cfg)
        if generic:
            info["offtopic"] = {"kept": int(kept.sum()),
                                "dropped": [t for t, k in zip(generic, kept) if not k]}
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
        # every line dropped (an expert for everyday requests): thresholds alone, not a bar of
        # half the threshold
        return cls(encoder, index, names, thr, cfg, info,
                   generic_vecs[kept] if kept.any() else None)

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
                out[i] = RouteChoice(expert=None, score=0.0, reason="empty query: base model")
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
        return decide(self.expert_scores(vectors), self.names, self.thresholds,
                      offtopic=self.offtopic_scores(vectors), cfg=self.cfg)

    def offtopic_scores(self, vectors: np.ndarray) -> np.ndarray | None:
        """(B,) each query's score against the off-topic text; None when the contrast is off."""
        if self.offtopic is None or self.cfg.offtopic_margin is None:
            return None
        return offtopic_scores(vectors, self.offtopic, self.cfg.top_k)

    def expert_scores(self, vectors: np.ndarray) -> np.ndarray:
        sims, ids = search(self.index, vectors, self.k)
        return expert_scores(sims, ids, vectors @ self.centroids.T, self.counts, self.cfg,
                             exhaustive=self.k == self.index.ntotal and self.kind == "flat")

    def is_stale(self) -> bool:
        """True when the registry this router was loaded from has been published to since."""
        where = self.info.get("experts_dir")
        return where is not None and \
            load_registry(where).revision != self.info.get("registry_revision")

    def describe(self) -> str:
        thr = ", ".join(f"{n} {t:.3f}" for n, t in zip(self.names, self.thresholds))
        contrast = "no off-topic contrast" if self.offtopic is None or \
            self.cfg.offtopic_margin is None else \
            f"{len(self.offtopic)} off-topic vectors, margin {self.cfg.offtopic_margin:g}"
        return (f"{len(self.names)} experts, {self.index.ntotal} exemplar vectors "
                f"({self.kind} index), encoder {self.encoder.name}; thresholds: {thr}; "
                f"{contrast}")


def _offtopic_kept(generic: np.ndarray, vectors: np.ndarray, ids: np.ndarray, n_experts: int,
                   cfg: ScoringConfig) -> np.ndarray:
    """Which off-topic vectors to keep: not those as near one expert's exemplars as that
    expert's own text is (a new cooking expert must not be contrasted with recipes)."""
    keep = np.ones(len(generic), dtype=bool)
    if len(generic) == 0:
        return keep
    sims = generic @ vectors.T
    for e in range(n_experts):
        own = sims[:, ids == e]
        k = min(cfg.top_k, own.shape[1])
        if k:
            keep &= np.sort(own, axis=1)[:, -k:].mean(axis=1) < cfg.offtopic_drop_similarity
    return keep
