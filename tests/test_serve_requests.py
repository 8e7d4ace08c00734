"""Bad requests, engine failures and access control at the ingress, with fakes: 4xx/5xx, API key."""

from __future__ import annotations

import json

import openai
import pytest

from serve.errors import EngineRequestError
from tests.serve_fakes import KEY, ask, make, oai


@pytest.fixture
def app():
    return make()


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
