"""How a serving replica follows the registry.

`RegistryWatch`: a cheap poll, one `stat` of registry.json. The publisher replaces the file with
`os.replace`, so a new publish always shows as a new inode/mtime/size; only then is it read.

`RegistryFollower`: what a replica knows of registry.json. Changes are found by a hash of the
file, not its `revision` number (a rollback or a hand edit may reuse a revision), and a replica
marks a version applied only once it acted on it, so a failed reload is tried again. When the
file disappears (a lost NFS mount, a mistaken `rm`) or stops parsing, the replica keeps serving
the last good registry and says why in `problem` (/health reports "degraded"): dropping every
expert would turn a storage hiccup into an outage.

`RetrySchedule`: when to try again what failed (an adapter the engine could not load, a router
index it could not build), backing off from half a minute to half an hour.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from core.registry import REGISTRY_FILE, Registry, RegistryError, load_registry

log = logging.getLogger(__name__)

# Retries of a failure nothing on disk shows (a storage hiccup); a fixed file is retried at once.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 1800.0  # one that keeps failing at most every 30 minutes, not every poll


class RegistryWatch:
    def __init__(self, experts_dir: Path):
        self.path = Path(experts_dir) / REGISTRY_FILE
        self.seen = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:  # missing, or its mount is gone: a change the follower explains
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """True once per change of registry.json since the last call."""
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True


class RegistryFollower:
    def __init__(self, experts_dir: Path):
        self.path = Path(experts_dir) / REGISTRY_FILE
        self.registry: Registry | None = None  # the last good registry read
        self.digest: str | None = None  # sha256 of the file it came from (None: no file yet)
        self.applied: str | None = None  # the digest the replica last acted on
        self._applied_any = False
        self.problem: str | None = None  # why the last good registry is being kept

    def read(self) -> Registry:
        """The registry to serve. The first read raises what `load_registry` raises (the server
        refuses to start on a broken registry); later a missing or broken file keeps the last
        good registry and sets `problem`. A file that never existed is an empty registry (a
        fresh experts dir)."""
        try:
            # Hash first, then parse: if a publish lands in between, the parsed registry is the
            # newer one and the next read sees a new hash and applies it again (idempotent).
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
            registry = load_registry(self.path.parent)
            if not self.path.exists():  # gone between the two reads
                raise FileNotFoundError(self.path)
        except FileNotFoundError:
            if self.digest is None:
                self.registry, self.problem = self.registry or Registry(), None
                return self.registry
            self._keep(f"{REGISTRY_FILE} is missing from the experts dir")
        except (OSError, RegistryError) as e:
            if self.registry is None:
                if isinstance(e, RegistryError):
                    raise
                raise RegistryError(f"cannot read {self.path}: {e}") from e
            self._keep(f"{REGISTRY_FILE} cannot be read ({type(e).__name__})")
        else:
            if self.problem:
                log.warning("%s is back: following it again", self.path)
            self.registry, self.digest, self.problem = registry, digest, None
        return self.registry

    def _keep(self, why: str) -> None:
        problem = (f"{why}: serving the last good registry (revision "
                   f"{self.registry.revision}, {len(self.registry.experts)} experts) until it "
                   "is back")
        if problem != self.problem:
            log.error("%s", problem)
        self.problem = problem

    @property
    def changed(self) -> bool:
        """The registry read last differs from the one the replica last applied."""
        return not self._applied_any or self.digest != self.applied

    def mark_applied(self, digest: str | None) -> None:
        """The replica acted on the registry whose file had this digest (read before acting:
        a newer file read meanwhile stays `changed`)."""
        self.applied, self._applied_any = digest, True


class RetrySchedule:
    """Per key: when a failed attempt is due again (the delay doubles from RETRY_FIRST_S up to
    RETRY_MAX_S)."""

    def __init__(self, first_s: float = RETRY_FIRST_S, max_s: float = RETRY_MAX_S,
                 clock: Callable[[], float] = time.monotonic):
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self._next: dict[str, tuple[float, float]] = {}  # key -> (due at, next delay)

    def failed(self, key: str) -> None:
        delay = self._next[key][1] if key in self._next else self.first_s
        self._next[key] = (self.clock() + delay, min(2 * delay, self.max_s))

    def succeeded(self, key: str) -> None:
        self._next.pop(key, None)

    def due(self, key: str) -> bool:
        return key in self._next and self.clock() >= self._next[key][0]

    def any_due(self) -> bool:
        return any(self.due(k) for k in self._next)


def start_watch(experts_dir: Path, poll_s: float, on_change: Callable[[], Awaitable[object]],
                due: Callable[[], bool] | None = None) -> asyncio.Task | None:
    """Poll in the background of the running event loop: `on_change` runs when registry.json
    changed, or when `due()` says a failed attempt should be retried. Errors are logged, never
    fatal."""
    if poll_s <= 0:
        return None
    watch = RegistryWatch(experts_dir)

    async def loop() -> None:
        while True:
            await asyncio.sleep(poll_s)
            if watch.changed() or (due is not None and due()):
                try:
                    await on_change()
                except Exception:
                    log.exception("reload after a registry change failed; still serving the "
                                  "previous experts")

    return asyncio.get_running_loop().create_task(loop())
