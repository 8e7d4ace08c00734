"""The serving stack for real: Ray Serve, one vLLM CPU engine on the tiny random Llama with two
tiny published experts (and one corrupt one), the real router, and the official `openai` client.
All tests share one app (conftest `serve_app`); the order matters only at the end (hot-add
changes the registry, the crash test restarts the engine)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time

import httpx
import openai
import pytest

from tests.conftest import REPO
from tests.integration.conftest import SERVE_API_KEY

AUTH = {"Authorization": f"Bearer {SERVE_API_KEY}"}  # /health's details need the key

pytestmark = pytest.mark.integration


def queries(domain: str, n: int) -> list[str]:
    lines = (REPO / "seeds" / domain / "routing.jsonl").read_text().splitlines()
    return [json.loads(line)["query"] for line in lines if line.strip()][:n]


@pytest.fixture(scope="module")
def client(serve_app):
    url, _ = serve_app
    return openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def local_router(serve_app):
    """The same index the router deployment built, loaded here to predict its choices."""
    from router.index import load_router
    return load_router(serve_app[1])


def chat(text, model="auto", **kw):
    return dict(model=model, messages=[{"role": "user", "content": text}], max_tokens=6,
                temperature=0, **kw)


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


def test_health_reports_the_cpu_and_the_dtype_vllm_computes_in(serve_app):
    from core.precision import cpu_isa, resolve_dtype

    url, _ = serve_app
    p = httpx.get(f"{url}/health", headers=AUTH).json()["precision"]
    # The app runs with engine.dtype auto: bf16 only where this CPU has native bf16.
    want = "bfloat16" if cpu_isa().native_bf16 else "float32"
    assert p["dtype_requested"] == "auto" and p["dtype"] == want == resolve_dtype("auto")
    assert p["engine_dtype"] == want  # vLLM's own `auto` would keep the tiny model's choice
    assert p["cpu"]["isa"] == cpu_isa().summary and p["cpu"]["model"] == cpu_isa().model


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


def test_serve_processes_are_kept_off_the_vllm_worker_cores(serve_app):
    import os

    url, _ = serve_app
    health = httpx.get(f"{url}/health", headers=AUTH).json()
    pinning = health["cpu_pinning"]
    if len(os.sched_getaffinity(0)) < 2:  # vLLM binds its worker to every core: nothing to do
        assert pinning is None
        return
    assert pinning, f"no pinning in /health {health}\n{_process_report()}"
    worker, free = pinning["worker_cpus"], pinning["serve_cpus"]
    assert worker and free and not set(worker) & set(free)
    ours = _our_replicas()
    cores, workers = _vllm_processes(ours)
    assert len(ours) == 3 and len(cores) == 1 and workers, _process_report()
    assert all(sorted(w.cpu_affinity()) == worker for w in workers)
    deadline = time.time() + 30  # replicas that started after the engine: next health check
    while any(sorted(p.cpu_affinity()) != free for p in ours) and time.time() < deadline:
        time.sleep(1)
    assert {p.info["cmdline"][0]: sorted(p.cpu_affinity()) for p in ours} == {
        p.info["cmdline"][0]: free for p in ours}


def test_engine_core_naps_instead_of_spinning_after_a_request(serve_app, client):
    ours = _our_replicas()
    core, _ = _vllm_processes(ours)
    assert len(core) == 1, _process_report()
    client.chat.completions.create(**chat("one more question", model="base"))
    before = sum(core[0].cpu_times()[:2])
    time.sleep(0.8)  # inside vLLM's 1 s busy window after the last read: it would spin here
    assert sum(core[0].cpu_times()[:2]) - before < 0.4


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


def test_deleted_registry_keeps_the_experts_answering_and_health_degraded(serve_app, client):
    """A lost mount or a mistaken rm of registry.json: every replica keeps the last good
    registry, /health says degraded and why, and the experts keep answering."""
    url, experts = serve_app
    registry, aside = experts / "registry.json", experts.parent / "registry.json.aside"
    before = httpx.get(f"{url}/health", headers=AUTH).json()
    assert before["registry_problem"] is None
    registry.rename(aside)
    try:
        deadline, h = time.time() + 30, before  # the watch polls every second
        while time.time() < deadline and not h.get("registry_problem"):
            time.sleep(1)
            h = httpx.get(f"{url}/health", headers=AUTH).json()
        assert h["status"] == "degraded" and "registry.json is missing" in h["registry_problem"]
        assert h["experts"] == before["experts"]
        assert str(experts) not in h["registry_problem"]
        time.sleep(2)  # a few more polls: still nothing dropped
        assert client.chat.completions.create(**chat("what is a tort?", model="law")).model \
            == "law"
        raw = client.chat.completions.with_raw_response.create(**chat(queries("finance", 1)[0]))
        assert raw.headers["x-selfspec-selection"] == "routed" and raw.parse().choices
        assert [m.id for m in client.models.list().data] == \
            ["auto", "base", *before["experts"]]
    finally:
        aside.rename(registry)
    deadline = time.time() + 30
    while time.time() < deadline and httpx.get(
            f"{url}/health", headers=AUTH).json()["registry_problem"]:
        time.sleep(1)
    after = httpx.get(f"{url}/health", headers=AUTH).json()
    assert after["registry_problem"] is None and after["experts"] == before["experts"]


def test_hot_add_without_restart(serve_app, client, tiny_model, tmp_path):
    from tests.integration.tiny_experts import publish_tiny_expert

    url, experts = serve_app
    publish_tiny_expert(experts, tiny_model, "math", seed=11, work=tmp_path)
    deadline = time.time() + 60  # the registry watch polls every second
    while time.time() < deadline:
        if "math" in httpx.get(f"{url}/health", headers=AUTH).json()["experts"]:
            break
        time.sleep(1)
    r = httpx.post(f"{url}/admin/reload", timeout=120,  # may rebuild the router's index
                   headers={"Authorization": f"Bearer {SERVE_API_KEY}"}).json()
    assert "math" in r["experts"] and "math" in r["router"]["experts"]
    assert client.chat.completions.create(**chat("2+2?", model="math")).model == "math"
    q = "solve 4x + 7 = 31 show steps"
    raw = client.chat.completions.with_raw_response.create(**chat(q))
    assert raw.headers["x-selfspec-expert"] == "math" == raw.parse().model


def test_crashed_engine_is_restarted_and_serves_again(client):
    # Only the engine under this test's engine replica: the specialize tests' session engine
    # (a child of this process too) and other users' engines must survive.
    replicas = [p for p in _our_replicas() if ":engine" in " ".join(p.info["cmdline"])]
    ours, _ = _vllm_processes(replicas)
    assert ours, f"no vLLM engine process under this test's engine replica\n{_process_report()}"
    for p in ours:
        p.kill()  # the engine core dies; the replica's health check fails; Serve replaces it
    deadline, answer = time.time() + 300, None
    while time.time() < deadline:
        try:
            answer = client.chat.completions.create(**chat("what is a tort?", model="law"))
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(3)
    assert answer is not None and answer.model == "law"


def _our_replicas() -> list:
    """This session's replicas of the `selfspec` app (not the cluster demo's, not other users')."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if "ServeReplica:selfspec:" in " ".join(p.info["cmdline"] or [])
            and _in_this_session(p)]


