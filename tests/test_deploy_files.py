"""The cluster deploy files (deploy/cluster.yaml, kuberay.yaml, cluster-launcher.yaml), the
replica options they use (autoscaling, custom resources), and the pieces of `selfspec
cluster-demo` that need no cluster: each checked with Ray's own schemas, in seconds."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from core.registry import write_registry
from serve.config import build_serve_config
from tests.conftest import REPO
from tests.test_serve_config import entry, registry

DEPLOY = REPO / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture
def tiny_registry(tmp_path) -> Path:
    write_registry(tmp_path, registry(entry("finance"), entry("law")))
    return tmp_path


def bound(app) -> dict:
    """Deployment name -> its bound deployment, from build_app's ingress."""
    ingress = app._bound_deployment
    engine, router, _ = ingress.init_args
    return {d.name: d for d in (ingress, engine._bound_deployment, router._bound_deployment)}


def test_cluster_config_is_a_serve_config_that_builds_the_app(tiny_registry):
    import ray
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    schema = ServeDeploySchema.model_validate(load("cluster.yaml"))
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app" and schema.proxy_location == "EveryNode"
    ray_was_up = ray.is_initialized()
    deployments = bound(build_app({**app.args, "experts_dir": str(tiny_registry)}))
    assert ray.is_initialized() == ray_was_up  # building starts nothing
    engine, router, ingress = (deployments[n] for n in ("engine", "router", "ingress"))
    assert engine.ray_actor_options["num_gpus"] >= 1  # engines land on GPU nodes only
    for cpu_only in (router, ingress):
        assert not cpu_only.ray_actor_options.get("num_gpus")
        assert cpu_only.ray_actor_options["num_cpus"] > 0
    for d in deployments.values():
        auto = d._deployment_config.autoscaling_config
        assert auto is not None and auto.target_ongoing_requests > 0
        assert 1 <= auto.min_replicas <= auto.max_replicas
    # Two routers and two ingresses at least: one lost node never stops routing.
    assert min(router._deployment_config.autoscaling_config.min_replicas,
               ingress._deployment_config.autoscaling_config.min_replicas) >= 2


def test_cluster_config_asks_for_sensible_resources():
    cfg = build_serve_config(load("cluster.yaml")["applications"][0]["args"])
    e = cfg.engine
    assert e.num_gpus == 1 and e.gpu_memory_utilization > 0.5 and e.num_cpus >= 1
    assert e.autoscaling_config.target_ongoing_requests <= e.max_num_seqs  # batches can fill
    assert e.max_ongoing_requests >= e.autoscaling_config.target_ongoing_requests
    assert cfg.router.num_cpus >= 1 and cfg.ingress.num_cpus <= cfg.router.num_cpus
    assert Path(cfg.base_model).is_absolute() and cfg.experts_dir.is_absolute()


def test_kuberay_service_embeds_the_same_app():
    import ray
    from ray.serve.schema import ServeDeploySchema

    svc = load("kuberay.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == load("cluster.yaml")  # one app, two wrappers: they must not drift
    ServeDeploySchema.model_validate(embedded)
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray is the one tested here
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for name in ("cpu", "gpu") for c in groups[name]["template"]["spec"]["containers"]]
    assert gpus == [0, 1]
    args = embedded["applications"][0]["args"]
    mounts = {m["mountPath"] for m in groups["gpu"]["template"]["spec"]["containers"][0]
              ["volumeMounts"]}
    for path in (args["experts_dir"], args["base_model"]):
        assert any(path.startswith(m + "/") for m in mounts), path


def test_cluster_launcher_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster-launcher.yaml")
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does: defaults, then the schema
    validate_config(cfg)  # ray/autoscaler/ray-schema.json, plus Ray's cross-field checks
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["resources"] == {"CPU": 0}  # control plane only
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    # The experts land where deploy/cluster.yaml looks for them.
    experts_dir = load("cluster.yaml")["applications"][0]["args"]["experts_dir"]
    assert any(experts_dir in c for c in cfg["setup_commands"])


