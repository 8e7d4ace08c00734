"""Two Ray nodes on one machine for `selfspec cluster-demo`, and what the dashboard's REST API
says about them: nodes alive or dead, Serve's replicas and the node each runs on.

Each node is one `ray start --block` process group (the `ray start` process makes itself the
group leader; the GCS, raylet, agents and every worker it spawns join the group), so one
`killpg` loses a node the way a lost machine does, and teardown never touches another Ray on
this machine: `ray stop` would stop every Ray here, the tests' session included.

Ports are explicit wherever Ray's default is fixed (GCS 6379, dashboard 8265, dashboard agent
52365, client server 10001, worker ports 10002-19999): a Ray started with defaults runs beside
the demo. The cluster uses its own auth token (Ray's token auth), never ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, SelfspecError

APP = "selfspec"  # the Serve application's name
ENGINE_RESOURCE = "selfspec_engine"  # only the head has it: the engine stays on the head
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Serve moves small JSON; Ray's default is 30% of RAM


class ClusterError(SelfspecError):
    """The local cluster did not start, deploy or answer; the message names the log to read."""


@dataclass(frozen=True)
class Ports:
    """Every fixed port of the demo cluster, derived from the GCS port."""

    gcs: int

    @property
    def dashboard(self) -> int:
        return self.gcs + 1

    def agent(self, role: str) -> int:
        return self.gcs + (2 if role == "head" else 3)

    @property
    def client(self) -> int:
        return self.gcs + 4

    def workers(self, role: str) -> tuple[int, int]:
        low = self.gcs + (100 if role == "head" else 300)
        return low, low + 199

    def listening(self) -> list[int]:
        return [self.gcs, self.dashboard, self.agent("head"), self.agent("worker"), self.client]


def check_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                raise ConfigError(f"port {port} is in use (is another cluster-demo running?): "
                                  "pass --ray-port and --port with free ones") from None


def ray_bin(name: str) -> str:
    """`ray` / `serve` of this interpreter's environment, so the cluster runs this code."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class LocalNode:
    """One `ray start --block` process group: the head (with the dashboard) or a worker."""

    def __init__(self, role: str, ports: Ports, root: Path, env: dict,
                 num_cpus: int):
        self.role, self.ports, self.env = role, ports, env
        self.temp_dir = root / role  # short: Ray's unix socket paths must stay < 108 bytes
        self.log = root / f"{role}.log"
        low, high = ports.workers(role)
        cmd = [ray_bin("ray"), "start", "--block", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--object-store-memory={OBJECT_STORE_BYTES}",
               f"--dashboard-agent-listen-port={ports.agent(role)}",
               f"--min-worker-port={low}", f"--max-worker-port={high}"]
        if role == "head":
            cmd += ["--head", f"--port={ports.gcs}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={ports.dashboard}",
                    f"--ray-client-server-port={ports.client}",
                    f"--resources={json.dumps({ENGINE_RESOURCE: 1})}"]
        else:
            cmd += [f"--address=127.0.0.1:{ports.gcs}"]
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalNode:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
        return self

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(f"the {self.role} node exited (code {self.proc.returncode}): "
                               f"see {self.log} and {self.temp_dir}/session_latest/logs")

    def kill(self) -> None:
        """Lose the node: SIGKILL its whole process group, no goodbye to the GCS."""
        self._signal(signal.SIGKILL)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group (Ray's processes exit cleanly), then SIGKILL what is left."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group id is the leader's pid
        except ProcessLookupError:
            pass


class Dashboard:
    """The few REST calls the demo needs: nodes (state API) and Serve's instance details."""

    def __init__(self, port: int, token: str):
        self.url, self.token = f"http://127.0.0.1:{port}", token

    def get(self, path: str, timeout: float = 10.0) -> dict:
        req = urllib.request.Request(self.url + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """[{node_id, state (ALIVE/DEAD), is_head_node, ...}] from Ray's state API."""
        return self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]

    def serve_details(self) -> dict:
        """Ray's ServeInstanceDetails: applications, deployments, replicas with node ids."""
        return self.get("/api/serve/applications/")

    def wait_nodes(self, count: int, timeout_s: float, nodes: list[LocalNode]) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            for node in nodes:
                node.check_running()
            try:
                alive = [n for n in self.nodes() if n["state"] == "ALIVE"]
                if len(alive) >= count:
                    return alive
            except (OSError, ValueError, KeyError):
                pass  # the dashboard is still starting
            if time.monotonic() > deadline:
                raise ClusterError(f"{count} Ray node(s) not up after {timeout_s:.0f} s: see "
                                   f"{nodes[-1].log}")
            time.sleep(1.0)


def placement(details: dict, node_names: dict[str, str]) -> list[dict]:
    """One row per replica (and proxy): deployment, replica, state, node role, pid."""
    rows = []
    app = details.get("applications", {}).get(APP, {})
    for dep_name, dep in sorted(app.get("deployments", {}).items()):
        for rep in dep.get("replicas", []):
            rows.append({"deployment": dep_name, "replica": rep.get("replica_id", "")[-8:],
                         "state": rep.get("state"), "pid": rep.get("pid"),
                         "node": node_names.get(rep.get("node_id"), "?")})
    for node_id, proxy in (details.get("proxies") or {}).items():
        rows.append({"deployment": "http-proxy", "replica": "", "state": proxy.get("status"),
                     "pid": proxy.get("pid"), "node": node_names.get(node_id, "?")})
    return rows


def print_placement(title: str, rows: list[dict]) -> None:
    print(f"{title}:", file=sys.stderr)
    for r in rows:
        print(f"  {r['deployment']:<11} {r['replica']:<9} {r['state']!s:<9} "
              f"{r['node']:<7} pid {r['pid'] or '-'}", file=sys.stderr)


def app_state(details: dict, dead_node: str | None = None) -> tuple[bool, str]:
    """(ready, one-line status): the app RUNNING, every deployment HEALTHY with its target of
    RUNNING replicas, and none of them on `dead_node`."""
    app = details.get("applications", {}).get(APP)
    if not app:
        return False, "app not created yet"
    parts, ready = [], app.get("status") == "RUNNING"
    for name, dep in sorted(app.get("deployments", {}).items()):
        running = [r for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]
        on_dead = [r for r in dep.get("replicas", []) if r.get("node_id") == dead_node]
        ready &= (dep.get("status") == "HEALTHY" and not on_dead
                  and len(running) >= dep.get("target_num_replicas", 1))
        parts.append(f"{name} {dep.get('status')} {len(running)}/"
                     f"{dep.get('target_num_replicas')}")
    if app.get("status") == "DEPLOY_FAILED":
        raise ClusterError(f"the app failed to deploy: {app.get('message', '')[:600]}")
    return ready, f"app {app.get('status')}: " + (", ".join(parts) or "no deployments yet")


def cluster_env(token: str) -> dict:
    """The environment of both nodes and of the `serve` CLI."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env
