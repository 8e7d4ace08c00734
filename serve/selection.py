"""Model selection: the request's `model` field -> which expert (or the base model) answers.

    "auto"                          the router decides (an expert, or the base model)
    "<expert>" or "<expert>@v<N>"   that expert (forced)
    "base", the base model's id     no adapter
    anything else                   404 listing what exists

The ingress keeps the engine's catalog (what it actually serves) and refreshes it when a name is
unknown, so an expert hot-added a moment ago is found without waiting for a timer.

With `router.require_gain` (serve/config.py), "auto" keeps the router's expert only if the registry
says it beat the base model on its validation split (core/registry.py `gain_refusal`);
otherwise the base model answers and x-selfspec-route-reason says why. x-selfspec-route-gain
shows the considered (or forced) expert's measured gain.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from core.registry import GainInfo, gain_refusal
from serve.clients import EngineClient, RouterClient
from serve.errors import InvalidRequestError, UnknownModelError

AUTO, BASE = "auto", "base"
CATALOG_TTL_S = 5.0


@dataclass(frozen=True)
class Selection:
    expert: str | None  # None: the base model
    mode: str  # "routed" | "forced" | "base"
    score: float | None = None  # the router's score (routed only)
    reason: str = ""
    route_seconds: float = 0.0
    gain: str = ""  # the expert's measured gain over the base model (see gain_text)

    @property
    def name(self) -> str:
        return self.expert or BASE

    def headers(self) -> dict[str, str]:
        h = {"x-selfspec-expert": self.name, "x-selfspec-selection": self.mode}
        if self.score is not None:
            h["x-selfspec-route-score"] = f"{self.score:.4f}"
        if self.reason:
            h["x-selfspec-route-reason"] = self.reason
        if self.gain:
            h["x-selfspec-route-gain"] = self.gain
        return {k: header_value(v) for k, v in h.items()}


# An absolute path (POSIX or Windows), or one under the home dir: server layout, not for clients.
_PATH = re.compile(r"(?:(?<![\w.~])/|~/|\b[A-Za-z]:\\)[^\s'\"(),;]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def header_value(text: str, limit: int = 200) -> str:
    """A safe HTTP header value: one short ASCII line. A skip reason may hold a newline (uvicorn
    then refuses the whole response: a 500 instead of the base fallback) or an exception's text
    with server paths; both are cut here, whatever the text's source."""
    text = _PATH.sub("<path>", text)
    text = _CONTROL.sub(" ", text).encode("ascii", "replace").decode()
    return " ".join(text.split())[:limit]


class Selector:
    def __init__(self, engine: EngineClient, router: RouterClient, require_gain: str = "on",
                 gain_max_p: float = 1.0):
        self.engine, self.router = engine, router
        # serve.config.RouterOptions: auto answers with an expert only if it helps
        self.require_gain, self.gain_max_p = require_gain, gain_max_p
        self.catalog: dict | None = None
        self.fetched = 0.0
        self._lock = asyncio.Lock()

    async def get_catalog(self, fresh: bool = False) -> dict:
        if fresh or self.catalog is None or time.monotonic() - self.fetched > CATALOG_TTL_S:
            asked = time.monotonic()
            async with self._lock:
                if self.fetched < asked or self.catalog is None:  # else: fetched while we waited
                    self.catalog = await self.engine.catalog()
                    self.fetched = time.monotonic()
        return self.catalog

    async def reload(self) -> dict:
        catalog = await self.engine.reload()
        self.catalog, self.fetched = catalog, time.monotonic()
        return catalog

    async def select(self, model: str, text: str | None) -> Selection:
        if model == AUTO:
            return await self._route(text)
        for fresh in (False, True):
            catalog = await self.get_catalog(fresh)
            if model in catalog["experts"]:
                return Selection(model, "forced", gain=gain_text(model, catalog))
            by_version = {e["lora_name"]: n for n, e in catalog["experts"].items()}
            if model in by_version:
                name = by_version[model]
                return Selection(name, "forced", gain=gain_text(name, catalog))
            if model in catalog["base"]["aliases"]:
                return Selection(None, "base")
        known = [AUTO, BASE, *catalog["experts"]]
        why = ""
        if model in catalog["skipped"]:
            why = f" (expert {model!r} is left out: {catalog['skipped'][model]})"
        raise UnknownModelError(f"the model {model!r} does not exist{why}; available models: "
                                f"{', '.join(known)} (GET /v1/models lists them)", param="model")

    async def _route(self, text: str | None) -> Selection:
        if text is None:
            return Selection(None, "routed", None, "token-id prompt: the router reads text; "
                             "send text or name an expert")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"the text to route is not valid Unicode ({e.reason}); "
                                      "send UTF-8 text", param="messages") from None
        t0 = time.perf_counter()
        choice = await self.router.route(text)
        took = time.perf_counter() - t0
        if choice.expert is None:
            return Selection(None, "routed", choice.score, choice.reason, took)
        catalog = await self.get_catalog()
        if choice.expert not in catalog["experts"]:
            catalog = await self.get_catalog(fresh=True)
        if choice.expert not in catalog["experts"]:
            why = catalog["skipped"].get(choice.expert, "not loaded by the engine")
            return Selection(None, "routed", choice.score,
                             f"router chose {choice.expert}, which is not served ({why[:80]}): "
                             "base model", took)
        gain = catalog["experts"][choice.expert].get("gain")
        shown = gain_text(choice.expert, catalog)
        why = gain_refusal(GainInfo(**gain) if gain else None, self.require_gain,
                           self.gain_max_p)
        if why:  # router.require_gain: an expert that does not help leaves it to the base
            return Selection(None, "routed", choice.score,
                             f"router chose {choice.expert}, but {why}: base model", took, shown)
        return Selection(choice.expert, "routed", choice.score, choice.reason, took, shown)


def gain_text(name: str, catalog: dict) -> str:
    """The x-selfspec-route-gain header: "law diff=+0.062 ci=-0.010..+0.130 p=0.04 n=60" (expert
    - base on its validation split), or "law unmeasured"."""
    g = catalog["experts"].get(name, {}).get("gain")
    if not g:
        return f"{name} unmeasured"
    lo, hi = g["ci"]
    return f"{name} diff={g['diff']:+.3f} ci={lo:+.3f}..{hi:+.3f} p={g['p_not_better']:.2f} " \
           f"n={g['n']}"
