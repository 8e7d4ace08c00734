"""Routing only to experts that help (router.require_gain): the registry's gain field, the rule,
the ingress's decision and headers, /v1/models, and the eval's `auto` applying the same rule.
Fakes for the engine and router (tests/serve_fakes.py); no Ray, no vLLM."""

from __future__ import annotations

import json

import pytest

from core.errors import RegistryError
from core.registry import GainInfo, gain_refusal, load_registry
from router.types import RouteChoice
from serve.config import build_serve_config
from tests.serve_fakes import ask, make

HELPS = {"metric": "validation_score", "expert": 0.45, "base": 0.38, "diff": 0.07,
         "ci": [0.0, 0.13], "p_not_better": 0.04, "n": 60}
HURTS = {**HELPS, "expert": 0.35, "diff": -0.03, "ci": [-0.1, 0.04], "p_not_better": 0.81}
WEAK = {**HELPS, "diff": 0.02, "ci": [-0.05, 0.08], "p_not_better": 0.3}


def test_the_rule():
    helps, hurts, weak = GainInfo(**HELPS), GainInfo(**HURTS), GainInfo(**WEAK)
    for mode in ("on", "strict"):
        assert gain_refusal(helps, mode) == ""
        assert "did not beat the base model (-0.030" in gain_refusal(hurts, mode)
    assert gain_refusal(None, "on") == ""  # unmeasured: trusted by default
    assert "not measured" in gain_refusal(None, "strict")
    assert gain_refusal(hurts, "off") == gain_refusal(None, "off") == ""
    assert gain_refusal(weak, "on") == ""
    assert "not significant" in gain_refusal(weak, "on", max_p=0.1)
    assert gain_refusal(helps, "on", max_p=0.05) == ""
    zero = GainInfo(**{**HELPS, "diff": 0.0, "p_not_better": 1.0})
    assert gain_refusal(zero, "on") != ""  # no better is not a gain


def serve_with_gains(finance=None, law=None, **router):
    client, engine, _rtr, _service = make(router=router) if router else make()
    engine.cat["experts"]["finance"]["gain"] = finance
    engine.cat["experts"]["law"]["gain"] = law
    return client, engine


def test_auto_sends_an_expert_that_did_not_help_to_the_base():
    client, engine = serve_with_gains(finance=HURTS, law=None)
    raw = client.post("/v1/chat/completions", json=ask("What is a bond's coupon?"))
    assert raw.status_code == 200 and raw.json()["model"] == "base"
    assert raw.headers["x-selfspec-expert"] == "base"
    assert raw.headers["x-selfspec-selection"] == "routed"
    assert raw.headers["x-selfspec-route-score"] == "0.6100"  # the router's own decision kept
    reason = raw.headers["x-selfspec-route-reason"]
    assert reason.startswith("router chose finance, but it did not beat the base model")
    assert reason.endswith(": base model")
    assert raw.headers["x-selfspec-route-gain"] == \
        "finance diff=-0.030 ci=-0.100..+0.040 p=0.81 n=60"
    # an unmeasured expert is trusted under "on"
    raw = client.post("/v1/chat/completions", json=ask("Is this contract valid?"))
    assert raw.json()["model"] == "law" and raw.headers["x-selfspec-route-gain"] == \
        "law unmeasured"
    assert raw.headers["x-selfspec-route-reason"] == "above threshold"
    assert engine.calls == [("chat", None), ("chat", "law")]


def test_an_expert_that_helps_is_routed_to_and_shows_its_gain():
    client, engine = serve_with_gains(finance=HELPS)
    raw = client.post("/v1/completions", json={"model": "auto", "prompt": "bond interest"})
    assert raw.json()["model"] == "finance"
    assert raw.headers["x-selfspec-route-gain"] == \
        "finance diff=+0.070 ci=+0.000..+0.130 p=0.04 n=60"
    assert engine.calls == [("completion", "finance")]


def test_strict_routes_only_to_measured_experts():
    client, engine = serve_with_gains(finance=HELPS, law=None, require_gain="strict")
    assert client.post("/v1/chat/completions", json=ask("bond")).json()["model"] == "finance"
    raw = client.post("/v1/chat/completions", json=ask("a tort case"))
    assert raw.json()["model"] == "base"
    assert "its gain over the base model is not measured" in \
        raw.headers["x-selfspec-route-reason"]
    assert engine.calls == [("chat", "finance"), ("chat", None)]


def test_off_and_max_p():
    client, _engine = serve_with_gains(finance=HURTS, require_gain="off")
    assert client.post("/v1/chat/completions", json=ask("bond")).json()["model"] == "finance"
    client, _engine = serve_with_gains(finance=WEAK, gain_max_p=0.1)
    raw = client.post("/v1/chat/completions", json=ask("bond"))
    assert raw.json()["model"] == "base"
    assert "not significant" in raw.headers["x-selfspec-route-reason"]


