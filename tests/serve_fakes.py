"""Fakes for the ingress unit tests: an echoing engine, a keyword router, the app over them."""

from __future__ import annotations

import json

import openai
from fastapi.testclient import TestClient

from router.types import RouteChoice
from serve.clients import Answer, Chunk, Usage
from serve.config import build_serve_config
from serve.errors import EngineRequestError
from serve.ingress import Service, build_http_app

KEY = "sk-test-123"


class FakeEngine:
    def __init__(self):
        self.calls, self.reloads = [], 0
        self.cat = {"base": {"aliases": ["base", "tiny-base", "/models/tiny"],
                             "path": "/models/tiny", "max_model_len": 2048},
                    "experts": {n: {"lora_name": f"{n}@v1", "version": 1, "rank": 8,
                                    "description": f"The {n} expert."}
                                for n in ("finance", "law")},
                    "skipped": {"broken": "vLLM could not load it"}, "revision": 3,
                    "lora": {"max_lora_rank": 16, "max_loras": 2, "max_cpu_loras": 6}}
        self.fail_with = None

    async def generate(self, kind, request, expert):
        self.calls.append((kind, expert))
        if self.fail_with is not None:
            raise self.fail_with
        if getattr(request, "max_tokens", None) == 999:  # as vLLM refuses a request
            raise EngineRequestError(400, {"error": {
                "message": "too many", "type": "BadRequestError", "param": "max_tokens",
                "code": 400}})
        model, text = expert or "base", f"answered by {expert or 'base'}"
        if request.stream:
            for piece in (text[:8], text[8:]):
                delta = {"content": piece} if kind == "chat" else None
                choice = {"index": 0, "delta": delta} if kind == "chat" else \
                    {"index": 0, "text": piece}
                yield Chunk("data: " + json.dumps({
                    "id": "x", "object": "chat.completion.chunk" if kind == "chat"
                    else "text_completion", "created": 0, "model": model,
                    "choices": [choice]}) + "\n\n")
            yield Usage(5, 2)
            yield Chunk("data: [DONE]\n\n")
            return
        if kind == "chat":
            body = {"id": "x", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
        else:
            body = {"id": "x", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
        yield Answer(body, Usage(5, 2))

    async def respond(self, kind, request, expert):
        return [item async for item in self.generate(kind, request, expert)][0]  # noqa: RUF015

    async def catalog(self):
        return json.loads(json.dumps(self.cat))

    async def reload(self):
        self.reloads += 1
        return await self.catalog()


class FakeRouter:
    """finance for money words, law for legal words, broken for 'broken', else base."""

    def __init__(self):
        self.reloads = 0

    async def route(self, text):
        t = text.lower()
        for expert, words in (("finance", ("bond", "interest")), ("law", ("contract", "tort")),
                              ("broken", ("broken",)), ("math", ("integral",))):
            if any(w in t for w in words):
                return RouteChoice(expert=expert, score=0.61, scores_by_expert={expert: 0.61},
                                   threshold=0.4, reason="above threshold")
        return RouteChoice(expert=None, score=0.12, scores_by_expert={"finance": 0.12},
                           threshold=0.4, reason="below every threshold")

    async def reload(self):
        self.reloads += 1
        return {"revision": 3}

    async def info(self):
        return {"revision": 3, "experts": ["finance", "law"], "calls": 0}


def make(api_key=None, **cfg):
    engine, router = FakeEngine(), FakeRouter()
    service = Service(engine, router, build_serve_config({"api_key": api_key, **cfg}))
    client = TestClient(build_http_app(service))
    return client, engine, router, service


def oai(client, key="unused"):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                         max_retries=0)


def ask(text, model="auto", **kw):
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}
