"""`selfspec cluster-demo`: the app on a two-node Ray cluster on this machine, and one node lost
in the middle of a request stream.

    head node    GCS, dashboard, Serve controller, the HTTP proxy, the engine (pinned by a custom
                 resource only the head has), one router and one ingress replica
    worker node  the other router and ingress replicas (Serve spreads replicas over nodes)

The app is deployed with Ray's CLI (`serve deploy`), then client threads stream requests
(model="auto" and forced experts) through the head's proxy. After a third of them the worker's
whole process group is SIGKILLed, as a lost machine would be. Requests in flight on the worker
fail; the head's replicas keep answering; the GCS declares the node dead (~15 s of missed
health checks), Serve starts replacement replicas on the head, and "recovered" means: every
deployment HEALTHY again with no replica on the lost node, and every request sent after that
succeeded. Teardown (both process groups) runs in a `finally`, Ctrl-C included.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.cluster_nodes import (
    APP,
    ENGINE_RESOURCE,
    ClusterError,
    Dashboard,
    LocalNode,
    Ports,
    app_state,
    check_free,
    cluster_env,
    placement,
    print_placement,
    ray_bin,
)
from bench.cluster_stream import RequestStream, phases, prompts_for, summary_line
from core.errors import ConfigError


class ClusterDemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experts_dir: Path = Path("experts")
    base_model: str | None = None  # None: the registry's base (the embedded model by default)
    requests: int = Field(36, ge=6)  # a third before the loss, the rest after recovery
    concurrency: int = Field(2, ge=1, le=16)  # 2: both ingress replicas busy when the node goes
    # Each client thread starts a request at most this often: a steady stream, not a flood
    # that starves the replacement replicas of the machine's 2 cores.
    interval_s: float = Field(0.5, ge=0)
    max_tokens: int = Field(8, ge=1)
    port: int = Field(8100, ge=1, le=65535)  # the head's HTTP proxy
    ray_port: int = Field(26300, ge=1024, le=65000)  # GCS; the other Ray ports follow it
    max_model_len: int = Field(1024, ge=128)
    deploy_timeout_s: float = Field(600, gt=0)
    recover_timeout_s: float = Field(300, gt=0)
    request_timeout_s: float = Field(60, gt=0)
    out: Path = Path("reports/cluster_demo.json")


def build_demo_config(**overrides) -> ClusterDemoConfig:
    """CLI flags (None: the default) -> a validated config; errors name the flag."""
    try:
        return ClusterDemoConfig.model_validate(
            {k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        msgs = [f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                for err in e.errors()]
        raise ConfigError("invalid cluster-demo options: " + "; ".join(msgs)) from None


def demo_serve_config(cfg: ClusterDemoConfig, experts_dir: Path) -> dict:
    """The Serve config `serve deploy` gets: deploy/local.yaml's CPU sizes, two routers and two
    ingresses (one per node), the engine pinned to the head, the proxy on the head only (both
    nodes share one IP: a proxy per node would fight over the port)."""
    args = {"experts_dir": str(experts_dir.resolve()), "registry_poll_s": 2.0,
            "engine": {"max_model_len": cfg.max_model_len, "kv_cache_gib": 1,
                       "gpu_memory_utilization": 0.5, "max_num_seqs": 16, "num_cpus": 0.5,
                       "resources": {ENGINE_RESOURCE: 1}},
            "router": {"num_cpus": 0.25,
                       "autoscaling_config": {"min_replicas": 2, "max_replicas": 3,
                                              "target_ongoing_requests": 8}},
            "ingress": {"num_cpus": 0.1, "num_replicas": 2}}
    if cfg.base_model:
        base = Path(cfg.base_model).expanduser()
        args["base_model"] = str(base.resolve()) if base.exists() else cfg.base_model
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": cfg.port},
            "applications": [{"name": APP, "route_prefix": "/",
                              "import_path": "serve.app:build_app", "args": args}]}


def validate_serve_config(config: dict) -> None:
    """Ray's schema and ServeConfig, in milliseconds, before any node starts."""
    from ray.serve.schema import ServeDeploySchema

    from serve.app import resolve_config

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValueError as e:
        raise ConfigError(f"the generated Serve config is invalid: {e}") from None
    resolve_config(schema.applications[0].args)


