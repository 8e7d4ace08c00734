"""The router index on disk, beside the registry it was built from:

    <experts_dir>/router/meta.json          encoder name + dim, registry revision + fingerprint,
                                            experts, thresholds, scoring and calibration numbers
    <experts_dir>/router/index-<build>.faiss  the vectors, labelled with expert numbers
    <experts_dir>/router/offtopic-<build>.npy the off-topic text's vectors (router/offtopic.py)

meta.json (its schema: core/router_index.py) is replaced atomically and names its index file, so a reader sees one whole build or
the previous one; builds are serialized by `router/.lock` (our own lock: publishing may call
`ensure_index` while it holds the registry's). A stale index (another registry revision, or a
registry edited by hand) is rebuilt; one built with another encoder is refused unless
`rebuild=True`, because silently re-embedding with a different model changes every route.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.encoder import Encoder, canonical_name, load_encoder
from core.jsonl import fsync_dir, fsync_file
from core.registry import Registry, load_registry, utcnow
from core.router_index import (
    INDEX_FORMAT,
    EncoderInfo,
    RouterIndexMeta,
    read_meta,
    router_dir,
    write_meta,
)
from router.offtopic import OFF_TOPIC
from router.route import Router
from router.types import RouterError, ScoringConfig
from router.vectors import HNSW_MIN_VECTORS, index_kind, read_index, write_index

log = logging.getLogger(__name__)


def fingerprint(registry: Registry) -> str:
    """What the index depends on; catches a hand-edited registry whose revision did not move."""
    parts = [(n, e.version, e.description, e.exemplars)
             for n, e in sorted(registry.experts.items())]
    # the off-topic text is indexed too: editing it must rebuild the index
    return hashlib.sha256(json.dumps([parts, OFF_TOPIC]).encode()).hexdigest()[:16]


def ensure_index(experts_dir: str | os.PathLike, encoder: Encoder | str | None = None,
                 rebuild: bool = False) -> Path:
    """Build the index if missing or stale; return its folder. encoder=None keeps the encoder
    the current index was built with (the embedded default for a first build)."""
    return _ensure(Path(experts_dir), encoder, rebuild)[0]


def pending_build(experts_dir: str | os.PathLike, encoder: Encoder | str | None = None,
                  rebuild: bool = False) -> str | None:
    """Why the next load would build the index (None: it is fresh). Raises what load would."""
    registry = load_registry(experts_dir)
    if not registry.experts:
        return None  # load will refuse with the clear message
    if rebuild:
        return "rebuild requested"
    return _stale_reason(read_meta(experts_dir), registry, router_dir(experts_dir), encoder)


def load_router(experts_dir: str | os.PathLike, encoder: Encoder | str | None = None,
                rebuild: bool = False) -> Router:
    experts_dir = Path(experts_dir)
    folder, built = _ensure(experts_dir, encoder, rebuild)
    if built is not None:
        return built
    for _ in range(3):  # a concurrent rebuild may delete the file meta.json named a moment ago
        meta = read_meta(experts_dir)
        if meta is None:
            break
        try:
            index = read_index(folder / meta.index_file)
            offtopic = np.load(folder / meta.offtopic_file) if meta.offtopic_file else None
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            if read_meta(experts_dir) != meta:
                continue  # rebuilt meanwhile (files named a moment ago are gone): read that
            # Truncated or corrupt (a torn copy, a full disk): rebuild from the registry, or
            # every router replica start fails the same way and Serve restarts it forever.
            log.warning("the router index in %s is unreadable (%s): rebuilding it", folder, e)
            folder, built = _ensure(experts_dir, encoder, rebuild=True)
            if built is not None:
                return built
            continue
        enc = load_encoder(encoder if encoder is not None else meta.encoder.name)
        cfg = ScoringConfig(**meta.scoring)
        thr = [meta.thresholds[n] for n in meta.experts]
        return Router(enc, index, meta.experts, thr, cfg, _info(meta, experts_dir), offtopic)
    raise RouterError(f"cannot read the router index in {folder}: delete the folder and retry")


def _ensure(experts_dir: Path, encoder, rebuild: bool) -> tuple[Path, Router | None]:
    registry = load_registry(experts_dir)
    if not registry.experts:
        raise RouterError(f"no experts in {experts_dir / 'registry.json'}: nothing to route to. "
                          "Run `selfspec specialize --all` first (or pass --experts-dir)")
    folder = router_dir(experts_dir)
    meta = read_meta(experts_dir)
    if not rebuild and _stale_reason(meta, registry, folder, encoder) is None:
        return folder, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(folder, e) from e
    with _locked(folder):
        registry = load_registry(experts_dir)  # a publisher may have moved on meanwhile
        meta = read_meta(experts_dir)  # another process may have just built it
        reason = "rebuild requested" if rebuild else \
            _stale_reason(meta, registry, folder, encoder)
        if reason is None:
            return folder, None
        if encoder is None:
            encoder = meta.encoder.name if meta else None
        log.info("building the router index in %s: %s", folder, reason)
        router = _build(experts_dir, registry, encoder)
        try:
            _save(router, folder, registry, experts_dir)
        except OSError as e:
            raise _not_writable(folder, e) from e
        return folder, router


def _not_writable(folder: Path, e: OSError) -> RouterError:
    return RouterError(f"cannot write the router index in {folder} ({e}): make the experts dir "
                       "writable, or build the index once where it is")


def _stale_reason(meta: RouterIndexMeta | None, registry: Registry, folder: Path,
                  encoder) -> str | None:
    if meta is None:
        return "no index yet"
    try:
        built_with, dim = meta.encoder.name, meta.encoder.dim
        if meta.format_version != INDEX_FORMAT:
            return (f"index format {meta.format_version} "
                    f"(this selfspec writes {INDEX_FORMAT})")
        want = canonical_name(encoder) if isinstance(encoder, (str, type(None))) else encoder.name
        if encoder is not None and (want != built_with or
                                    (not isinstance(encoder, str) and encoder.dim != dim)):
            raise RouterError(
                f"the router index in {folder} was built with encoder {built_with!r} (dim {dim}) "
                f"but {want!r} is configured: pass --rebuild-index (rebuild=True) to re-embed "
                "every exemplar with it, or drop --encoder to keep the index's encoder")
        if meta.registry_revision != registry.revision:
            return (f"built from registry revision {meta.registry_revision}, "
                    f"registry is at {registry.revision}")
        if meta.registry_fingerprint != fingerprint(registry):
            return "registry content changed without a new revision"
        if not (folder / meta.index_file).is_file():
            return "index file missing"
        size = (folder / meta.index_file).stat().st_size
        if meta.index_bytes is not None and size != meta.index_bytes:
            return f"index file is {size} bytes, {meta.index_bytes} were written (truncated)"
        if meta.offtopic_file and not (folder / meta.offtopic_file).is_file():
            return "off-topic vectors missing"
    except (KeyError, TypeError, ValueError) as e:
        return f"meta.json incomplete ({e!r})"
    return None


def _build(experts_dir: Path, registry: Registry, encoder) -> Router:
    names = sorted(registry.experts)
    return Router.from_exemplars(
        {n: registry.experts[n].exemplars for n in names}, load_encoder(encoder),
        descriptions={n: registry.experts[n].description for n in names})


def _save(router: Router, folder: Path, registry: Registry, experts_dir: Path) -> None:
    build = f"r{registry.revision}-{uuid.uuid4().hex[:8]}"
    index_file = f"index-{build}.faiss"
    tmp = folder / f".{index_file}.tmp"
    write_index(router.index, tmp)
    fsync_file(tmp)  # on disk before meta.json names it: a power cut must not leave it empty
    os.replace(tmp, folder / index_file)
    offtopic_file = None
    if router.offtopic is not None:
        offtopic_file = f"offtopic-{build}.npy"
        tmp = folder / f".{offtopic_file}.tmp"
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the name
            np.save(f, router.offtopic)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / offtopic_file)
    fsync_dir(folder)  # the renames too
    meta = RouterIndexMeta(
        format_version=INDEX_FORMAT,
        encoder=EncoderInfo(name=router.encoder.name, dim=router.encoder.dim),
        registry_revision=registry.revision,
        registry_fingerprint=fingerprint(registry),
        experts=router.names,
        expert_versions={n: registry.experts[n].version for n in router.names},
        index_file=index_file,
        index_bytes=(folder / index_file).stat().st_size,  # a truncated copy shows as stale
        offtopic_file=offtopic_file,
        offtopic=router.info.get("offtopic"),
        index_kind=index_kind(router.index),
        hnsw_min_vectors=HNSW_MIN_VECTORS,
        n_vectors=int(router.index.ntotal),
        thresholds={n: float(t) for n, t in zip(router.names, router.thresholds)},
        scoring=router.cfg.to_json(),
        calibration=router.info.get("calibration"),
        cv_top1=router.info.get("cv_top1"),
        built=utcnow().isoformat(),
    )
    write_meta(experts_dir, meta)
    fsync_dir(folder)
    for old in [*folder.glob("index-*.faiss"), *folder.glob("offtopic-*.npy")]:
        if old.name not in (index_file, offtopic_file):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    router.info.update(_info(meta, experts_dir))


def _info(meta: RouterIndexMeta, experts_dir: Path) -> dict:
    return {"experts_dir": str(experts_dir), "registry_revision": meta.registry_revision,
            "n_vectors": meta.n_vectors, "calibration": meta.calibration,
            "cv_top1": meta.cv_top1, "encoder": meta.encoder.name, "offtopic": meta.offtopic}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    try:
        lock = open(folder / ".lock", "a")  # noqa: SIM115 - closed below, after the unlock
    except OSError as e:
        raise _not_writable(folder, e) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
