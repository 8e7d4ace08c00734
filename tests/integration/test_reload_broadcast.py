"""/admin/reload reaches every replica (serve/watch.py ReloadBoard), on real Ray Serve: the
shared app's engine and router replicas, and a small app with two replicas of one deployment
(which a deployment handle alone would reach one of)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.integration.conftest import SERVE_API_KEY

pytestmark = pytest.mark.integration


def test_admin_reload_reaches_the_engine_and_router_replicas(serve_app):
    url, _ = serve_app
    r = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {SERVE_API_KEY}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    replicas = r.json()["replicas"]
    assert replicas["behind"] == [], replicas
    # deployment#replica: every engine and router replica polls the board
    assert {name.split("#")[0] for name in replicas["replicas"]} == {"engine", "router"}


@pytest.fixture
def ray_cluster():
    """The session's Ray (the shared Serve app's) when it is up, else a small one of our own."""
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if own:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def test_reload_board_reaches_both_replicas_of_a_deployment(ray_cluster, tmp_path):
    from ray import serve

    from serve.watch import board_actor, broadcast_reload

    log = tmp_path / "reloads"
    log.mkdir()
    experts = tmp_path / "experts"  # no registry.json: only the board makes them reload
    experts.mkdir()

    # no CPU of their own: the shared app's replicas may hold every CPU Ray was given
    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
    class Follower:  # a replica that follows the registry as the engine and router do
        async def __init__(self, experts_dir: str, log_dir: str):
            from pathlib import Path

            from ray import serve as rs

            from serve.watch import start_watch

            self.me = rs.get_replica_context().replica_id.unique_id
            self.log = Path(log_dir) / self.me
            self.log.write_text("")
            self.task = start_watch(Path(experts_dir), 0.2, self.on_change)

        async def on_change(self):
            await asyncio.to_thread(self._note)

        def _note(self):
            with open(self.log, "a") as f:
                f.write("reload\n")

        async def __call__(self):
            return self.me

    handle = serve.run(Follower.bind(str(experts), str(log)), name="reload-check",
                       route_prefix=None)
    try:
        deadline = time.time() + 60
        seen = set()
        while len(seen) < 2 and time.time() < deadline:  # start each replica's watch loop
            seen.add(handle.remote().result(timeout_s=30))
        assert len(seen) == 2, seen
        board = board_actor("reload-check")
        deadline = time.time() + 30
        while time.time() < deadline:  # both replicas polled the board once
            status = asyncio.run(_status(board))
            if len(status["replicas"]) == 2:
                break
            time.sleep(0.2)
        assert len(status["replicas"]) == 2, status
        out = asyncio.run(broadcast_reload(board, 0.2, timeout_s=30))
        assert out["behind"] == [] and len(out["replicas"]) == 2, out
        assert {p.name: p.read_text().count("reload") for p in log.iterdir()} == \
            {r: 1 for r in seen}  # each of the two replicas reloaded once
    finally:
        serve.delete("reload-check")


async def _status(board) -> dict:
    return await board.status.remote(0, 10.0)
