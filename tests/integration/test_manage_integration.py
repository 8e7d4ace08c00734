"""`selfspec experts add | rollback | remove` against the live serving stack (the session's one
Serve app, conftest `serve_app`, polling the registry every second): each change shows in
/v1/models and in the answers without a restart. The expert added here is removed at the end,
so the registry serves the same experts as before for the tests that follow."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from selfspec.cli import main
from tests.integration.conftest import SERVE_API_KEY

pytestmark = pytest.mark.integration

COOKING = ["How long should I knead bread dough by hand?",
           "What temperature should I roast a whole chicken at?",
           "How do I keep pasta from sticking together while it boils?",
           "Why did my cake sink in the middle after baking?",
           "How can I tell when a steak is medium rare without a thermometer?",
           "What can I use instead of eggs in pancake batter?",
           "How much salt goes into a pot of water for boiling pasta?",
           "How do I caramelize onions without burning them?"]
# The watch polls every second; loading an adapter into vLLM and reloading the router's
# index take a few seconds more on a loaded machine.
CHANGE_DEADLINE_S = 30.0


def served(url: str) -> dict:
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {SERVE_API_KEY}"},
                  timeout=30)
    return {m["id"]: m for m in r.json()["data"]}


def routable(url: str) -> list[str]:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {SERVE_API_KEY}"},
                     timeout=30).json()["router"]["experts"]


def wait_for(url: str, check, since: float, read=served) -> float:
    """Seconds from `since` (the command's start) until `check(read(url))` holds (by default
    on /v1/models); fails CHANGE_DEADLINE_S after the command returned."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < CHANGE_DEADLINE_S:
        if check(read(url)):
            return time.monotonic() - since
        time.sleep(0.25)
    pytest.fail(f"no change within {CHANGE_DEADLINE_S} s: {read(url)}")


def answer(client, model: str) -> tuple[str, str]:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is a good weeknight dinner?"}],
        max_tokens=8, temperature=0)
    return r.model, r.choices[0].message.content


def experts_cli(*args) -> int:
    return main(["experts", *map(str, args)])


def test_add_rollback_remove_against_the_live_server(serve_app, tiny_model, tmp_path, capsys):
    from tests.integration.tiny_experts import build_random_adapter

    url, experts = serve_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_API_KEY, max_retries=0,
                           timeout=120)
    queries = tmp_path / "cooking.txt"
    queries.write_text("\n".join(COOKING) + "\n")
    adapters = [build_random_adapter(tiny_model, tmp_path / f"cooking-{i}", seed=300 + i)
                for i in (1, 2)]
    before = set(served(url))
    took = {}

    t0 = time.monotonic()
    assert experts_cli("add", "cooking", "--adapter", adapters[0], "--exemplars", queries,
                       "--description", "Cooking: recipes, techniques and kitchen questions.",
                       "--experts-dir", experts) == 0
    took["add"] = wait_for(url, lambda m: m.get("cooking", {}).get("root") == "cooking@v1", t0)
    v1 = answer(client, "cooking")
    assert v1[0] == "cooking" and v1[1] != answer(client, "base")[1]
    took["add, router"] = wait_for(url, lambda names: "cooking" in names, t0, routable)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": COOKING[0]}], max_tokens=4)
    assert raw.headers["x-selfspec-expert"] == "cooking"  # the exemplars route to it

    t0 = time.monotonic()
    assert experts_cli("add", "cooking", "--adapter", adapters[1], "--experts-dir",
                       experts) == 0  # a new version keeps v1's exemplars
    took["add v2"] = wait_for(url, lambda m: m["cooking"]["root"] == "cooking@v2", t0)
    v2 = answer(client, "cooking")
    assert v2[0] == "cooking" and v2[1] != v1[1]

    t0 = time.monotonic()
    assert experts_cli("rollback", "cooking", "--experts-dir", experts) == 0
    took["rollback"] = wait_for(url, lambda m: m["cooking"]["root"] == "cooking@v1", t0)
    assert answer(client, "cooking") == v1  # the v1 adapter again, under its versioned name

    t0 = time.monotonic()
    assert experts_cli("remove", "cooking", "--experts-dir", experts) == 0
    took["remove"] = wait_for(url, lambda m: "cooking" not in m, t0)
    took["remove, router"] = wait_for(url, lambda names: "cooking" not in names, t0, routable)
    with pytest.raises(openai.NotFoundError):
        answer(client, "cooking")
    assert set(served(url)) == before
    with capsys.disabled():
        print("\nseconds from the command's start to the change being served: " +
              ", ".join(f"{k} {v:.1f}" for k, v in took.items()))
