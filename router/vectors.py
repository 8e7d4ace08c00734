"""The FAISS index over every expert's exemplar vectors, and the exact/approximate choice.

One index for all experts; each vector's FAISS id is its expert's number (IndexIDMap allows
repeats), so a search returns neighbours already labelled and the file alone holds the labels.
Vectors are unit length, so inner product is cosine similarity.
"""

from __future__ import annotations

import numpy as np

from router.types import RouterError

# Exact search (IndexFlatIP) below this many vectors, HNSW from here on. Measured by
# `selfspec bench router` on one core, single query, k=64 (docs/router.md): flat vs HNSW ms were
# 1k 0.04/0.06, 2k 0.11/0.09, 4k 0.23/0.13, 8k 0.44/0.15, 32k 1.82/0.17, HNSW recall@64
# 0.99-0.98. The crossover is 2k-4k; from 4k HNSW is clearly ahead and flat grows linearly.
# Four experts x ~110 exemplars (~430 vectors) stay exact, at 0.2 ms next to ~12 ms of encoding.
HNSW_MIN_VECTORS = 4096
HNSW_M = 32  # graph degree: recall@64 >= 0.98 up to 32k exemplar-like vectors in the bench
HNSW_EF_CONSTRUCTION = 80  # 32k vectors build in ~3.3 s on one core
HNSW_EF_SEARCH = 128  # must be >= k (64 above the exhaustive range); 2x k for the recall above


def _faiss():
    import faiss  # imported here so `import router` stays cheap for the CLI parser
    return faiss


def choose_kind(n_vectors: int, kind: str = "auto") -> str:
    if kind not in ("auto", "flat", "hnsw"):
        raise RouterError(f"unknown index kind {kind!r}: use auto, flat or hnsw")
    if kind == "auto":
        return "hnsw" if n_vectors >= HNSW_MIN_VECTORS else "flat"
    return kind


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray, kind: str = "auto"):
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if choose_kind(len(vectors), kind) == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        inner = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def index_kind(index) -> str:
    faiss = _faiss()
    return "hnsw" if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW) else "flat"


def index_contents(index) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, expert ids) stored in an index: the centroids are recomputed from them."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else \
        np.zeros((0, index.d), np.float32)
    return np.asarray(vectors, dtype=np.float32), faiss.vector_to_array(index.id_map)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def write_index(index, path) -> None:
    _faiss().write_index(index, str(path))


def read_index(path):
    return _faiss().read_index(str(path))