def test_forcing_an_expert_ignores_the_rule_but_shows_the_gain():
    client, _engine = serve_with_gains(finance=HURTS)
    raw = client.post("/v1/chat/completions", json=ask("hello", model="finance@v1"))
    assert raw.json()["model"] == "finance" and raw.headers["x-selfspec-selection"] == "forced"
    assert raw.headers["x-selfspec-route-gain"].startswith("finance diff=-0.030")
    raw = client.post("/v1/chat/completions", json=ask("hello", model="base"))
    assert "x-selfspec-route-gain" not in raw.headers


def test_models_show_each_experts_gain_and_the_rule():
    client, _ = serve_with_gains(finance=HELPS, law=None, require_gain="strict")
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["finance"]["gain"] == HELPS and cards["law"]["gain"] is None
    assert cards["auto"]["require_gain"] == "strict" and cards["auto"]["gain_max_p"] == 1.0


def test_require_gain_config():
    assert build_serve_config().router.require_gain == "on"
    # YAML 1.1 reads a bare on/off as a boolean
    assert build_serve_config({"router": {"require_gain": True}}).router.require_gain == "on"
    assert build_serve_config({"router": {"require_gain": False}}).router.require_gain == "off"
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="require_gain"):
        build_serve_config({"router": {"require_gain": "always"}})
    with pytest.raises(ConfigError, match="gain_max_p"):
        build_serve_config({"router": {"gain_max_p": 0}})


# ---------------------------------------------------------------- registry round-trip
ENTRY = {"name": "law", "version": 1, "description": "Law.", "base_model": "tiny",
         "base_model_path": "/m", "path": ".versions/law/v1",
         "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj"]},
         "train": {"examples": 3, "epochs": 1.0}, "exemplars": ["What is a tort?"],
         "created": "2026-01-01T00:00:00Z"}


def write_registry(tmp_path, entry):
    (tmp_path / "registry.json").write_text(json.dumps(
        {"format_version": 1, "revision": 1, "experts": {"law": entry}}))
    return load_registry(tmp_path)


def test_a_registry_written_before_gains_still_loads(tmp_path):
    assert write_registry(tmp_path, ENTRY).experts["law"].gain is None


def test_the_gain_round_trips(tmp_path):
    reg = write_registry(tmp_path, {**ENTRY, "gain": HELPS})
    assert reg.experts["law"].gain == GainInfo(**HELPS)
    (tmp_path / "registry.json").write_text(reg.model_dump_json())
    assert load_registry(tmp_path).experts["law"].gain.model_dump() == HELPS
    with pytest.raises(RegistryError, match="gain"):
        write_registry(tmp_path, {**ENTRY, "gain": {**HELPS, "n": 0}})


def test_publish_stores_the_measured_gain(tmp_path):
    from core.seeds import load_domain
    from specialize.publish import PublishRequest, publish_expert
    from tests.conftest import write_domain
    from tests.test_registry import fake_work

    work, train_dir, train_file = fake_work(tmp_path)
    write_domain(tmp_path / "seeds")
    summary = {"examples": 1, "epochs": 1, "loss_first": 2.0, "loss_last": 1.0, "gain": HURTS}
    entry = publish_expert(PublishRequest(
        domain=load_domain("demo", tmp_path / "seeds"), experts_dir=tmp_path / "experts",
        workdir=work, train_dir=train_dir, train_file=train_file,
        lora={"rank": 8, "alpha": 16, "target_modules": ["q_proj"]}, train_summary=summary,
        base_model="tiny", base_model_path=tmp_path / "base", resolved_config={}, rounds=1,
        n_exemplars=1))
    assert entry.gain == GainInfo(**HURTS)
    saved = json.loads((tmp_path / "experts" / entry.path / "expert.json").read_text())
    assert saved["gain"] == HURTS
    assert load_registry(tmp_path / "experts").experts["demo"].gain == GainInfo(**HURTS)


# ---------------------------------------------------------------- selfspec eval's auto
def test_eval_auto_applies_the_servers_rule(tmp_path):
    from evaluation.backends import DirectBackend, Served

    class Router:
        def route_batch(self, texts):
            return [RouteChoice(expert=t or None, score=0.5) for t in texts]

    backend = DirectBackend.__new__(DirectBackend)  # the engine is not needed to route
    backend.router = Router()
    backend.served = Served("vllm", {}, {"finance": {}, "law": {}, "math": {}})
    backend.gains = {"finance": GainInfo(**HURTS), "law": None, "math": GainInfo(**HELPS)}
    assert backend.route(["finance", "law", "math", "", "biomedicine"]) == \
        [None, "law", "math", None, None]
