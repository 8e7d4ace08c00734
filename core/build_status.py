"""`<experts>/building.json`: which experts a running `selfspec specialize` is still making.

Written (atomically, every couple of seconds) by the specialize run that owns the experts dir
(specialize/progress.py), read by the server for `/health` and `/v1/models`, and by `selfspec up`
for its console. The registry stays the only truth about what is served; this file only says
what is coming and how far it got:

    {"format": 1, "pid": 4242, "updated": "2026-12-06T12:00:00Z",
     "domains": {"legal": {"state": "running", "stage": "respond", "done": 40, "total": 96,
                           "eta_s": 310.0, "elapsed_s": 95.2},
                 "finance": {"state": "queued"}}}

A writer killed without a chance to clean up leaves the file behind; readers treat a file not
refreshed for `STALE_AFTER_S` as absent, so a dead run never shows as "in progress" for long.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.registry import atomic_write_text, utcnow

BUILD_STATUS_FILE = "building.json"
BUILD_STATUS_FORMAT = 1
# The writer refreshes every ~2 s; a minute of silence means it is gone (SIGKILL, power cut).
STALE_AFTER_S = 60.0

State = Literal["queued", "running", "published", "failed"]


class DomainProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: State
    stage: str | None = None  # a pipeline stage (generate, respond, train, ...) or "engine start"
    done: int | None = None  # items of the stage finished (instructions kept, answers, steps)
    total: int | None = None
    eta_s: float | None = None  # the stage's time left at its current rate
    elapsed_s: float | None = None  # time in the stage so far
    error: str | None = None  # one line, for state "failed"


class BuildStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[1] = BUILD_STATUS_FORMAT
    pid: int = Field(default_factory=os.getpid)
    updated: datetime = Field(default_factory=utcnow)
    domains: dict[str, DomainProgress] = Field(default_factory=dict)

    def in_progress(self) -> dict[str, DomainProgress]:
        """The experts still being made: queued or running."""
        return {n: d for n, d in self.domains.items() if d.state in ("queued", "running")}


def build_status_path(experts_dir: str | os.PathLike) -> Path:
    return Path(experts_dir) / BUILD_STATUS_FILE


def write_build_status(experts_dir: str | os.PathLike, status: BuildStatus) -> None:
    status.updated = utcnow()
    atomic_write_text(build_status_path(experts_dir), status.model_dump_json(indent=1) + "\n")


def clear_build_status(experts_dir: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(build_status_path(experts_dir))


def read_build_status(experts_dir: str | os.PathLike,
                      now: datetime | None = None) -> BuildStatus | None:
    """The current status, or None: no run, a stale file, or one this version cannot read
    (a status file is advisory; it never fails a health check)."""
    try:
        status = BuildStatus.model_validate_json(build_status_path(experts_dir).read_bytes())
    except (OSError, ValueError, ValidationError):
        return None
    if (now or utcnow()) - status.updated > timedelta(seconds=STALE_AFTER_S):
        return None
    return status


def describe_in_progress(status: BuildStatus | None) -> dict[str, dict]:
    """What the server puts under "building" in /health and /v1/models: one plain dict per
    expert still being made (empty when nothing is)."""
    if status is None:
        return {}
    return {n: d.model_dump(exclude_none=True) for n, d in status.in_progress().items()}
