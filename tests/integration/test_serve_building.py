"""`selfspec up`'s contract with the live server (the session's one Serve app, conftest
`serve_app`, polling the registry every second): while a specialize run makes an expert, /health
and /v1/models say so; once it is published the server lists and serves it without a restart.
The expert made here is taken out of the registry at the end, so the other serving tests see
the app as they expect."""

from __future__ import annotations

import io
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.integration.conftest import SERVE_API_KEY

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {SERVE_API_KEY}"}


def get(url: str, path: str) -> dict:
    return httpx.get(f"{url}{path}", headers=AUTH, timeout=60).json()


def wait_for(check, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def test_expert_in_progress_then_served_once_published(serve_app, tiny_model, tmp_path):
    from core.console import Console
    from core.registry import load_registry, locked, write_registry
    from specialize.progress import ProgressMonitor
    from tests.integration.tiny_experts import publish_tiny_expert

    url, experts = serve_app
    # A domain no other test uses: the math seeds under another name.
    domain = tmp_path / "geometry"
    domain.mkdir()
    text = (REPO / "seeds" / "math" / "seeds.yaml").read_text()
    (domain / "seeds.yaml").write_text(text.replace("domain: math", "domain: geometry", 1))
    assert "domain: geometry" in (domain / "seeds.yaml").read_text()

    console = io.StringIO()
    try:
        with ProgressMonitor(experts, ["geometry"], Console(console, tty=False),
                             interval_s=0.5):
            # The monitor's first write comes one interval after the run starts.
            health = wait_for(lambda: (h := get(url, "/health"))["building"] and h,
                              "geometry reported as being made", timeout_s=30)
            assert health["building"]["geometry"]["state"] == "running"
            assert health["building"]["geometry"]["stage"] == "engine start"
            models = get(url, "/v1/models")
            assert "geometry" in models["building"]
            assert "geometry" not in [m["id"] for m in models["data"]]

            publish_tiny_expert(experts, tiny_model, str(domain), seed=13, work=tmp_path)
            wait_for(lambda: "geometry" in [m["id"] for m in get(url, "/v1/models")["data"]],
                     "the published expert in /v1/models")
            # Published: no longer "being made", in either route.
            wait_for(lambda: get(url, "/health")["building"] == {}, "building emptied")
            assert get(url, "/v1/models")["building"] == {}
            r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120, json={
                "model": "geometry", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "area of a circle?"}]})
            assert r.status_code == 200 and r.json()["model"] == "geometry"
        assert "geometry: starting the engine" in console.getvalue()
        assert "ready: geometry" in console.getvalue()
    finally:
        with locked(experts):
            registry = load_registry(experts)
            if registry.experts.pop("geometry", None) is not None:
                registry.revision += 1
                write_registry(experts, registry)
    wait_for(lambda: "geometry" not in get(url, "/health")["experts"], "geometry removed")


def test_auto_routes_by_the_seeds_of_an_expert_being_made(serve_app):
    """Before math's expert exists, the real router (MiniLM, FAISS) scores math's shipped seeds:
    a math question goes to the base model, with a reason naming the expert that is coming."""
    from core.build_status import (
        BuildStatus,
        DomainProgress,
        clear_build_status,
        write_build_status,
    )

    url, experts = serve_app
    question = {"model": "auto", "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": "Solve for x: 3x + 7 = 22. Show the steps."}]}
    try:
        write_build_status(experts, BuildStatus(domains={
            "math": DomainProgress(state="running", stage="generate")}))
        router = wait_for(lambda: (r := get(url, "/health")["router"])["previewing"] and r,
                          "the router previewing math", timeout_s=60)
        assert router["previewing"] == ["math"] and "math" not in router["experts"]
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120, json=question)
        assert r.status_code == 200 and r.headers["x-selfspec-expert"] == "base"
        assert "closest to math" in r.headers["x-selfspec-route-reason"]
        assert "still being made" in r.headers["x-selfspec-route-reason"]
    finally:
        clear_build_status(experts)
    wait_for(lambda: get(url, "/health")["router"]["previewing"] == [], "the preview dropped")
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120, json=question)
    assert r.status_code == 200 and "math" not in r.headers.get("x-selfspec-route-reason", "")
