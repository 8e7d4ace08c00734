"""The processes behind the shared app for real: precision, CPU pinning, a lost registry, hot-add,
a crashed engine, the app builder. Runs after test_serve_http_integration.py (file name order):
hot-add changes the registry and the crash test restarts the engine."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.conftest import AUTH, SERVE_API_KEY, chat, queries

pytestmark = pytest.mark.integration


def test_health_reports_the_cpu_and_the_dtype_vllm_computes_in(serve_app):
    from core.precision import cpu_isa, resolve_dtype

    url, _ = serve_app
    p = httpx.get(f"{url}/health", headers=AUTH).json()["precision"]
    # The app runs with engine.dtype auto: bf16 only where this CPU has native bf16.
    want = "bfloat16" if cpu_isa().native_bf16 else "float32"
    assert p["dtype_requested"] == "auto" and p["dtype"] == want == resolve_dtype("auto")
    assert p["engine_dtype"] == want  # vLLM's own `auto` would keep the tiny model's choice
    assert p["cpu"]["isa"] == cpu_isa().summary and p["cpu"]["model"] == cpu_isa().model


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
