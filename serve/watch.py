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

`ReloadBoard`: how `/admin/reload` reaches every replica. Ray Serve's handles cannot address a
replica, so the ingress bumps a generation on one named actor per app, and every replica's
watch loop polls it with the registry (and reports the generation it acted on); the ingress
waits until each replica seen recently has caught up.
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


class ReloadBoard:
    """The app's reload generation and what each replica last acted on. Runs as a named Ray
    actor (`board_actor`); plain Python, so unit tests drive it directly."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.generation, self.clock = 0, clock
        self.replicas: dict[str, tuple[int, float]] = {}  # replica -> (generation, polled at)

    def bump(self) -> int:
        self.generation += 1
        return self.generation

    def poll(self, replica: str, applied: int | None) -> int:
        """A replica's tick: records the generation it acted on (None: it just started, and
        read the registry fresh, so it counts as current) and answers the current one."""
        self.replicas[replica] = (self.generation if applied is None else applied, self.clock())
        return self.generation

    def status(self, generation: int, fresh_s: float) -> dict:
        """The replicas that polled within `fresh_s` (a dead one stops polling and drops out),
        and which of them have not yet acted on `generation`."""
        now = self.clock()
        fresh = {r: g for r, (g, t) in self.replicas.items() if now - t <= fresh_s}
        return {"replicas": sorted(fresh), "behind": sorted(r for r, g in fresh.items()
                                                           if g < generation)}


BOARD_NAMESPACE = "selfspec"


def board_actor(app: str):
    """The app's ReloadBoard actor, created by whichever replica asks first. Detached: it must
    outlive the replica that created it (a replaced replica would take it down)."""
    import ray

    return ray.remote(num_cpus=0)(ReloadBoard).options(
        name=f"selfspec-reload-{app}", namespace=BOARD_NAMESPACE, lifetime="detached",
        get_if_exists=True).remote()


def replica_identity() -> tuple[str, str] | None:
    """(app, "deployment#replica") when running as a Ray Serve replica, else None."""
    try:
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError:
        return None
    try:
        ctx = serve.get_replica_context()
    except RayServeException:  # not a Serve replica: unit tests, a plain process
        return None
    return ctx.app_name, f"{ctx.deployment}#{ctx.replica_id.unique_id}"


async def broadcast_reload(board, poll_s: float, timeout_s: float) -> dict:
    """Ask every replica to reload (see ReloadBoard) and wait until each replica that polled
    recently acted on it, or `timeout_s` passed. `board` is the actor (or a stand-in whose
    methods have `.remote`)."""
    generation = await board.bump.remote()
    fresh_s = 3 * poll_s + 2.0
    deadline = time.monotonic() + timeout_s
    while True:
        status = await board.status.remote(generation, fresh_s)
        if not status["behind"] or time.monotonic() >= deadline:
            return {"generation": generation, **status}
        await asyncio.sleep(min(0.2, poll_s))


def start_watch(experts_dir: Path, poll_s: float, on_change: Callable[[], Awaitable[object]],
                due: Callable[[], bool] | None = None, board=None,
                replica: str | None = None) -> asyncio.Task | None:
    """Poll in the background of the running event loop: `on_change` runs when registry.json
    changed, when `due()` says a failed attempt should be retried, or when the app's reload
    board has a new generation (`/admin/reload`). Errors are logged, never fatal. In a Serve
    replica the board is found by itself (`board` and `replica` are for tests)."""
    if poll_s <= 0:
        return None
    watch = RegistryWatch(experts_dir)
    if board is None and (me := replica_identity()) is not None:
        app, replica = me
        try:
            board = board_actor(app)
        except Exception:  # without the board the registry poll still works
            log.exception("no reload board: /admin/reload reaches this replica at its next "
                          "registry change only")

    async def ask_board(applied: int | None) -> int | None:
        try:
            return await board.poll.remote(replica, applied)
        except Exception:  # a lost board must not stop the registry watch
            log.warning("reload board unreachable; following the registry only", exc_info=True)
            return applied

    async def loop() -> None:
        applied = None  # the board generation this replica acted on
        while True:
            await asyncio.sleep(poll_s)
            asked = None
            if board is not None:
                current = await ask_board(applied)
                if applied is None:
                    applied = current  # just started: the registry was read fresh
                elif current is not None and current != applied:
                    asked = current
            if asked is not None or watch.changed() or (due is not None and due()):
                try:
                    await on_change()
                except Exception:
                    log.exception("reload after a registry change failed; still serving the "
                                  "previous experts")
                if asked is not None:  # acted on it (a failure is logged and retried)
                    applied = asked
                    await ask_board(applied)  # the waiting ingress sees it now, not next tick

    return asyncio.get_running_loop().create_task(loop())
