"""The router index's description on disk, `<experts_dir>/router/meta.json`: the encoder and the
registry revision its vectors were built from, the files that hold them, and the calibrated
thresholds. router/index.py writes it (offline after a publish, and online router replicas when
they find it stale) and reads it; this schema is the one place its fields are spelled out.

A meta.json this schema cannot read (torn, hand-edited, of an older format) reads as no index,
and the router rebuilds it from the registry: the index is derived data, the registry is the truth.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from core.registry import atomic_write_text

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # 2: off-topic vectors beside the index (issue 17)
ROUTER_DIR = "router"
META_FILE = "meta.json"


class EncoderInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dim: int


class RouterIndexMeta(BaseModel):
    # Ignore fields a newer writer adds: the index stays readable, its format_version decides.
    model_config = ConfigDict(extra="ignore", frozen=True)

    format_version: int
    encoder: EncoderInfo
    registry_revision: int
    registry_fingerprint: str | None = None  # catches a hand-edited registry
    experts: list[str]
    expert_versions: dict[str, int] = {}
    index_file: str
    index_bytes: int | None = None  # None: written before sizes were recorded
    offtopic_file: str | None = None
    offtopic: dict[str, Any] | None = None  # what the off-topic contrast kept and dropped
    index_kind: str | None = None
    hnsw_min_vectors: int | None = None
    n_vectors: int
    thresholds: dict[str, float]
    scoring: dict[str, Any]  # router.types.ScoringConfig's fields
    calibration: Any = None
    cv_top1: Any = None
    built: str | None = None


def router_dir(experts_dir: str | os.PathLike) -> Path:
    return Path(experts_dir) / ROUTER_DIR


def read_meta(experts_dir: str | os.PathLike) -> RouterIndexMeta | None:
    """The index's meta.json, or None when there is none or it cannot be read (then rebuilt)."""
    path = router_dir(experts_dir) / META_FILE
    try:
        return RouterIndexMeta.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as e:
        log.warning("unreadable %s (%s): it will be rebuilt", path, str(e).splitlines()[0])
        return None


def write_meta(experts_dir: str | os.PathLike, meta: RouterIndexMeta) -> None:
    """Replaced atomically: a reader sees one whole build or the previous one."""
    atomic_write_text(router_dir(experts_dir) / META_FILE, meta.model_dump_json(indent=2) + "\n")
