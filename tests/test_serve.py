"""The HTTP layer with fakes: an engine that echoes which expert it was asked for and a keyword
router, driven through FastAPI's TestClient and the official `openai` client. No Ray, no vLLM
engine: seconds."""

from __future__ import annotations

import json

import openai
import pytest
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


@pytest.fixture
def app():
    return make()


def oai(client, key="unused"):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                         max_retries=0)


def ask(text, model="auto", **kw):
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def test_auto_routes_and_explains_the_decision(app):
    client, engine, _, _ = app
    raw = oai(client).chat.completions.with_raw_response.create(
        **ask("What is a bond's coupon?"))
    r = raw.parse()
    assert r.model == "finance" and r.choices[0].message.content == "answered by finance"
    assert raw.headers["x-selfspec-expert"] == "finance"
    assert raw.headers["x-selfspec-selection"] == "routed"
    assert raw.headers["x-selfspec-route-score"] == "0.6100"
    assert engine.calls == [("chat", "finance")]


def test_auto_below_threshold_goes_to_base(app):
    client, engine, _, _ = app
    raw = client.post("/v1/chat/completions", json=ask("Tell me a joke"))
    assert raw.status_code == 200 and raw.json()["model"] == "base"
    assert raw.headers["x-selfspec-expert"] == "base"
    assert raw.headers["x-selfspec-route-score"] == "0.1200"
    assert engine.calls == [("chat", None)]


def test_router_choice_not_served_falls_back_to_base(app):
    client, engine, _, _ = app
    raw = client.post("/v1/chat/completions", json=ask("this is broken"))
    assert raw.status_code == 200 and raw.headers["x-selfspec-expert"] == "base"
    assert "broken" in raw.headers["x-selfspec-route-reason"]
    assert engine.calls == [("chat", None)]


@pytest.mark.parametrize("model,expert,mode", [
    ("law", "law", "forced"), ("finance@v1", "finance", "forced"), ("base", None, "base"),
    ("tiny-base", None, "base"), ("/models/tiny", None, "base")])
def test_forced_expert_and_base_aliases(app, model, expert, mode):
    client, engine, _, _ = app
    raw = client.post("/v1/chat/completions", json=ask("What is a bond?", model=model))
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-selfspec-selection"] == mode
    assert "x-selfspec-route-score" not in raw.headers
    assert engine.calls == [("chat", expert)]


def test_unknown_model_is_404_listing_models(app):
    client, engine, _, _ = app
    with pytest.raises(openai.NotFoundError) as e:
        oai(client).chat.completions.create(**ask("hi", model="gpt-4"))
    body = e.value.body
    assert body["param"] == "model" and body["code"] == 404
    assert "auto, base, finance, law" in body["message"]
    skipped = client.post("/v1/chat/completions", json=ask("hi", model="broken")).json()
    assert "left out" in skipped["error"]["message"]
    assert engine.calls == []


def test_completions_and_streaming_carry_headers(app):
    client, *_ = app
    c = oai(client)
    r = c.completions.create(model="auto", prompt="Is a verbal contract binding?", max_tokens=4)
    assert r.model == "law" and r.choices[0].text == "answered by law"
    with c.chat.completions.with_streaming_response.create(
            **ask("bond interest", stream=True)) as s:
        assert s.headers["x-selfspec-expert"] == "finance"
        assert s.headers["content-type"].startswith("text/event-stream")
        chunks = list(s.parse())
    assert "".join(ch.choices[0].delta.content for ch in chunks) == "answered by finance"
    assert {ch.model for ch in chunks} == {"finance"}
    with c.completions.with_streaming_response.create(
            model="base", prompt="x", stream=True) as s:
        assert s.headers["x-selfspec-expert"] == "base"
        assert "".join(ch.choices[0].text for ch in s.parse()) == "answered by base"


def test_token_id_prompt_with_auto_uses_base(app):
    client, *_ = app
    raw = client.post("/v1/completions", json={"model": "auto", "prompt": [1, 2, 3]})
    assert raw.status_code == 200 and raw.headers["x-selfspec-expert"] == "base"
    assert "token-id" in raw.headers["x-selfspec-route-reason"]


