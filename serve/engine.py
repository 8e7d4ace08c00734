"""The engine deployment: one vLLM engine holding the base model and every registered expert as
a LoRA adapter (mixed in the same batch), kept in step with the registry.

Start-up: plan the LoRA limits from the registry, start vLLM, validate each adapter
(`core.lora`) and load it; a corrupt or incompatible adapter is left out, logged, and
reported in `catalog()["skipped"]` (shown by /health and /v1/models) while the others serve.
Hot-add: a registry watch (and `reload()`, which /admin/reload calls on every replica through
the app's reload board, serve/watch.py) loads new experts and new versions without a restart. `check_health` fails once the engine process has died, so Ray Serve
replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import entry_points
from pathlib import Path

from ray import serve
from ray.serve.exceptions import RayServeException

from core.registry import ExpertEntry
from serve.adapters import adapter_dir, adapter_signature, check_adapters, plan_engine
from serve.clients import Answer, EngineItem
from serve.config import build_serve_config
from serve.errors import UnknownModelError
from serve.watch import RegistryFollower, RetrySchedule, start_watch

log = logging.getLogger(__name__)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=10)
class EngineServer:
    async def __init__(self, cfg: dict, backend_factory=None):
        self.cfg = build_serve_config(cfg)
        self.experts_dir = Path(self.cfg.experts_dir)
        self.follower = RegistryFollower(self.experts_dir)
        registry = self.follower.read()
        self.plan = plan_engine(self.cfg, registry)
        if backend_factory is None:
            from serve.vllm_backend import VllmBackend as backend_factory
        self.backend = backend_factory(self.cfg, self.plan)
        self.loaded: dict[str, ExpertEntry] = {}  # expert name -> the version being served
        self.skipped: dict[str, str] = {}  # expert name -> why it is left out
        self._skipped_as: dict[str, str] = {}  # expert name -> lora_name that failed
        self.revision = -1
        self._lock = asyncio.Lock()
        # Adapters that failed to load are tried again once their files change (copied in
        # full, permissions fixed) or their backoff delay passed (a failure the files do not
        # show, e.g. an NFS hiccup): a one-off failure must not stick for good.
        self._retries = RetrySchedule()
        self._skipped_sig: dict[str, tuple] = {}  # expert name -> its files when it failed
        digest = self.follower.digest
        await self._sync(registry)
        self.follower.mark_applied(digest)
        log.info("engine up: base %s, experts %s, left out %s", self.plan.base_path,
                 sorted(self.loaded), sorted(self.skipped))
        self._watch = start_watch(self.experts_dir, self.cfg.registry_poll_s, self.reload,
                                  due=self._retries_due)
        self.pinning = None
        await self._isolate_worker_cpus()

    async def _isolate_worker_cpus(self) -> None:
        """Serve's processes off vLLM's CPU worker cores (the CPU plugin's pinning.py); repeated
        at each health check for replicas started since. Found by entry point, not imported:
        without plugins/selfspec-vllm-cpu installed (GPU machines) nothing is pinned."""
        isolate_worker_cpus = next((ep.load() for ep in entry_points(
            group="selfspec.serve", name="isolate_worker_cpus")), None)
        if not self.cfg.engine.isolate_worker_cpus or isolate_worker_cpus is None:
            return
        try:
            app = serve.get_replica_context().app_name
        except RayServeException:  # not running as a Serve replica (unit tests)
            return
        pinning = await asyncio.to_thread(isolate_worker_cpus, app)
        if pinning != self.pinning:
            log.info("CPU pinning: %s", pinning.as_dict() if pinning else "nothing to do")
        self.pinning = pinning

    async def _sync(self, registry) -> None:
        async with self._lock:
            for name in [n for n in self.loaded if n not in registry.experts]:
                self.backend.remove_adapter(name)  # unpublished: stop serving it
                del self.loaded[name]
            for name in [n for n in self.skipped if n not in registry.experts]:
                self.skipped.pop(name), self._skipped_as.pop(name, None)
                self._retries.succeeded(name), self._skipped_sig.pop(name, None)
            serving = {n: e.lora_name for n, e in self.loaded.items()}
            # New experts, new versions, and failed ones whose retry is due.
            todo = [n for n, e in registry.experts.items()
                    if serving.get(n) != e.lora_name and (self._skipped_as.get(n) != e.lora_name
                                                          or self._retry(n, e))]
            verdicts = check_adapters(registry, self.experts_dir, self.plan, names=todo)
            failed = dict(verdicts.skipped)
            for name, entry in verdicts.ok.items():
                try:
                    await self.backend.add_adapter(entry, adapter_dir(entry, self.experts_dir))
                except Exception as e:  # noqa: BLE001 - vLLM's loader errors are varied
                    failed[name] = f"vLLM could not load {entry.adapter_path}: {e}"
                    log.error("expert %s left out: %s", entry.lora_name, failed[name])
                    continue
                self.loaded[name] = entry
                self.skipped.pop(name, None), self._skipped_as.pop(name, None)
                self._retries.succeeded(name), self._skipped_sig.pop(name, None)
            for name, why in failed.items():
                if name not in self.loaded:  # a bad new version keeps the old one serving
                    self.skipped[name] = why
                self._skipped_as[name] = registry.experts[name].lora_name
                self._retries.failed(name)
                self._skipped_sig[name] = adapter_signature(registry.experts[name],
                                                            self.experts_dir)
            self.revision = registry.revision

    async def reload(self) -> dict:
        """Re-read the registry; load what is new. Idempotent and cheap when nothing changed."""
        registry = self.follower.read()  # the last good one if registry.json is gone
        digest = self.follower.digest
        if self.follower.changed or self._retries_due():
            await self._sync(registry)
            self.follower.mark_applied(digest)
        return self.catalog()

    def _retry(self, name: str, entry: ExpertEntry) -> bool:
        """Try a failed adapter again: its backoff passed, or its files changed since."""
        return self._retries.due(name) or \
            adapter_signature(entry, self.experts_dir) != self._skipped_sig.get(name)

    def _retries_due(self) -> bool:
        experts = self.follower.registry.experts if self.follower.registry else {}
        return any(self._retry(n, experts[n]) for n, lora in self._skipped_as.items()
                   if n in experts and experts[n].lora_name == lora)

    def catalog(self) -> dict:
        experts = {name: {"lora_name": e.lora_name, "version": e.version,
                          "description": e.description, "rank": e.lora.rank,
                          # expert - base on its validation split (None: not measured)
                          "gain": e.gain.model_dump() if e.gain else None}
                   for name, e in sorted(self.loaded.items())}
        return {"base": {"aliases": self.plan.base_aliases, "path": str(self.plan.base_path),
                         "max_model_len": getattr(self.backend, "max_model_len", None)},
                "experts": experts, "skipped": dict(sorted(self.skipped.items())),
                "revision": self.revision,
                "registry_problem": self.follower.problem,  # set: serving the last good registry
                # The CPU's instruction set and the dtype the engine computes in (bench reports
                # copy it: a bf16 run on an AVX2-only CPU is not comparable).
                "precision": getattr(self.backend, "precision", None),
                "cpu_pinning": self.pinning.as_dict() if getattr(self, "pinning", None) else None,
                "lora": {"max_lora_rank": self.plan.max_lora_rank,
                         "max_loras": self.plan.max_loras,
                         "max_cpu_loras": self.plan.max_cpu_loras}}

    async def generate(self, kind: str, request, expert: str | None):
        """The request's messages (serve/clients.py); a failed request raises."""
        if expert is not None and expert not in self.loaded:
            await self.reload()  # published a moment ago, before this replica's watch saw it
            if expert not in self.loaded:
                why = self.skipped.get(expert, "not in the registry")
                raise UnknownModelError(f"expert {expert!r} is not served: {why}", "model")
        async for item in self.backend.generate(kind, request, expert):
            yield item

    async def respond(self, kind: str, request, expert: str | None) -> Answer:
        """A non-streaming request in one call."""
        items: list[EngineItem] = [item async for item in self.generate(kind, request, expert)]
        answers = [item for item in items if isinstance(item, Answer)]
        if len(answers) != 1:  # a streaming request sent to the one-call path: a bug (a 500)
            raise RuntimeError(f"the engine answered with {len(answers)} whole responses, "
                               "not one")
        return answers[0]

    async def check_health(self) -> None:
        await self.backend.check_health()
        await self._isolate_worker_cpus()

    def __del__(self):
        if getattr(self, "_watch", None) is not None:
            self._watch.cancel()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.shutdown()
