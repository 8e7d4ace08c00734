"""What the ingress talks to: an engine and a router, as two small async interfaces. In Ray
Serve they are deployment handles (`HandleEngine`, `HandleRouter`); unit tests pass in-process
fakes with the same methods, so the whole HTTP layer is tested without Ray or vLLM.

An engine answers one request as a stream of tuples:
    (ERROR, status, body)            the request failed (body: OpenAI error object); nothing else
    (RESPONSE, body)                 a whole non-streaming response (dict)
    (CHUNK, "data: {...}\\n\\n")       one server-sent event of a streaming response
    (USAGE, prompt_tokens, completion_tokens)   last, for the token metrics (never sent on)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from router.types import RouteChoice

ERROR, RESPONSE, CHUNK, USAGE = "error", "response", "chunk", "usage"


class EngineClient(Protocol):
    def generate(self, kind: str, request, expert: str | None) -> AsyncIterator[tuple]: ...

    async def catalog(self) -> dict:
        """{"base": {...}, "experts": {name: {...}}, "skipped": {name: why}, "revision": n}"""
        ...

    async def reload(self) -> dict: ...


class RouterClient(Protocol):
    async def route(self, text: str) -> RouteChoice: ...

    async def reload(self) -> dict: ...

    async def info(self) -> dict: ...


class HandleEngine:
    """EngineClient over the engine deployment's handle (streaming calls for generation)."""

    def __init__(self, handle):
        self.handle = handle
        self.stream = handle.options(stream=True)

    def generate(self, kind, request, expert):
        return self.stream.generate.remote(kind, request, expert)

    async def catalog(self) -> dict:
        return await self.handle.catalog.remote()

    async def reload(self) -> dict:
        return await self.handle.reload.remote()


class HandleRouter:
    def __init__(self, handle):
        self.handle = handle

    async def route(self, text: str) -> RouteChoice:
        return await self.handle.route.remote(text)

    async def reload(self) -> dict:
        return await self.handle.reload.remote()

    async def info(self) -> dict:
        return await self.handle.info.remote()
