"""The router deployment (CPU): one encoder forward per batch of queries. The ingress gathers its
concurrent requests itself and calls `route_many(texts)` once per batch (serve/clients.py);
single `route(text)` calls from other callers are gathered here by Serve's `@serve.batch`.
Reloads its index when the registry changes (watch or `reload()`).

With no experts yet, every query goes to the base model: "no expert" is a value, not an error.
While a specialize run makes experts (`<experts>/building.json`, what `selfspec up` starts), the
router also scores the shipped seeds of those domains (router/preview.py): a query closest to
one of them is answered by the base model, and its reason names the expert that is coming.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from ray import serve

from core.build_status import read_build_status
from core.encoder import canonical_name
from router.types import RouteChoice, RouterError
from serve.config import build_serve_config
from serve.watch import RegistryFollower, RetrySchedule, start_watch

log = logging.getLogger(__name__)


@serve.deployment
class RouterServer:
    async def __init__(self, cfg: dict, router_factory=None):
        self.cfg = build_serve_config(cfg)
        self.experts_dir = Path(self.cfg.experts_dir)
        self._factory = router_factory or self._load_router
        self.route.set_max_batch_size(self.cfg.router.max_batch_size)
        self.route.set_batch_wait_timeout_s(self.cfg.router.batch_wait_timeout_s)
        self.router, self.revision = None, -1
        self.pending: tuple[str, ...] = ()  # domains being made that the router scores by seeds
        self._building: frozenset[str] | None = None  # building.json's set at the last reload
        self._reload_lock = asyncio.Lock()
        self.follower = RegistryFollower(self.experts_dir)
        self._retries = RetrySchedule()  # a failed index load is tried again, not only on change
        # batch_seconds: time inside the router (encode + search), against which callers'
        # timers show what the calls themselves cost
        self.stats = {"calls": 0, "batches": 0, "max_batch": 0, "batch_seconds": 0.0}
        await self.reload()
        self._watch = start_watch(self.experts_dir, self.cfg.registry_poll_s, self.reload,
                                  due=lambda: self._retries.any_due() or
                                  self._read_building() != self._building)

    def _encoder(self, experts_dir: Path):
        from router.index import read_meta

        encoder = self.cfg.router.encoder
        held = self.router.encoder if self.router is not None else None
        meta = read_meta(experts_dir)
        want = encoder or (meta.encoder.name if meta else None)
        if held is not None and canonical_name(want) == held.name:
            encoder = held  # the same model: a hot-add reloads the index, not the encoder
        return encoder

    def _load_router(self, experts_dir: Path):
        from router.index import load_router

        return load_router(experts_dir, encoder=self._encoder(experts_dir))

    def _read_building(self) -> frozenset[str]:
        status = read_build_status(self.experts_dir)  # None: no run, or a stale file
        return frozenset(status.in_progress() if status else ())

    def _build(self, registry, building: frozenset[str]):
        """(router, pending names): the registry's index, or, while experts are being made,
        a router that also scores their domains' seeds (built in memory, a few seconds)."""
        if building - set(registry.experts):
            from router.preview import preview_router

            built = preview_router(registry, building, self._encoder(self.experts_dir))
            if built is not None:
                return built
        return (self._factory(self.experts_dir) if registry.experts else None), ()

    async def reload(self) -> dict:
        # One reload at a time: the registry watch and /admin/reload often fire together after
        # a publish, and the second finds the work done.
        async with self._reload_lock:
            # Compared by the file's hash, not its revision (a rollback may reuse one); a
            # missing registry.json keeps the router it has.
            registry = self.follower.read()
            digest = self.follower.digest
            building = self._read_building()
            if self.follower.changed or self._retries.any_due() or building != self._building:
                # Build aside, then swap: routing keeps using the old index meanwhile.
                try:
                    router, pending = await asyncio.to_thread(self._build, registry, building)
                except Exception:
                    self._retries.failed("index")
                    raise
                self._retries.succeeded("index")
                self.router, self.revision, self.pending = router, registry.revision, pending
                self._building = building
                self.follower.mark_applied(digest)
                log.info("router at registry revision %d: %s%s", self.revision,
                         router.describe() if router else "no experts",
                         f" (being made, routed by their seeds: {', '.join(pending)})"
                         if pending else "")
        return self.info()

    def info(self) -> dict:
        served = [n for n in self.router.names if n not in self.pending] if self.router else []
        return {"revision": self.revision, "experts": served, "previewing": list(self.pending),
                "registry_problem": self.follower.problem, **self.stats}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def route(self, texts: list[str]) -> list[RouteChoice]:
        return await self.route_many(texts)

    async def route_many(self, texts: list[str]) -> list[RouteChoice]:
        """A batch the caller gathered: routed in one encoder pass, answers in order."""
        self.stats["calls"] += len(texts)
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(texts))
        # Off the event loop: the encoder is CPU work and new requests keep arriving.
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._route_batch, self.router, list(texts), self.pending)
        self.stats["batch_seconds"] += time.perf_counter() - t0
        return out

    @staticmethod
    def _route_batch(router, texts: list[str], pending: tuple[str, ...] = ()
                     ) -> list[RouteChoice]:
        if router is None:
            return [RouteChoice(expert=None, score=0.0,
                                reason="no experts in the registry: base model")
                    for _ in texts]
        t0 = time.perf_counter()
        try:
            out = router.route_batch(texts)
        except RouterError:
            # One bad query must not fail its batch-mates: route them one by one.
            out = []
            for t in texts:
                try:
                    out.append(router.route(t))
                except RouterError as e:
                    out.append(RouteChoice(expert=None, score=0.0,
                                           reason=f"unroutable query: {e}"))
        log.debug("routed %d queries in %.1f ms", len(texts), 1e3 * (time.perf_counter() - t0))
        return [dataclasses.replace(c, expert=None, reason=(
            f"closest to {c.expert} ({c.score:.3f}), whose expert is still being made: "
            "base model")) if c.expert in pending else c for c in out]