MALFORMED = [
    ("chat", b"{not json", "JSON"),
    ("chat", b"[1, 2]", "JSON object"),
    ("chat", b'"text"', "JSON object"),
    ("chat", json.dumps({"model": "auto"}), "messages"),
    ("chat", json.dumps({"model": "auto", "messages": []}), "messages"),
    ("chat", json.dumps({"model": "auto", "messages": "hello"}), "messages"),
    ("chat", json.dumps({"model": "auto", "messages": ["hello"]}), "messages[0]"),
    ("chat", json.dumps(ask("hi") | {"messages": [{"role": "robot", "content": "x"}]}), "role"),
    ("chat", json.dumps({"model": "auto", "messages": [{"content": "x"}]}), "role"),
    ("chat", json.dumps({"model": "auto", "messages": [{"role": "user"}]}), "content"),
    ("chat", json.dumps({"model": "auto", "messages": [{"role": "user", "content": 5}]}),
     "content"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
    ("chat", json.dumps(ask("hi", model="")), "model"),
    ("chat", json.dumps(ask("hi", model=7)), "model"),
    ("chat", json.dumps(ask("hi", max_tokens="many")), "max_tokens"),
    ("chat", json.dumps(ask("hi", temperature=[1])), "temperature"),
    ("chat", json.dumps(ask("hi", stream="sometimes")), "stream"),
    ("chat", json.dumps(ask("hi", best_of=3)), "unsupported"),
    ("chat", json.dumps(ask("hi", chat_template="{{ 7 }}")), "unsupported"),
    ("chat", json.dumps(ask("hi", kv_transfer_params={})), "unsupported"),
    ("chat", json.dumps(ask("\ud800 lone surrogate")), "Unicode"),
    ("completion", json.dumps({"model": "auto"}), "prompt"),
    ("completion", json.dumps({"model": "auto", "prompt": ""}), "prompt"),
    ("completion", json.dumps({"model": "auto", "prompt": {"a": 1}}), "prompt"),
    ("completion", json.dumps({"model": "auto", "prompt": "x", "prompt_embeds": "AAAA"}),
     "unsupported"),
    ("completion", json.dumps({"model": "auto", "prompt": "x", "logprobs": "x"}), "logprobs"),
]


@pytest.mark.parametrize("kind,body,needle", MALFORMED)
def test_malformed_requests_get_400_and_serving_goes_on(app, kind, body, needle):
    client, engine, _, _ = app
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError"
    assert needle.lower() in err["message"].lower() or needle == err["param"]
    assert engine.calls == []
    ok = client.post(path, json=ask("bond") if kind == "chat" else
                     {"model": "auto", "prompt": "bond"})
    assert ok.status_code == 200


def test_engine_errors_pass_through_and_failures_map(app):
    from ray.exceptions import ActorDiedError

    client, engine, _, _ = app
    r = client.post("/v1/chat/completions", json=ask("bond", max_tokens=999))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.headers["x-selfspec-expert"] == "finance"
    engine.fail_with = ActorDiedError()
    r = client.post("/v1/chat/completions", json=ask("bond"))
    assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
    engine.fail_with = RuntimeError("boom")
    r = client.post("/v1/chat/completions", json=ask("bond"))
    assert r.status_code == 500 and "boom" not in r.text  # no internals leak
    engine.fail_with = None
    assert client.post("/v1/chat/completions", json=ask("bond")).status_code == 200
    # A stream the engine refuses before its first chunk: a status, not a stream.
    r = client.post("/v1/chat/completions", json=ask("bond", max_tokens=999, stream=True))
    assert r.status_code == 400 and r.json()["error"]["message"] == "too many"


def test_engine_errors_keep_status_and_body_across_ray():
    """What the engine replica raises reaches the ingress pickled, inside Ray's RayTaskError
    (whose message is not the error's): mapped, it is the engine's own error again."""
    import pickle

    from ray.exceptions import RayTaskError

    from serve.errors import UnknownModelError, map_exception

    refused = EngineRequestError(400, {"error": {"message": "too many", "type": "BadRequestError",
                                                 "param": "max_tokens", "code": 400}})
    gone = UnknownModelError("expert 'law' is not served: not in the registry", "model")
    for err, status, param in ((refused, 400, "max_tokens"), (gone, 404, "model")):
        try:
            raise err
        except Exception as e:  # noqa: BLE001 - wrapped the way Ray wraps a task's error
            sent = RayTaskError("generate", "Traceback (most recent call last): ...", e)
        wrapped = pickle.loads(pickle.dumps(sent)).as_instanceof_cause()
        assert isinstance(wrapped, type(err)) and str(wrapped) != str(err)
        code, body = map_exception(wrapped)
        assert (code, body["error"]["param"]) == (status, param)
        assert body["error"]["message"] == str(err) and "Traceback" not in str(body)


def test_api_key_guards_v1_and_admin_only():
    client, engine, router, _ = make(api_key=KEY)
    with pytest.raises(openai.AuthenticationError):
        oai(client, key="wrong").chat.completions.create(**ask("bond"))
    assert client.post("/v1/chat/completions", json=ask("bond")).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.post("/admin/reload").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert engine.calls == [] and router.reloads == 0
    assert oai(client, key=KEY).chat.completions.create(**ask("bond")).model == "finance"
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("SELFSPEC_API_KEY", KEY)
    client, *_ = make()
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_body_size_is_bounded():
    client, engine, _, _ = make(ingress={"max_body_bytes": 2048})
    big = ask("x" * 4000)
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413

    def chunked():  # no Content-Length: counted while reading
        yield json.dumps(big).encode()

    r = client.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413
    assert engine.calls == []
    assert client.post("/v1/chat/completions", json=ask("bond")).status_code == 200


def test_models_lists_auto_base_and_experts_with_descriptions(app):
    client, *_ = app
    models = oai(client).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["auto", "base", "finance", "law"]
    law = models.data[3].model_dump()
    assert law["description"] == "The law expert." and law["parent"] == "base"
    assert law["root"] == "law@v1"
    assert client.get("/v1/models").json()["skipped"] == {"broken": "vLLM could not load it"}


def test_health_metrics_and_admin_reload(app):
    client, engine, router, _ = app
    h = client.get("/health").json()
    assert h["status"] == "degraded" and h["skipped"] == {"broken": "vLLM could not load it"}
    assert h["experts"] == ["finance", "law"]
    oai(client).chat.completions.create(**ask("bond"))
    oai(client).chat.completions.create(**ask("bond", model="law"))
    client.post("/v1/chat/completions", json=ask("hi", model="nope"))
    m = client.get("/metrics").text
    assert ('selfspec_requests_total{endpoint="/v1/chat/completions",expert="finance",'
            'selection="routed",status="200"} 1.0') in m
    assert 'expert="law",selection="forced",status="200"} 1.0' in m
    assert 'expert="none",selection="none",status="404"} 1.0' in m
    assert 'selfspec_route_score_count{expert="finance"} 1.0' in m
    assert "selfspec_routing_seconds_count 1.0" in m
    assert 'selfspec_tokens_total{expert="law",kind="completion"} 2.0' in m
    r = client.post("/admin/reload").json()
    assert engine.reloads == 1 and router.reloads == 1 and r["registry_revision"] == 3


def test_hot_added_expert_is_found_without_waiting(app):
    client, engine, _, _ = app
    assert client.post("/v1/chat/completions", json=ask("x", model="law")).status_code == 200
    engine.cat["experts"]["math"] = {"lora_name": "math@v1", "version": 1, "rank": 8,
                                     "description": "The math expert."}
    r = client.post("/v1/chat/completions", json=ask("an integral", model="math"))
    assert r.status_code == 200 and r.json()["model"] == "math"
    r = client.post("/v1/chat/completions", json=ask("an integral"))
    assert r.headers["x-selfspec-expert"] == "math"


def test_unknown_routes_answer_in_openai_format(app):
    client, *_ = app
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_routing_calls_gathered_while_one_batch_is_out(monkeypatch):
    """The ingress keeps one routing batch in flight: requests arriving meanwhile go together
    in the next one (serve/clients.py), not as a second small batch on the router's core."""
    import asyncio

    from ray.serve import batching

    from serve.clients import HandleRouter

    # Outside a replica there is no deployment config to compare the batch size with.
    monkeypatch.setattr(batching._BatchQueue,
                        "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)

    class Handle:  # stands in for the router deployment's handle
        def __init__(self):
            self.batches, self.release, self.sent = [], asyncio.Event(), asyncio.Event()
            self.route_many = self

        def remote(self, texts):
            self.batches.append(list(texts))
            self.sent.set()

            async def answer():
                await self.release.wait()
                return [RouteChoice(expert=None, score=0.0, reason=t) for t in texts]
            return answer()

    async def main():
        handle = Handle()
        router = HandleRouter(handle)
        first = asyncio.create_task(router.route("a"))
        await asyncio.wait_for(handle.sent.wait(), 10)  # "a" went alone, at once
        rest = [asyncio.create_task(router.route(t)) for t in "bcd"]
        for _ in range(20):  # let the batcher see them while "a" is out
            await asyncio.sleep(0)
        assert handle.batches == [["a"]]
        handle.release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        return handle.batches, [c.reason for c in answers]

    batches, reasons = asyncio.run(main())
    assert batches == [["a"], ["b", "c", "d"]]
    assert reasons == ["a", "b", "c", "d"]  # every caller gets its own answer
