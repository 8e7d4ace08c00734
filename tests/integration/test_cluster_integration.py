"""`selfspec cluster-demo`, small: a head and a worker Ray node on this machine, the app on the
tiny random Llama with two tiny experts deployed by `serve deploy`, the worker killed mid-stream.

It runs as a subprocess with its own Ray ports, temp dir and auth token, so the session Ray of
the serving tests (tests/integration/conftest.py `serve_app`) is never touched. ~2 minutes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

RAY_PORT = 26800  # not the demo's default 26300: a `make cluster-demo` may be running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_experts(tmp_path_factory, tiny_model):
    from tests.integration.tiny_experts import build_tiny_experts

    root = tmp_path_factory.mktemp("cluster")
    return build_tiny_experts(root / "experts", tiny_model, root / "work")


def test_cluster_demo_survives_losing_the_worker_node(cluster_experts, tiny_model, tmp_path):
    out = tmp_path / "cluster_demo.json"
    requests = 9  # 3 before the loss, 6 after recovery, plus whatever is sent in between
    done = subprocess.run(
        [sys.executable, "-m", "selfspec.cli", "cluster-demo",
         "--experts-dir", str(cluster_experts), "--base-model", str(tiny_model),
         "--requests", str(requests), "--port", str(free_port()), "--ray-port", str(RAY_PORT),
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    log = done.stdout + done.stderr
    summary = re.search(r"^cluster-demo: nodes=(\d+) requests=(\d+) ok=(\d+) "
                        r"failed_during_failover=(\d+) recovered=(yes|no)$", done.stdout,
                        re.MULTILINE)
    assert summary, log[-3000:]
    nodes, sent, ok, failed, recovered = summary.groups()
    assert (nodes, recovered, done.returncode) == ("2", "yes", 0), log[-3000:]

    report = json.loads(out.read_text())
    ph = report["phases"]
    assert ph["before"]["sent"] >= 3 and ph["before"]["failed"] == 0
    assert ph["after"] == {"sent": requests - 3, "ok": requests - 3, "failed": 0}
    assert int(sent) == sum(p["sent"] for p in ph.values()) and int(failed) == \
        ph["failover"]["failed"] and int(ok) == int(sent) - int(failed)
    # Replicas were on both nodes, and after recovery every one runs on the head.
    assert {r["node"] for r in report["placement_before"]} == {"head", "worker"}
    assert {r["node"] for r in report["placement_after"]} == {"head"}
    assert sorted(report["experts"]) == ["finance", "law"] and not report["synthetic_experts"]
    assert report["timings_s"]["recovered"] >= report["timings_s"]["worker_declared_dead"]
    # Both routed and forced requests went through, and the experts answered.
    experts = {r["expert"] for r in report["requests_log"] if r["ok"]}
    assert {"finance", "law"} <= experts
    # Teardown left no process of the demo cluster behind.
    leftover = subprocess.run(["pgrep", "-f", f"sscd-{RAY_PORT}"], capture_output=True,
                              text=True, check=False).stdout.split()
    assert not leftover, leftover
