"""The OpenAI endpoint for real on the shared app: routing, forced experts, errors, concurrency."""

from __future__ import annotations

import asyncio
import inspect
import json

import httpx
import openai
import pytest

from tests.integration.conftest import AUTH, SERVE_API_KEY, chat, queries

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_router(serve_app):
    """The same index the router deployment built, loaded here to predict its choices."""
    from router.index import load_router
    return load_router(serve_app[1])


def test_auto_routes_with_decision_headers(client, local_router):
    for q in queries("finance", 2) + queries("law", 2):
        raw = client.chat.completions.with_raw_response.create(**chat(q))
        r = raw.parse()
        want = local_router.route(q)
        assert raw.headers["x-selfspec-expert"] == (want.expert or "base") == r.model
        assert raw.headers["x-selfspec-selection"] == "routed"
        assert abs(float(raw.headers["x-selfspec-route-score"]) - want.score) < 1e-3
        if want.expert in ("finance", "law"):  # finance has a measured gain, law none
            assert raw.headers["x-selfspec-route-gain"] == {
                "finance": "finance diff=+0.100 ci=+0.020..+0.180 p=0.01 n=64",
                "law": "law unmeasured"}[want.expert]
        assert r.choices[0].message.content and r.usage.completion_tokens >= 1


def test_forced_expert_and_base_change_the_output(client):
    q = "Explain what a bond coupon is."
    outs = {}
    for model in ("finance", "law", "base"):
        raw = client.chat.completions.with_raw_response.create(**chat(q, model=model))
        assert raw.headers["x-selfspec-expert"] == model == raw.parse().model
        assert raw.headers["x-selfspec-selection"] == ("base" if model == "base" else "forced")
        outs[model] = raw.parse().choices[0].message.content
    assert len(set(outs.values())) == 3, outs  # each adapter really changes the answer
    again = client.chat.completions.create(**chat(q, model="finance@v1"))
    assert again.model == "finance" and again.choices[0].message.content == outs["finance"]


def test_completions_logprobs_echo_like_lm_eval(client):
    # lm-evaluation-harness local-completions, loglikelihood: echo + logprobs + 1 token, batched
    # prompts, several requests in flight over different adapters (one engine batch).
    from concurrent.futures import ThreadPoolExecutor

    def score(model):
        return client.completions.create(
            model=model, prompt=["The court held that", "A bond pays a fixed coupon"],
            max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(score, ["law", "finance", "base"] * 2))
    for r, model in zip(results, ["law", "finance", "base"] * 2):
        assert r.model == model and len(r.choices) == 2
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith("The court held that")
        assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert results[0].choices[0].logprobs.token_logprobs == \
        results[3].choices[0].logprobs.token_logprobs  # same adapter, same numbers
    assert results[0].choices[0].logprobs.token_logprobs != \
        results[1].choices[0].logprobs.token_logprobs  # another adapter, other numbers


