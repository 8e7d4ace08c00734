"""Which model answers, with fakes: auto routing, forced experts, models, health, metrics."""

from __future__ import annotations

import openai
import pytest

from router.types import RouteChoice
from tests.serve_fakes import ask, make, oai


@pytest.fixture
def app():
    return make()


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
