"""The router over experts still being made (router/preview.py, serve/router_deployment.py):
while `selfspec up` specializes, `auto` routes among the shipped seeds of the domains being made
and the base model answers what one of them would take."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from core.build_status import BuildStatus, DomainProgress, clear_build_status, write_build_status
from core.registry import load_registry
from core.seeds import load_domain
from router.preview import preview_router
from router.types import RouteChoice
from serve.router_deployment import RouterServer
from tests.test_router import FakeEncoder, write_reg


class WordEncoder(FakeEncoder):
    """FakeEncoder, with one more axis per shipped domain's key words."""

    WORDS: ClassVar[dict] = {
        "finance": ("interest", "bond", "stock", "loan", "tax", "price", "market"),
        "math": ("solve", "x", "equation", "integral", "sum", "number", "triangle")}

    def __init__(self):
        super().__init__(dim=8)

    def encode(self, texts):
        base = super().encode(texts)
        for i, t in enumerate(texts):
            words = set(t.lower().replace("?", " ").split())
            for axis, (_, keys) in zip((3, 4), self.WORDS.items()):
                base[i, axis] += 2.0 * bool(words & set(keys))
        return base / ((base ** 2).sum(1, keepdims=True) ** 0.5)


def test_preview_adds_the_shipped_seeds_of_pending_domains(tmp_path):
    registry = write_reg(tmp_path, {"law": [f"law question {i}" for i in range(12)]})
    built = preview_router(registry, ["finance", "law", "no-such-domain"], WordEncoder())
    assert built is not None
    router, previewed = built
    assert previewed == ("finance",)  # law is published; an unknown name has no seeds
    assert router.names == ["finance", "law"]
    seeds = load_domain("finance").seeds
    # every finance seed and the published expert's exemplars, each with its description
    assert router.counts.tolist() == [len({s.instruction for s in seeds}) + 1, 12 + 1]
    assert preview_router(registry, ["law", "no-such-domain"], WordEncoder()) is None


def test_a_pending_expert_is_answered_by_the_base_model_with_its_name_in_the_reason():
    class Law:
        def route_batch(self, texts):
            return [RouteChoice(expert="law", score=0.41), RouteChoice(expert="math", score=0.5)]

    out = RouterServer.func_or_class._route_batch(Law(), ["a", "b"], ("law",))
    assert out[0].expert is None and out[0].score == 0.41
    assert "closest to law (0.410)" in out[0].reason and "still being made" in out[0].reason
    assert out[1].expert == "math"  # published: routed as before


def bare_server(experts_dir):
    from serve.config import build_serve_config
    from serve.watch import RegistryFollower, RetrySchedule

    server = object.__new__(RouterServer.func_or_class)
    server.cfg = build_serve_config({"experts_dir": str(experts_dir)})
    server.experts_dir = experts_dir
    server.router, server.revision, server.pending, server._building = None, -1, (), None
    server._reload_lock = asyncio.Lock()
    server.follower, server._retries = RegistryFollower(experts_dir), RetrySchedule()
    server._factory = lambda d: (_ for _ in ()).throw(AssertionError("no registry index"))
    server._encoder = lambda d: WordEncoder()
    server.stats = {}
    return server


def test_reload_follows_building_json_before_the_first_expert(tmp_path):
    server = bare_server(tmp_path)
    assert asyncio.run(server.reload())["previewing"] == []
    assert server.router is None and server._read_building() == server._building

    write_build_status(tmp_path, BuildStatus(domains={
        "math": DomainProgress(state="running", stage="generate"),
        "finance": DomainProgress(state="queued")}))
    assert server._read_building() != server._building  # the watch's `due` fires on this
    info = asyncio.run(server.reload())
    assert info["previewing"] == ["finance", "math"] and info["experts"] == []
    [choice] = RouterServer.func_or_class._route_batch(
        server.router, ["solve the equation x + 2 = 5 for x"], server.pending)
    assert choice.expert is None and "closest to math" in choice.reason
    assert load_registry(tmp_path).experts == {}  # nothing written: the preview is in memory

    clear_build_status(tmp_path)  # the run ended (or its file went stale)
    info = asyncio.run(server.reload())
    assert info["previewing"] == [] and server.router is None
