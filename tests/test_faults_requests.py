"""Fault injection for issue 18's hostile requests and exposure: deeply nested JSON, over-limit
requests, a request past its timeout, a non-loopback bind without a key, the key's sources and
where it shows, and /admin/reload reaching every replica. Each is refused with a clear 4xx (or
at start) while serving goes on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from core.registry import load_registry
from serve.clients import Usage
from serve.config import build_serve_config
from serve.ingress import Service, build_http_app
from tests.serve_fakes import FakeEngine, FakeRouter, ask, oai
from tests.serve_fakes import make as make_service

# --- 9. deeply nested JSON is a 4xx ----------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"[" * 200_000,  # what gave a 500 against a live server
    b'{"model": "auto", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    json.dumps(ask("hi") | {"user": "x", "logit_bias": {}}).encode()[:-1] + b', "stop": ' +
    b"[" * 100 + b"]" * 100 + b"}",
])
def test_deeply_nested_json_is_refused_with_400(body):
    client, engine, _, _ = make_service()
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nests JSON more than 64 levels" in r.json()["error"]["message"]
    assert engine.calls == []
    assert client.post("/v1/chat/completions", json=ask("bond")).status_code == 200


# --- 10. per-request caps and the request timeout ----------------------------------------------

@pytest.mark.parametrize("kind,extra,param,key", [
    ("chat", {"n": 100_000}, "n", "ingress.max_n"),
    ("chat", {"max_tokens": 1_000_000}, "max_tokens", "ingress.max_tokens"),
    ("chat", {"max_completion_tokens": 5000}, "max_completion_tokens", "ingress.max_tokens"),
    ("completion", {"prompt": ["bond"] * 33}, "prompt", "ingress.max_prompts"),
    ("completion", {"prompt": [[1, 2]] * 1024}, "prompt", "ingress.max_prompts"),
    ("completion", {"n": 9}, "n", "ingress.max_n"),
])
def test_requests_over_a_cap_are_refused_naming_it(kind, extra, param, key):
    client, engine, _, _ = make_service()
    oai_client = oai(client)
    call = oai_client.chat.completions.create if kind == "chat" else \
        oai_client.completions.create
    base = {"messages": [{"role": "user", "content": "bond"}]} if kind == "chat" else \
        {"prompt": "bond"}
    with pytest.raises(openai.BadRequestError) as err:
        call(model="auto", **(base | extra))
    body = err.value.body
    assert key in body["message"] and body["param"] == param
    assert engine.calls == []
    at_cap = {"n": 8} if "n" in extra else {"max_tokens": 4096} if "max" in param else \
        {"prompt": ["bond"] * 32}
    assert call(model="auto", **(base | at_cap)).choices  # the limit itself is allowed


def test_caps_come_from_the_ingress_config():
    client, _, _, _ = make_service(ingress={"max_n": 2, "max_tokens": 10, "max_prompts": 1})
    r = client.post("/v1/completions", json={"model": "auto", "prompt": ["a", "b"]})
    assert r.status_code == 400 and "limit of 1 (ingress.max_prompts)" in r.text
    r = client.post("/v1/chat/completions", json=ask("bond", max_tokens=11))
    assert r.status_code == 400 and "limit of 10 tokens" in r.text
    assert client.post("/v1/chat/completions", json=ask("bond", n=2, max_tokens=10)) \
        .status_code == 200


class SlowEngine(FakeEngine):
    """Answers one piece a second: a request that holds the engine."""

    def __init__(self):
        super().__init__()
        self.closed = 0

    async def generate(self, kind, request, expert):
        try:
            async for item in super().generate(kind, request, expert):
                await asyncio.sleep(1.0 if self.calls[-1:] and not isinstance(item, Usage)
                                    else 0)
                yield item
        finally:
            self.closed += 1


def test_request_timeout_is_a_408_and_streams_end_with_an_error():
    engine = SlowEngine()
    service = Service(engine, FakeRouter(),
                      build_serve_config({"ingress": {"request_timeout_s": 0.3}}))
    client = TestClient(build_http_app(service))
    r = client.post("/v1/chat/completions", json=ask("bond"))
    assert r.status_code == 408
    assert "ingress.request_timeout_s" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=ask("bond", stream=True))
    assert r.status_code == 408  # nothing came in time: still a status, not a stream
    service.cfg.ingress.request_timeout_s = 1.5  # the first piece comes, the rest is too slow
    r = client.post("/v1/chat/completions", json=ask("bond", stream=True))
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert "ingress.request_timeout_s" in events[-2] and events[-1] == "data: [DONE]"
    assert engine.closed == 3  # the engine stopped generating each time


# --- 11. exposure: no open server beyond this machine by accident ------------------------------

def test_serving_beyond_loopback_without_a_key_is_refused(tmp_path, monkeypatch):
    from core.errors import ConfigError
    from serve.app import refuse_open_exposure
    from serve.config import build_serve_config

    monkeypatch.delenv("SELFSPEC_API_KEY", raising=False)
    open_cfg = build_serve_config({})
    for host in ("127.0.0.1", "localhost", "::1"):
        refuse_open_exposure(host, open_cfg, insecure_no_auth=False)
    with pytest.raises(ConfigError, match="--host 0.0.0.0 serves beyond this machine"):
        refuse_open_exposure("0.0.0.0", open_cfg, insecure_no_auth=False)
    refuse_open_exposure("0.0.0.0", open_cfg, insecure_no_auth=True)
    refuse_open_exposure("0.0.0.0", build_serve_config({"api_key": "k"}), False)
    monkeypatch.setenv("SELFSPEC_API_KEY", "from-env")
    refuse_open_exposure("10.0.0.5", open_cfg, insecure_no_auth=False)

    experts = tmp_path / "experts"
    experts.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SELFSPEC_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "selfspec.cli", "serve", "--experts-dir",
                          str(experts), "--host", "0.0.0.0"], check=False, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[1], env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--insecure-no-auth" in out.stderr.strip().splitlines()[-1]


def test_api_key_from_a_file(tmp_path):
    from argparse import Namespace

    from core.errors import ConfigError
    from serve.cli import cli_api_key

    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    assert cli_api_key(Namespace(api_key="sk-cli", api_key_file=key)) == "sk-from-file"
    assert cli_api_key(Namespace(api_key="sk-cli", api_key_file=None)) == "sk-cli"
    key.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        cli_api_key(Namespace(api_key=None, api_key_file=key))
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        cli_api_key(Namespace(api_key=None, api_key_file=tmp_path / "missing"))


def test_health_details_need_the_key(monkeypatch):
    client, engine, _, _ = make_service(api_key="sk-health")
    engine.cat["base"]["path"] = "/srv/models/tiny"
    engine.cat["skipped"] = {"broken": "cannot read /srv/experts/.versions/broken/v1"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.get("/health", headers=headers)  # a probe, or anyone who reaches the port
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert "/srv" not in r.text and "broken" not in r.text and "skipped" not in r.json()
    full = client.get("/health", headers={"Authorization": "Bearer sk-health"}).json()
    assert full["skipped"] == engine.cat["skipped"] and full["experts"] == ["finance", "law"]

    async def down():
        from core.errors import RegistryError
        raise RegistryError("engine died reading /srv/experts/registry.json")

    monkeypatch.setattr(engine, "catalog", down)
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}
    r = client.get("/health", headers={"Authorization": "Bearer sk-health"})
    assert r.status_code == 503 and "engine died" in r.json()["error"]["message"]
    # a server without a key serves anyone /v1 anyway: its /health keeps the details
    open_client, _, _, _ = make_service()
    assert "skipped" in open_client.get("/health").json()


def test_ready_message_never_prints_the_key(monkeypatch):
    from serve.cli import ready_message

    reg = load_registry(Path(tempfile.mkdtemp()))  # empty: the base model only
    msg = ready_message("http://10.0.0.5:8000", reg, "sk-secret-123", {"status": "ok"})
    assert "sk-secret-123" not in msg and "$SELFSPEC_API_KEY" in msg
    assert "$SELFSPEC_API_KEY" not in ready_message("http://h:1", reg, None, {"status": "ok"})
    # the pasted example works once the key is in the environment: the shell fills it in
    curl = next(ln for ln in msg.splitlines() if "Authorization" in ln)
    header = curl.split("-H ", 2)[2].rstrip(" \\")
    out = subprocess.run(["bash", "-c", f"echo {header}"],
                         env={"SELFSPEC_API_KEY": "sk-secret-123", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Authorization: Bearer sk-secret-123"


def test_api_key_on_the_command_line_warns(capsys):
    from argparse import Namespace

    from serve.cli import cli_api_key

    assert cli_api_key(Namespace(api_key="sk-cli", api_key_file=None)) == "sk-cli"
    err = capsys.readouterr().err
    assert "shows in `ps`" in err and "--api-key-file" in err and "SELFSPEC_API_KEY" in err
    assert "sk-cli" not in err
    assert cli_api_key(Namespace(api_key=None, api_key_file=None)) is None
    assert capsys.readouterr().err == ""


# --- 5b. /admin/reload reaches every replica, not one of each deployment -----------------------

class LocalActor:
    """A plain object behind Ray's call syntax (`actor.method.remote(...)`, awaited)."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        async def call(*a, **k):
            return method(*a, **k)

        return SimpleNamespace(remote=call)


