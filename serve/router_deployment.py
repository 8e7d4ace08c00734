"""The router deployment (CPU): one encoder forward per batch of queries. The ingress gathers its
concurrent requests itself and calls `route_many(texts)` once per batch (serve/clients.py);
single `route(text)` calls from other callers are gathered here by Serve's `@serve.batch`.
Reloads its index when the registry changes (watch or `reload()`).

With no experts yet, every query goes to the base model: "no expert" is a value, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ray import serve

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
        self._reload_lock = asyncio.Lock()
        self.follower = RegistryFollower(self.experts_dir)
        self._retries = RetrySchedule()  # a failed index load is tried again, not only on change
        # batch_seconds: time inside the router (encode + search), against which callers'
        # timers show what the calls themselves cost
        self.stats = {"calls": 0, "batches": 0, "max_batch": 0, "batch_seconds": 0.0}
        await self.reload()
        self._watch = start_watch(self.experts_dir, self.cfg.registry_poll_s, self.reload,
                                  due=self._retries.any_due)

    def _load_router(self, experts_dir: Path):
        from router.index import load_router, read_meta

        encoder = self.cfg.router.encoder
        held = self.router.encoder if self.router is not None else None
        meta = read_meta(experts_dir)
        want = encoder or (meta.encoder.name if meta else None)
        if held is not None and want is not None and canonical_name(want) == held.name:
            encoder = held  # the same model: a hot-add reloads the index, not the encoder
        return load_router(experts_dir, encoder=encoder)

    async def reload(self) -> dict:
        # One reload at a time: the registry watch and /admin/reload often fire together after
        # a publish, and the second finds the work done.
        async with self._reload_lock:
            # Compared by the file's hash, not its revision (a rollback may reuse one); a
            # missing registry.json keeps the router it has.
            registry = self.follower.read()
            digest = self.follower.digest
            if self.follower.changed or self._retries.any_due():
                # Build aside, then swap: routing keeps using the old index meanwhile.
                try:
                    router = await asyncio.to_thread(self._factory, self.experts_dir) \
                        if registry.experts else None
                except Exception:
                    self._retries.failed("index")
                    raise
                self._retries.succeeded("index")
                self.router, self.revision = router, registry.revision
                self.follower.mark_applied(digest)
                log.info("router at registry revision %d: %s", self.revision,
                         router.describe() if router else "no experts")
        return self.info()

    def info(self) -> dict:
        return {"revision": self.revision, "experts": list(self.router.names) if self.router
                else [], "registry_problem": self.follower.problem, **self.stats}

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
        out = await asyncio.to_thread(self._route_batch, self.router, list(texts))
        self.stats["batch_seconds"] += time.perf_counter() - t0
        return out

    @staticmethod
    def _route_batch(router, texts: list[str]) -> list[RouteChoice]:
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
        return out
