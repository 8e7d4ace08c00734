"""Passage retrieval over a domain corpus, for knowledge-grounded responses.

BM25 (bm25s, the paper's choice) or dense retrieval (a sentence encoder + an exact FAISS
inner-product index). The dense retriever is handed its encoder by the caller (the `selfspec` CLI
passes the router's embedded one): specialize never imports the router. An encoder is anything
with `encode(texts) -> (n, dim) float32` whose rows are L2-normalized, so inner product is cosine. The corpus is Markdown files, cut into passages of at most
`passage_words` words on paragraph boundaries so that a retrieved passage fits a small context.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core.errors import ConfigError

logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG


def load_passages(corpus_dir: Path, passage_words: int) -> list[str]:
    passages = []
    for path in sorted(corpus_dir.glob("*.md")):
        title, words = "", []
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            para = para.strip()
            if para.startswith("#"):
                title = para.lstrip("#").strip()
                continue
            for chunk_start in range(0, len(para.split()), passage_words):
                chunk = para.split()[chunk_start:chunk_start + passage_words]
                if len(words) + len(chunk) > passage_words and words:
                    passages.append(_passage(title, words))
                    words = []
                words += chunk
        if words:
            passages.append(_passage(title, words))
    return passages


def _passage(title: str, words: list[str]) -> str:
    return (f"{title}: " if title else "") + " ".join(words)


class Retriever:
    def __init__(self, passages: list[str], method: str = "bm25", encoder=None):
        self.passages = passages
        self.method = method
        if method == "bm25":
            import bm25s

            self.index = bm25s.BM25()
            self.index.index(bm25s.tokenize(passages, stopwords="en", show_progress=False),
                             show_progress=False)
        elif method == "dense":
            import faiss

            if encoder is None:
                raise ConfigError("--retrieval dense needs a sentence encoder, and none was "
                                  "passed: the caller builds it (the selfspec CLI passes the "
                                  "router's embedded one)")
            self.encoder = encoder
            vecs = _vectors(encoder, passages)
            self.index = faiss.IndexFlatIP(vecs.shape[1])
            self.index.add(vecs)
        else:
            raise ConfigError(f"unknown retrieval method {method!r}: use bm25 or dense")

    def search(self, queries: list[str], k: int) -> list[list[int]]:
        k = min(k, len(self.passages))
        if self.method == "bm25":
            import bm25s

            docs, _ = self.index.retrieve(bm25s.tokenize(queries, stopwords="en",
                                                         show_progress=False),
                                          k=k, show_progress=False)
            return [list(map(int, row)) for row in docs]
        _, ids = self.index.search(_vectors(self.encoder, queries), k)
        return [list(map(int, row)) for row in ids]


def _vectors(encoder, texts: list[str]) -> np.ndarray:
    # FAISS wants C-contiguous float32; the encoder's rows are already unit length.
    return np.ascontiguousarray(encoder.encode(texts), dtype="float32")


def build_retriever(corpus_dir: Path, method: str, passage_words: int,
                    encoder=None) -> Retriever:
    """`encoder`: required for "dense" (see the module docstring), unused for "bm25"."""
    return Retriever(load_passages(corpus_dir, passage_words), method, encoder)