class ClusterDemo:
    """The demo's steps, in order; `run()` calls them and always tears the cluster down."""

    def __init__(self, cfg: ClusterDemoConfig):
        self.cfg, self.t_start = cfg, time.monotonic()
        self.ports = Ports(cfg.ray_port)
        self.root = Path(tempfile.gettempdir()) / f"sscd-{cfg.ray_port}"  # short: socket paths
        self.token = secrets.token_hex(16)  # this cluster's own Ray auth token
        self.env = cluster_env(self.token)
        self.dash = Dashboard(self.ports.dashboard, self.token)
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.nodes: list[LocalNode] = []
        self.node_names: dict[str, str] = {}  # node id -> head / worker
        self.stream: RequestStream | None = None
        self.timings: dict[str, float] = {}
        self.report: dict = {"config": cfg.model_dump(mode="json"), "timings_s": self.timings,
                             "logs": str(self.root)}

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    def lap(self, name: str, since: float) -> float:
        self.timings[name] = round(time.monotonic() - since, 1)
        return self.timings[name]

    def prepare(self) -> None:
        """Ports, registry and the Serve config, all checked before any process starts."""
        from core.registry import load_registry

        check_free(self.ports.listening() + [self.cfg.port])
        shutil.rmtree(self.root, ignore_errors=True)  # a previous demo's logs (ports were free)
        self.root.mkdir(parents=True)
        experts_dir, synthetic = self.cfg.experts_dir, False
        if not load_registry(experts_dir).experts:
            if self.cfg.base_model:
                raise ConfigError(f"no experts in {experts_dir} for --base-model "
                                  f"{self.cfg.base_model}: publish some there first")
            from bench.serving import synthetic_registry
            self.say(f"no experts in {experts_dir}: publishing 2 synthetic ones (random LoRA "
                     "on the embedded base; `selfspec up --no-serve` makes real ones) ...")
            experts_dir, synthetic = synthetic_registry(self.root / "synthetic"), True
        self.registry = load_registry(experts_dir)
        serve_config = demo_serve_config(self.cfg, experts_dir)
        validate_serve_config(serve_config)
        self.config_path = self.root / "serve-config.yaml"
        self.config_path.write_text(yaml.safe_dump(serve_config, sort_keys=False))
        self.report.update({"synthetic_experts": synthetic, "experts": sorted(
            self.registry.experts), "serve_config": str(self.config_path)})

    def start_nodes(self) -> None:
        p = self.ports
        self.say(f"starting the head node (GCS :{p.gcs}, dashboard :{p.dashboard}) ...")
        self.nodes.append(LocalNode("head", p, self.root, self.env, num_cpus=4).start())
        self.dash.wait_nodes(1, 180, self.nodes)
        self.say("starting the worker node ...")
        self.nodes.append(LocalNode("worker", p, self.root, self.env, num_cpus=2).start())
        alive = self.dash.wait_nodes(2, 180, self.nodes)
        self.node_names = {n["node_id"]: "head" if n["is_head_node"] else "worker"
                           for n in alive}
        self.worker_id = next(i for i, role in self.node_names.items() if role == "worker")
        self.lap("cluster_start", self.t_start)

    def deploy(self) -> None:
        """`serve deploy` (Ray's CLI, through the dashboard), then wait for RUNNING."""
        cmd = [ray_bin("serve"), "deploy", str(self.config_path), "--address", self.dash.url]
        self.say(f"$ serve deploy {self.config_path} --address {self.dash.url}")
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300,
                              check=False)
        if done.returncode != 0:
            raise ClusterError(f"serve deploy failed: {(done.stderr or done.stdout)[-800:]}")
        t0 = time.monotonic()
        wait_until(self.dash, app_state, self.cfg.deploy_timeout_s, self.say, self.nodes,
                   "the app is not RUNNING")
        self.lap("deploy", t0)
        rows = placement(self.dash.serve_details(), self.node_names)
        print_placement("replicas (Serve's placement)", rows)
        self.report["placement_before"] = rows
        if not {r["deployment"] for r in rows if r["node"] == "worker"} & {"router", "ingress"}:
            raise ClusterError("Serve placed no router or ingress replica on the worker node: "
                               "there is nothing to fail over (see the table above)")

    def failover(self) -> bool:
        """Stream, lose the worker, wait for Serve to recover, stream on. True: recovered."""
        cfg, n_before = self.cfg, max(2, self.cfg.requests // 3)
        n_after = cfg.requests - n_before
        self.say(f"streaming requests to {self.url}/v1 ({cfg.concurrency} at a time) ...")
        stream = self.stream = RequestStream(self.url, prompts_for(self.registry), cfg).start()
        wait_for(lambda: sum(r.ok for r in stream.snapshot()) >= n_before
                 or len(stream.snapshot()) >= 3 * n_before, 300, "the first requests")
        if bad := [r for r in stream.snapshot() if not r.ok]:
            raise ClusterError(f"requests failed before any node was lost: {bad[0].error}")
        self.say(f"{len(stream.snapshot())} requests ok; killing the worker node (SIGKILL to "
                 "its process group) ...")
        self.nodes[1].kill()
        self.t_kill, t0 = time.time(), time.monotonic()

        def recovered(details: dict) -> tuple[bool, str]:
            if "worker_declared_dead" not in self.timings:
                if not any(n["node_id"] == self.worker_id and n["state"] == "DEAD"
                           for n in self.dash.nodes()):
                    return False, "waiting for the GCS to declare the worker node dead"
                self.say(f"the GCS declared the worker node DEAD after "
                         f"{self.lap('worker_declared_dead', t0)} s")
            return app_state(details, dead_node=self.worker_id)

        self.first_after = None
        try:
            wait_until(self.dash, recovered, cfg.recover_timeout_s, self.say, self.nodes[:1],
                       "Serve did not recover")
        except ClusterError as e:
            self.say(f"error: {e}")
            return False
        self.say(f"Serve recovered {self.lap('recovered', t0)} s after the loss; sending "
                 f"{n_after} more requests ...")
        self.first_after = stream.finish_after(n_after)
        stream.join(cfg.request_timeout_s * n_after + 30)
        rows = placement(self.dash.serve_details(), self.node_names)
        print_placement("replicas after recovery", rows)
        self.report["placement_after"] = rows
        after = [r for r in stream.snapshot() if r.i >= self.first_after]
        return len(after) == n_after and all(r.ok for r in after)

    def teardown(self) -> None:
        if self.stream is not None:
            self.stream.stop()
        if self.nodes:
            self.say("tearing down both nodes ...")
        for node in reversed(self.nodes):
            node.stop()

    def run(self) -> int:
        self.prepare()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.start_nodes()
            self.deploy()
            recovered = self.failover()
            self.stream.stop()
            results = self.stream.snapshot()
            ph = phases(results, self.t_kill, self.first_after)
            line = summary_line(len(self.node_names), results, ph, recovered)
            self.lap("total", self.t_start)
            self.report.update({
                "summary": line, "nodes": len(self.node_names), "requests": len(results),
                "ok": sum(r.ok for r in results), "recovered": recovered,
                "failed_during_failover": ph["failover"]["failed"], "phases": ph,
                "requests_log": [asdict(r) for r in results]})
            self.say(f"phases: {json.dumps(ph)}; timings (s): {json.dumps(self.timings)}")
            print(line, flush=True)
            return 0 if recovered else 1
        except KeyboardInterrupt:
            self.say("interrupted")
            return 130
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                self.teardown()
                self.cfg.out.parent.mkdir(parents=True, exist_ok=True)
                self.cfg.out.write_text(json.dumps(self.report, indent=2))
                self.say(f"report: {self.cfg.out}; cluster logs: {self.root}")
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cluster_demo(cfg: ClusterDemoConfig) -> int:
    return ClusterDemo(cfg).run()


def wait_until(dash: Dashboard, check, timeout_s: float, say, nodes, what: str) -> None:
    """Poll Serve's details until `check(details)` says ready; a status line every 15 s."""
    deadline, last, status = time.monotonic() + timeout_s, 0.0, ""
    while time.monotonic() < deadline:
        for node in nodes:
            node.check_running()
        try:
            ready, status = check(dash.serve_details())
        except (OSError, ValueError, KeyError) as e:
            ready, status = False, f"dashboard not answering ({type(e).__name__})"
        if ready:
            say(status)
            return
        if time.monotonic() - last > 15:
            say(status)
            last = time.monotonic()
        time.sleep(1.0)
    raise ClusterError(f"{what} after {timeout_s:.0f} s ({status}); Serve's logs: "
                       f"{nodes[0].temp_dir}/session_latest/logs/serve/")


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
