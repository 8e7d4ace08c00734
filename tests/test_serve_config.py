"""Serving config, shipped deploy YAMLs, the builder, LoRA planning, error mapping, the registry
watch and the CLI wiring: everything that must fail (or work) in a second, before an engine."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError, ExpertNotFoundError, RegistryError
from core.registry import ExpertEntry, LoraInfo, Registry, TrainInfo, utcnow, write_registry
from serve.adapters import lora_int_id, plan_engine, round_up_rank
from serve.config import build_serve_config
from serve.errors import InvalidRequestError, PayloadTooLargeError, UnknownModelError, map_exception
from serve.watch import RegistryWatch
from tests.conftest import REPO

# Serve configs; kuberay.yaml and cluster-launcher.yaml wrap them (tests/test_deploy_files.py).
DEPLOY = sorted(p for p in (REPO / "deploy").glob("*.yaml")
                if p.name not in ("kuberay.yaml", "cluster-launcher.yaml"))


def entry(name, rank=8, version=1, base="tiny", base_path="/models/tiny") -> ExpertEntry:
    return ExpertEntry(name=name, version=version, description=f"The {name} domain.",
                       base_model=base, base_model_path=base_path,
                       path=f".versions/{name}/v{version}",
                       lora=LoraInfo(rank=rank, alpha=2 * rank, target_modules=["q_proj"]),
                       train=TrainInfo(examples=1, epochs=1), exemplars=["q"], created=utcnow())


def registry(*entries) -> Registry:
    return Registry(revision=len(entries), experts={e.name: e for e in entries})


def test_shipped_deploy_configs_are_valid_serve_configs():
    from ray.serve.schema import ServeDeploySchema

    assert [p.name for p in DEPLOY] == ["cluster.yaml", "gpu.yaml", "local.yaml"]
    for path in DEPLOY:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        (app,) = schema.applications
        assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
        build_serve_config(app.args)  # every arg is a ServeConfig field with a valid value


def test_gpu_config_asks_for_gpus_and_real_engine_args():
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = yaml.safe_load((REPO / "deploy/gpu.yaml").read_text())["applications"][0]["args"]
    cfg = build_serve_config(args)
    assert cfg.engine.num_gpus >= 1 and cfg.engine.gpu_memory_utilization > 0.5
    assert cfg.base_model and Path(cfg.base_model).is_absolute()
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(cfg.engine.extra_engine_args) <= known


def test_local_config_fits_a_small_cpu_box():
    args = yaml.safe_load((REPO / "deploy/local.yaml").read_text())["applications"][0]["args"]
    cfg = build_serve_config(args)
    assert cfg.engine.num_gpus == 0 and cfg.engine.gpu_memory_utilization <= 0.5
    assert cfg.engine.kv_cache_gib == 1
    assert cfg.engine.num_cpus + cfg.router.num_cpus + cfg.ingress.num_cpus <= 1.0


@pytest.mark.parametrize("args,needle", [
    ({"engine": {"max_lora_rank": 12}}, "max_lora_rank 12"),
    ({"engine": {"max_loras": 4, "max_cpu_loras": 2}}, "max_cpu_loras"),
    ({"enigne": {}}, "enigne"),
    ({"router": {"max_batch_size": 0}}, "router.max_batch_size"),
    ({"registry_poll_s": -1}, "registry_poll_s"),
])
def test_bad_args_fail_fast_with_the_field_named(args, needle):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        build_serve_config(args)
    assert needle in str(e.value) and time.perf_counter() - t0 < 1.0


def _serve_apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def test_build_app_binds_three_deployments_without_starting_anything(tmp_path, monkeypatch):
    import ray

    from serve.app import build_app

    monkeypatch.setenv("SELFSPEC_API_KEY", "k1")
    # The integration tests' Serve app may already be up in this session: building must neither
    # start Ray nor touch a running Serve instance.
    ray_was_up = ray.is_initialized()
    apps_before = _serve_apps() if ray_was_up else None
    app = build_app({"experts_dir": str(tmp_path / "experts")})
    assert ray.is_initialized() == ray_was_up
    if ray_was_up:
        assert _serve_apps() == apps_before
    ingress = app._bound_deployment
    assert ingress.name == "ingress"
    engine, router, cfg = ingress.init_args
    assert engine._bound_deployment.name == "engine" and router._bound_deployment.name == "router"
    assert cfg["api_key"] == "k1" and Path(cfg["experts_dir"]).is_absolute()
    with pytest.raises(ConfigError):
        build_app({"engine": {"num_replicas": 0}})


def test_build_app_refuses_an_unreadable_registry(tmp_path):
    from serve.app import build_app

    (tmp_path / "registry.json").write_text("{broken")
    with pytest.raises(RegistryError):
        build_app({"experts_dir": str(tmp_path)})


def test_lora_limits_come_from_the_registry(monkeypatch):
    monkeypatch.setattr("core.base_model.resolve_base_model", lambda s: Path("/m") / s)
    cfg = build_serve_config({"base_model": "tiny"})
    plan = plan_engine(cfg, registry(entry("a"), entry("b", rank=32), entry("c", rank=7)))
    assert (plan.max_lora_rank, plan.max_loras, plan.max_cpu_loras) == (32, 3, 7)
    many = registry(*[entry(f"e{i}") for i in range(12)])
    plan = plan_engine(cfg, many)
    assert (plan.max_lora_rank, plan.max_loras, plan.max_cpu_loras) == (16, 8, 16)
    plan = plan_engine(cfg, registry())
    assert (plan.max_loras, plan.max_cpu_loras) == (1, 4)
    assert plan.base_aliases == ["base", "tiny", "/m/tiny"]
    fixed = build_serve_config({"base_model": "tiny", "engine": {"max_lora_rank": 64,
                                                                 "max_loras": 2}})
    assert plan_engine(fixed, many).max_lora_rank == 64
    assert plan_engine(fixed, many).max_loras == 2


def test_base_model_defaults_to_the_one_experts_were_trained_on(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    reg = registry(entry("a", base="mine", base_path=str(base)), entry("b", base="mine",
                   base_path=str(base)), entry("c", base="other", base_path="/elsewhere"))
    plan = plan_engine(build_serve_config({}), reg)
    assert plan.base_spec == "mine" and plan.base_path == base


def test_rank_rounding_and_stable_lora_ids():
    assert [round_up_rank(r) for r in (1, 8, 16, 17, 64, 100, 512)] == \
        [16, 16, 16, 32, 64, 128, 512]
    ids = {lora_int_id(f"e{i}@v{v}") for i in range(200) for v in (1, 2)}
    assert len(ids) == 400 and all(1 <= i < 2**31 for i in ids)
    assert lora_int_id("finance@v2") == lora_int_id("finance@v2") != lora_int_id("finance@v3")


@pytest.mark.parametrize("exc,status", [
    (InvalidRequestError("bad", param="x"), 400), (UnknownModelError("no"), 404),
    (PayloadTooLargeError("big"), 413), (ExpertNotFoundError("e"), 404),
    (RegistryError("r"), 503), (ConfigError("c"), 400), (ValueError("v"), 400),
    (RuntimeError("secret detail"), 500)])
def test_errors_map_to_openai_bodies_in_one_place(exc, status):
    code, body = map_exception(exc)
    assert code == status and body["error"]["code"] == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 500:
        assert "secret detail" not in body["error"]["message"]


def test_vllm_errors_keep_their_parameter():
    from vllm.exceptions import VLLMValidationError

    code, body = map_exception(VLLMValidationError("too long", parameter="max_tokens", value=9))
    assert code == 400 and body["error"]["param"] == "max_tokens"


def test_registry_watch_sees_an_atomic_replace(tmp_path):
    write_registry(tmp_path, registry(entry("a")))
    watch = RegistryWatch(tmp_path)
    assert not watch.changed()
    write_registry(tmp_path, registry(entry("a"), entry("b")))
    assert watch.changed() and not watch.changed()
    os.unlink(tmp_path / "registry.json")
    assert watch.changed()


def test_cli_wires_serve_up_and_bench_serving():
    from selfspec.cli import build_parser

    p = build_parser()
    a = p.parse_args(["serve", "--experts-dir", "x", "--port", "9000", "--api-key", "k"])
    assert (a.experts_dir, a.port, a.api_key) == (Path("x"), 9000, "k")
    a = p.parse_args(["up", "--domains", "law", "--no-serve"])
    assert a.domains == ["law"] and a.no_serve
    a = p.parse_args(["bench", "serving", "--requests", "8"])
    assert a.target == "serving" and a.requests == 8
    assert p.parse_args(["bench", "router"]).target == "router"  # router/cli.py's still works
    a = p.parse_args(["bench", "serving", "--rounds", "5", "--latency-pairs", "8"])
    assert (a.rounds, a.latency_pairs) == (5, 8)
    for bad in (["--rounds", "0"], ["--concurrency", "-3"], ["--max-tokens", "many"]):
        with pytest.raises(SystemExit):  # argparse: a one-line usage error, nothing started
            p.parse_args(["bench", "serving", *bad])


def test_deploy_settings_read_the_yaml_and_flags_win(tmp_path):
    from serve.app import resolve_config
    from serve.cli import deploy_settings

    s = deploy_settings(REPO / "deploy/local.yaml")
    assert (s["name"], s["route_prefix"], s["host"], s["port"]) == \
        ("selfspec", "/", "127.0.0.1", 8000)
    cfg = resolve_config(s["args"], experts_dir=tmp_path, api_key="k")
    assert cfg.experts_dir == tmp_path.resolve() and cfg.api_key == "k"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "a:b"}]}))
    with pytest.raises(ConfigError):
        deploy_settings(bad)


def test_up_serves_first_then_specializes_only_what_is_missing(tmp_path, monkeypatch):
    from selfspec import up
    from serve import cli

    write_registry(tmp_path, registry(entry("law")))
    calls = []

    class FakeServer:
        url = "http://127.0.0.1:9001"

        def stop(self):
            calls.append("stop")

    def fake_start(cfg, host, port, name, prefix, verbose, experts):
        calls.append(("serve", cfg.experts_dir, host, port, name, experts))
        return FakeServer()

    def fake_sleep(s):  # the serving loop: Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "start_serving", fake_start)
    monkeypatch.setattr(cli, "_health", lambda url, key=None: {"status": "ok"})
    monkeypatch.setattr(up, "start_specialize", lambda cmd, log: calls.append(("child", cmd)))
    monkeypatch.setattr(up, "watch_child", lambda child, cfg, url, domains: calls.append(
        ("watch", url, domains)) or 0)
    monkeypatch.setattr(up.time, "sleep", fake_sleep)
    from selfspec.cli import main
    assert main(["up", "--experts-dir", str(tmp_path), "--domains", "law", "finance",
                 "--port", "9001", "--base-model", str(tmp_path)]) == 130
    serve, (what, cmd), watch, stop = calls
    assert serve == ("serve", tmp_path.resolve(), "127.0.0.1", 9001, "selfspec", 1)
    assert what == "child"  # after the server is up
    # Only the missing domain, each published as soon as it is ready, at a lower priority.
    assert cmd[cmd.index("specialize", 3):] == [
        "specialize", "finance", "--experts-dir", str(tmp_path.resolve()), "--base-model",
        str(tmp_path), "--resume", "--publish-each"]
    assert cmd[:3] == [cmd[0], "-n", str(up.NICENESS)] and cmd[0].endswith("nice")
    assert watch == ("watch", FakeServer.url, ["finance"]) and stop == "stop"


def test_ready_message_is_pasteable():
    from serve.cli import ready_message

    reg = registry(entry("finance"), entry("law"))
    msg = ready_message("http://127.0.0.1:8000", reg, "k9", {"status": "degraded",
                        "skipped": {"math": "rank 7 is not one of vLLM's ranks\nmore"}})
    assert "http://127.0.0.1:8000/v1" in msg and "k9" not in msg  # never the key itself
    assert 'Authorization: Bearer $SELFSPEC_API_KEY"' in msg
    assert "api_key='$SELFSPEC_API_KEY'" in msg  # inside python -c "...": the shell expands it
    assert "left out: math: rank 7" in msg and "model='auto'" in msg
    curl = next(ln for ln in msg.splitlines() if ln.strip().startswith("-d "))
    json.loads(curl.strip()[4:-1])  # the -d body is valid JSON