def test_streaming_carries_headers_and_expert(client):
    q = queries("law", 1)[0]
    with client.chat.completions.with_streaming_response.create(**chat(q, stream=True)) as s:
        expert = s.headers["x-selfspec-expert"]
        assert "x-selfspec-route-score" in s.headers
        chunks = list(s.parse())
    assert expert == "law" and {c.model for c in chunks} == {"law"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # the usage chunk we asked for is not leaked
    with client.completions.with_streaming_response.create(
            model="finance", prompt="A bond", max_tokens=4, stream=True,
            stream_options={"include_usage": True}) as s:
        assert s.headers["x-selfspec-expert"] == "finance"
        chunks = list(s.parse())
    assert chunks[-1].usage.completion_tokens == 4


def test_unknown_model_lists_what_exists(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(**chat("hi", model="gpt-4o"))
    assert "auto, base, finance, law" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(**chat("hi", model="biomedicine"))
    assert "left out" in e.value.body["message"]


def test_api_key_is_required_on_v1(serve_app, client):
    url, _ = serve_app
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**chat("hi", model="base"))
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/admin/reload").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200


def test_models_and_health_report_the_corrupt_adapter(serve_app, client):
    url, _ = serve_app
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert list(models)[:2] == ["auto", "base"] and {"finance", "law"} <= set(models)
    assert "biomedicine" not in models
    from core.seeds import load_domain
    assert models["finance"]["description"] == load_domain("finance").description
    # each expert's measured gain over the base (None: unmeasured) and the rule auto applies
    from tests.integration.tiny_experts import TINY_GAINS
    assert models["finance"]["gain"] == TINY_GAINS["finance"] and models["law"]["gain"] is None
    assert models["auto"]["require_gain"] == "on"
    h = httpx.get(f"{url}/health", headers=AUTH).json()
    assert h["status"] == "degraded" and set(h["experts"]) >= {"finance", "law"}
    assert "could not load" in h["skipped"]["biomedicine"]


BAD = [
    b"{oops", b"[]", b"null", json.dumps({"model": "auto"}).encode(),
    json.dumps({"model": "auto", "messages": []}).encode(),
    json.dumps({"model": "auto", "messages": [{"role": "robot", "content": "x"}]}).encode(),
    json.dumps({"model": "auto", "messages": [{"role": "user"}]}).encode(),
    json.dumps({"model": "auto", "messages": [{"role": "user", "content": 5}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
    json.dumps(chat("x") | {"max_tokens": -5}).encode(),
    json.dumps(chat("x") | {"max_tokens": 10**9}).encode(),
    json.dumps(chat("x") | {"max_tokens": "ten"}).encode(),
    json.dumps(chat("x") | {"temperature": -1}).encode(),
    json.dumps(chat("x") | {"top_p": 7}).encode(),
    json.dumps(chat("x") | {"n": 0}).encode(),
    json.dumps(chat("x") | {"logprobs": True, "top_logprobs": 10**6}).encode(),
    json.dumps(chat("x") | {"functions": []}).encode(),
    json.dumps(chat("word " * 3000, model="law")).encode(),  # longer than the 1024 context
]
BAD_COMPLETIONS = [
    json.dumps({"model": "law", "prompt": "x", "max_tokens": 0}).encode(),
    json.dumps({"model": "law", "prompt": "x", "logprobs": 99}).encode(),
    json.dumps({"model": "law", "prompt": [1, 2, 10**9]}).encode(),
    json.dumps({"model": "law", "prompt": "x", "echo": "loud"}).encode(),
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(serve_app, client):
    url, _ = serve_app
    auth = {"Authorization": f"Bearer {SERVE_API_KEY}", "Content-Type": "application/json"}
    cases = [("chat/completions", b) for b in BAD] + [("completions", b) for b in BAD_COMPLETIONS]
    assert len(cases) >= 20
    with httpx.Client(timeout=60) as h:
        for path, body in cases:
            r = h.post(f"{url}/v1/{path}", content=body, headers=auth)
            assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["code"] == r.status_code, err
        ok = client.chat.completions.create(**chat("what is a tort?", model="law"))
        assert ok.model == "law"


def test_64_concurrent_mixed_requests_answered_by_the_chosen_expert(serve_app, local_router):
    url, _ = serve_app
    texts = [q for pair in zip(queries("finance", 32), queries("law", 32)) for q in pair]
    want = [c.expert or "base" for c in local_router.route_batch(texts)]
    assert {"finance", "law"} <= set(want)
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=SERVE_API_KEY, max_retries=0,
                                 timeout=300)

    async def one(text, i):
        kind = i % 3  # chat, streaming chat and completions, all mixed in one engine batch
        if kind == 2:
            raw = await aclient.completions.with_raw_response.create(
                model="auto", prompt=text, max_tokens=8, temperature=0)
            parsed = raw.parse()
            parsed = await parsed if inspect.isawaitable(parsed) else parsed
            return raw.headers["x-selfspec-expert"], parsed.model
        raw = await aclient.chat.completions.with_raw_response.create(
            **chat(text, stream=kind == 1) | {"max_tokens": 8})
        parsed = raw.parse()
        parsed = await parsed if inspect.isawaitable(parsed) else parsed
        if kind == 1:
            models = {c.model async for c in parsed}
            return raw.headers["x-selfspec-expert"], models.pop()
        return raw.headers["x-selfspec-expert"], parsed.model

    async def run():
        try:
            return await asyncio.gather(*(one(t, i) for i, t in enumerate(texts)))
        finally:
            await aclient.close()

    got = asyncio.run(run())
    assert [h for h, _ in got] == want
    assert [m for _, m in got] == want
    h = httpx.get(f"{url}/health", headers=AUTH).json()
    assert h["router"]["max_batch"] > 1  # Serve's batching gathered concurrent routing calls


def test_metrics_count_per_expert(serve_app):
    url, _ = serve_app
    m = httpx.get(f"{url}/metrics").text
    assert 'expert="finance",selection="routed",status="200"' in m
    assert 'expert="law",selection="forced",status="200"' in m
    assert 'selfspec_route_score_count{expert="law"}' in m
    assert 'selfspec_tokens_total{expert="finance",kind="completion"}' in m
    assert "selfspec_routing_seconds_bucket" in m


def test_hostile_requests_get_4xx_and_the_server_keeps_serving(serve_app, client):
    """Issue 18: deep JSON, huge n, too many prompts, CR/LF in the model name: each a 4xx that
    says what was wrong, and the next ordinary request is answered."""
    url, _ = serve_app
    auth = {"Authorization": f"Bearer {SERVE_API_KEY}", "Content-Type": "application/json"}
    cases = [
        ("chat/completions", b"[" * 200_000, 400, "nests JSON"),  # was a 500
        ("chat/completions", json.dumps(chat("x") | {"n": 16384}).encode(), 400, "ingress.max_n"),
        ("chat/completions", json.dumps(chat("x") | {"max_tokens": 10**6}).encode(), 400,
         "ingress.max_tokens"),
        ("completions", json.dumps({"model": "law", "prompt": ["x"] * 1024}).encode(), 400,
         "ingress.max_prompts"),
        ("chat/completions", json.dumps(chat("x", model="law\r\nX-Evil: 1")).encode(), 404,
         "does not exist"),
    ]
    with httpx.Client(timeout=60) as h:
        for path, body, status, needle in cases:
            r = h.post(f"{url}/v1/{path}", content=body, headers=auth)
            assert r.status_code == status, (body[:60], r.status_code, r.text[:300])
            assert needle in r.json()["error"]["message"] and "x-evil" not in r.headers
    assert client.chat.completions.create(**chat("what is a tort?", model="law")).model == "law"


def test_route_headers_are_safe_when_the_router_picks_a_left_out_expert(serve_app):
    """The corrupt biomedicine expert's skip reason holds vLLM's exception text (server paths,
    perhaps newlines); a query routed to it gets the base model and a clean header, not a 500."""
    url, experts = serve_app
    auth = {"Authorization": f"Bearer {SERVE_API_KEY}"}
    for q in queries("biomedicine", 3):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(q), headers=auth, timeout=60)
        assert r.status_code == 200, r.text[:300]
        for name, value in r.headers.items():
            if name.startswith("x-selfspec"):
                assert str(experts) not in value and "\n" not in value, (name, value)