def _vllm_processes(replicas: list) -> tuple[list, list]:
    """(engine cores, workers) under these replicas, found as the engine replica finds them
    (by title, or by place in the tree when vLLM's titles did not take)."""
    import psutil

    from selfspec_vllm_cpu.pinning import vllm_processes

    found = [vllm_processes(r.pid) for r in replicas]
    return ([psutil.Process(pid) for cores, _ in found for pid in sorted(cores)],
            [psutil.Process(pid) for _, workers in found for pid in sorted(workers)])


def _process_report() -> str:
    """Every Ray and vLLM process on the machine (pid, parent, name, affinity, command line),
    for assertion messages: a failure here is about which process is where."""
    import psutil

    rows, below = [], set()
    for p in psutil.process_iter(["cmdline"]):  # whatever their titles: the replicas' children
        if "ServeReplica:" in " ".join(p.info["cmdline"] or []):
            try:
                below |= {c.pid for c in p.children(recursive=True)}
            except psutil.Error:
                continue
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] not in below and not any(
                k in cmd or k in (p.info["name"] or "") for k in ("ray", "VLLM", "vllm")):
            continue
        try:
            cpus = sorted(p.cpu_affinity())
        except psutil.Error:
            cpus = None
        rows.append(f"{p.info['pid']:>7} {p.info['ppid']:>7} {p.info['name']!s:<16} {cpus} "
                    f"{cmd[:110]}")
    return "processes (pid ppid name cpus cmdline):\n" + "\n".join(rows)


def _in_this_session(proc) -> bool:
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return any(parent.pid == raylet for parent in proc.parents())


def test_app_builder_holds_a_serve_yaml_to_the_exposure_rule(serve_app, monkeypatch):
    """A Serve YAML (`serve run deploy/gpu.yaml`) sets the host in http_options only, which never
    reach the app's args: the builder reads it from the running Serve. Here Serve listens on
    loopback; once the host it reads is a public one, an open app is refused."""
    from core.errors import ConfigError
    from serve import app

    assert app.serve_http_host() == "127.0.0.1"  # the real controller's answer
    monkeypatch.delenv("SELFSPEC_API_KEY", raising=False)
    args = {"experts_dir": str(serve_app[1])}
    app.build_app(args)  # loopback: no key needed
    monkeypatch.setattr(app, "serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(ConfigError, match="0.0.0.0 serves beyond this machine"):
        app.build_app(args)
    app.build_app({**args, "insecure_no_auth": True})
    app.build_app({**args, "api_key": "k"})