def test_admin_reload_reaches_every_replica(tmp_path):
    from serve.config import build_serve_config
    from serve.watch import ReloadBoard, broadcast_reload, start_watch

    board = LocalActor(ReloadBoard())
    reloads = {f"engine#{i}": 0 for i in range(3)}
    stuck = asyncio.Event()

    def replica(name):
        async def on_change():
            if name == "engine#2" and not stuck.is_set():
                await asyncio.sleep(3600)  # a reload that hangs (a storage stall)
            reloads[name] += 1
        return start_watch(tmp_path, 0.05, on_change, board=board, replica=name)

    async def scenario():
        tasks = {name: replica(name) for name in reloads}
        await asyncio.sleep(0.3)  # every replica polled once: known to the board
        assert reloads == {n: 0 for n in reloads}  # a start is no reload
        stuck.set()
        out = await broadcast_reload(board, 0.05, timeout_s=5)
        assert out["replicas"] == sorted(reloads) and out["behind"] == []
        assert reloads == {n: 1 for n in reloads}  # each replica, once: not one of them

        stuck.clear()  # engine#2's next reload hangs: the answer names it, after the wait
        out = await broadcast_reload(board, 0.05, timeout_s=0.5)
        assert out["behind"] == ["engine#2"] and reloads["engine#0"] == 2
        tasks["engine#2"].cancel()  # the replica dies: it stops polling and drops out
        stuck.set()
        await asyncio.sleep(3 * 0.05 + 2.0 + 0.2)
        out = await broadcast_reload(board, 0.05, timeout_s=5)
        assert out["replicas"] == ["engine#0", "engine#1"] and out["behind"] == []

        # through the ingress: /admin/reload answers with what every replica did
        service = Service(FakeEngine(), FakeRouter(), build_serve_config({
            "registry_poll_s": 0.05}), board=board)
        body = await service.reload(SimpleNamespace(headers={}))
        assert body["replicas"]["behind"] == [] and reloads["engine#1"] == 4
        assert body["experts"] == ["finance", "law"]
        for t in tasks.values():
            t.cancel()

    asyncio.run(scenario())