# The installed Ray's dashboard HTTP layer (the middleware ray/dashboard/http_server_head.py puts
# in front of every route) answering a job submission, the API that runs code: with no token, a
# wrong one, the right one, and a health check. Prints the four statuses.
DASHBOARD_PROBE = """
import asyncio, os
import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from ray._private.authentication.http_token_authentication import get_token_auth_middleware

async def main():
    async def ran(request):
        return web.Response(text="ran")
    app = web.Application(middlewares=[get_token_auth_middleware(aiohttp, ["/api/gcs_healthz"])])
    app.router.add_post("/api/jobs/", ran)
    app.router.add_get("/api/gcs_healthz", ran)
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    async with TestClient(TestServer(app)) as c:
        for h in ({}, {"Authorization": "Bearer x" + token},
                  {"x-ray-authorization": "Bearer " + token}):  # the header KubeRay sends
            print((await c.post("/api/jobs/", headers=h)).status)
        print((await c.get("/api/gcs_healthz")).status)
asyncio.run(main())
"""


def test_no_ray_dashboard_is_open_to_the_network():
    """The dashboard's job API runs any code, with SELFSPEC_API_KEY in its environment."""
    # The launcher keeps it on the head's loopback (reached through `ray dashboard`'s SSH tunnel).
    head = " ".join(load("cluster-launcher.yaml")["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](\S+)", head)[1] == "127.0.0.1"
    # KubeRay's operator deploys the app through the dashboard from its own pod, so it listens on
    # 0.0.0.0 (KubeRay's default too) and must ask for Ray's token: the environment KubeRay gives
    # every Ray container for authOptions (ray-operator common/pod.go), its token from a Secret.
    cluster = load("kuberay.yaml")["spec"]["rayClusterConfig"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    out = subprocess.run([sys.executable, "-c", DASHBOARD_PROBE], env=env, check=False,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["401", "403", "200", "200"]  # only the token holder runs code


@pytest.mark.parametrize("args,needle", [
    ({"router": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}},
     "not both"),
    ({"engine": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}},
     "min_replicas 3 > max_replicas 2"),
    ({"ingress": {"autoscaling_config": {"max_replicas": 2, "initial_replicas": 5}}},
     "initial_replicas 5"),
    ({"router": {"autoscaling_config": {"target_ongoing_requests": 0}}},
     "router.autoscaling_config.target_ongoing_requests"),
    ({"engine": {"resources": {"gpu_node": -1}}}, "resources"),
])
def test_bad_replica_options_fail_fast(args, needle):
    with pytest.raises(ConfigError) as e:
        build_serve_config(args)
    assert needle in str(e.value)


def test_build_app_passes_autoscaling_and_resources_through(tiny_registry):
    from serve.app import build_app

    d = bound(build_app({"experts_dir": str(tiny_registry),
                         "engine": {"resources": {"selfspec_engine": 1}},
                         "router": {"autoscaling_config": {"min_replicas": 2,
                                                           "max_replicas": 4}},
                         "ingress": {"num_replicas": 3}}))
    assert d["engine"].ray_actor_options["resources"] == {"selfspec_engine": 1}
    assert d["engine"]._deployment_config.autoscaling_config is None
    auto = d["router"]._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (2, 4)
    assert d["ingress"]._deployment_config.num_replicas == 3
    # The replicas re-validate the same dict: a round trip must not trip "not both".
    plain = d["ingress"].init_args[2]
    assert build_serve_config(plain).router.autoscaling_config.max_replicas == 4


# --- selfspec cluster-demo, without a cluster ------------------------------------------------

def test_demo_serve_config_validates_and_places_replicas_for_failover(tiny_registry):
    from ray.serve.schema import ServeDeploySchema

    from bench.cluster_demo import build_demo_config, demo_serve_config, validate_serve_config
    from bench.cluster_nodes import ENGINE_RESOURCE

    cfg = build_demo_config(port=8123)
    config = demo_serve_config(cfg, tiny_registry)
    validate_serve_config(config)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.proxy_location == "HeadOnly"  # both nodes share this machine's IP and port
    assert schema.http_options.port == 8123
    args = build_serve_config(schema.applications[0].args)
    assert args.engine.resources == {ENGINE_RESOURCE: 1}  # the engine never leaves the head
    assert args.engine.num_gpus == 0 and args.engine.gpu_memory_utilization <= 0.5
    assert args.router.autoscaling_config.min_replicas == 2 and args.ingress.num_replicas == 2


def test_demo_ports_leave_rays_defaults_alone():
    from bench.cluster_nodes import LocalNode, Ports

    p = Ports(26300)
    used = set(p.listening())
    for role in ("head", "worker"):
        low, high = p.workers(role)
        used |= set(range(low, high + 1))
    assert len(used) == len(p.listening()) + 400  # no overlap between the two nodes
    assert not used & {6379, 8265, 52365, 10001} and not used & set(range(10002, 20000))
    head = LocalNode("head", p, Path("/tmp/x"), {}, num_cpus=4)
    worker = LocalNode("worker", p, Path("/tmp/x"), {}, num_cpus=2)
    assert "--head" in head.cmd and "--address=127.0.0.1:26300" in worker.cmd
    assert "--block" in head.cmd and "--block" in worker.cmd  # one process group per node
    assert any(a.startswith("--resources=") and "selfspec_engine" in a for a in head.cmd)
    assert not any(a.startswith("--resources=") for a in worker.cmd)


def test_demo_counts_failures_by_phase():
    from bench.cluster_stream import Result, phases, summary_line

    def r(i, t0, t1, ok):
        return Result(i, "auto", t0, t1, ok, 200 if ok else 500, None, None)

    results = [r(0, 0, 1, True), r(1, 1, 2, True),  # before the loss at t=2.5
               r(2, 2, 3, False), r(3, 2.4, 9, True), r(4, 4, 5, False),  # failover
               r(5, 10, 11, True), r(6, 10, 12, True)]  # sent after recovery (index >= 5)
    ph = phases(results, t_kill=2.5, first_after=5)
    assert ph == {"before": {"sent": 2, "ok": 2, "failed": 0},
                  "failover": {"sent": 3, "ok": 1, "failed": 2},
                  "after": {"sent": 2, "ok": 2, "failed": 0}}
    assert summary_line(2, results, ph, True) == \
        "cluster-demo: nodes=2 requests=7 ok=5 failed_during_failover=2 recovered=yes"


def test_demo_reads_serve_details_like_rays_rest_api():
    from bench.cluster_nodes import app_state, placement

    def rep(rid, node, state="RUNNING"):
        return {"replica_id": rid, "node_id": node, "state": state, "pid": 1}

    details = {"applications": {"selfspec": {"status": "RUNNING", "deployments": {
        "engine": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [rep("e", "H")]},
        "router": {"status": "HEALTHY", "target_num_replicas": 2,
                   "replicas": [rep("r1", "H"), rep("r2", "W")]}}}},
        "proxies": {"H": {"status": "HEALTHY"}}}
    assert app_state(details)[0]
    ready, status = app_state(details, dead_node="W")  # a replica still on the lost node
    assert not ready and "router HEALTHY 2/2" in status
    rows = placement(details, {"H": "head", "W": "worker"})
    assert [(r["deployment"], r["node"]) for r in rows] == [
        ("engine", "head"), ("router", "head"), ("router", "worker"), ("http-proxy", "head")]
    assert json.dumps(rows)  # goes into the JSON report as is


def test_cli_wires_cluster_demo(tmp_path):
    from bench.cluster_demo import build_demo_config
    from selfspec.cli import build_parser

    a = build_parser().parse_args(["cluster-demo", "--experts-dir", str(tmp_path),
                                   "--requests", "9", "--port", "9100", "--ray-port", "27000"])
    cfg = build_demo_config(experts_dir=a.experts_dir, base_model=a.base_model,
                            requests=a.requests, concurrency=a.concurrency, port=a.port,
                            ray_port=a.ray_port, out=a.out)
    assert (cfg.experts_dir, cfg.requests, cfg.port, cfg.ray_port) == (tmp_path, 9, 9100, 27000)
    assert cfg.out == Path("reports/cluster_demo.json")
    with pytest.raises(ConfigError, match="--requests"):
        build_demo_config(requests=2)
