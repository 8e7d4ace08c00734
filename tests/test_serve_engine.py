"""The engine deployment's bookkeeping with a fake backend (no vLLM engine): which adapters it
loads at start-up, which it leaves out and why, hot-add, new versions, unpublished experts, and
the router deployment's batch fallback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from core.registry import ExpertEntry, LoraInfo, Registry, TrainInfo, utcnow, write_registry
from router.types import RouteChoice, RouterError
from serve.clients import Answer, Usage
from serve.engine import EngineServer
from serve.errors import UnknownModelError, map_exception
from serve.router_deployment import RouterServer


class FakeBackend:
    max_model_len = 2048

    def __init__(self, cfg, plan):
        self.plan, self.loaded = plan, {}

    async def add_adapter(self, entry, path):
        if (path / "CORRUPT").exists():
            raise RuntimeError("safetensors header is invalid")
        self.loaded[entry.name] = (entry.lora_name, path)

    def remove_adapter(self, name):
        self.loaded.pop(name, None)

    async def generate(self, kind, request, expert):
        yield Answer({"model": expert or "base"}, Usage(1, 1))

    async def check_health(self):
        pass

    def shutdown(self):
        pass


def make_base(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
              base / "model.safetensors")
    return base


def publish(experts: Path, base: Path, name: str, version: int = 1, rank: int = 8,
            corrupt: bool = False, base_model: str = "tiny", reg: Registry | None = None):
    folder = experts / ".versions" / name / f"v{version}" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"],
         "bias": "none"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if corrupt:
        (folder / "CORRUPT").write_text("")
    reg = reg or _load(experts)
    reg.experts[name] = ExpertEntry(
        name=name, version=version, description=f"{name} things", base_model=base_model,
        base_model_path=str(base) if base_model == "tiny" else "/other/base",
        path=f".versions/{name}/v{version}",
        lora=LoraInfo(rank=rank, alpha=2 * rank, target_modules=["q_proj"]),
        train=TrainInfo(examples=1, epochs=1), exemplars=[f"{name} question"], created=utcnow())
    reg.revision += 1
    write_registry(experts, reg)


def _load(experts):
    from core.registry import load_registry
    return load_registry(experts)


async def start(experts: Path, base: Path) -> EngineServer:
    cls = EngineServer.func_or_class
    server = cls.__new__(cls)
    await cls.__init__(server, {"experts_dir": str(experts), "base_model": str(base),
                                "registry_poll_s": 0}, backend_factory=FakeBackend)
    return server


@pytest.fixture
def setup(tmp_path):
    base = make_base(tmp_path)
    experts = tmp_path / "experts"
    experts.mkdir()
    publish(experts, base, "finance")
    publish(experts, base, "law")
    publish(experts, base, "broken", corrupt=True)  # passes validation, the loader refuses it
    publish(experts, base, "odd", rank=7)  # validation refuses it
    publish(experts, base, "alien", base_model="other-model")  # another base
    return experts, base


def test_startup_loads_good_adapters_and_reports_bad_ones(setup):
    experts, base = setup
    server = asyncio.run(start(experts, base))
    cat = server.catalog()
    assert sorted(cat["experts"]) == ["finance", "law"]
    assert cat["experts"]["law"] == {"lora_name": "law@v1", "version": 1,
                                     "description": "law things", "rank": 8,
                                     "gain": None}  # published without a validation gain
    assert sorted(cat["skipped"]) == ["alien", "broken", "odd"]
    assert "could not load" in cat["skipped"]["broken"]
    assert "rank 7" in cat["skipped"]["odd"]
    assert "other-model" in cat["skipped"]["alien"]
    assert sorted(server.backend.loaded) == ["finance", "law"]
    assert cat["lora"] == {"max_lora_rank": 16, "max_loras": 5, "max_cpu_loras": 9}
    assert "base" in cat["base"]["aliases"] and cat["revision"] == 5


def test_hot_add_new_version_and_unpublish(setup):
    experts, base = setup
    server = asyncio.run(start(experts, base))
    publish(experts, base, "math")
    publish(experts, base, "law", version=2)
    cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "law", "math"]
    assert cat["experts"]["law"]["lora_name"] == "law@v2"
    assert server.backend.loaded["law"][0] == "law@v2"
    publish(experts, base, "finance", version=2, corrupt=True)  # a bad new version...
    cat = asyncio.run(server.reload())
    assert cat["experts"]["finance"]["lora_name"] == "finance@v1"  # ...keeps v1 serving
    reg = _load(experts)
    del reg.experts["math"]
    reg.revision += 1
    write_registry(experts, reg)
    cat = asyncio.run(server.reload())
    assert "math" not in cat["experts"] and "math" not in server.backend.loaded


def test_generate_for_an_expert_it_does_not_serve_is_404(setup):
    experts, base = setup
    server = asyncio.run(start(experts, base))

    async def collect(expert):
        return [item async for item in server.generate("chat", None, expert)]

    assert asyncio.run(collect("law")) == [Answer({"model": "law"}, Usage(1, 1))]
    with pytest.raises(UnknownModelError, match="could not load") as refused:
        asyncio.run(collect("broken"))
    assert map_exception(refused.value)[0] == 404 and refused.value.param == "model"
    publish(experts, base, "math")  # published after the last reload: found on demand
    assert asyncio.run(server.respond("chat", None, "math")) == \
        Answer({"model": "math"}, Usage(1, 1))


class FlakyRouter:
    def route_batch(self, texts):
        if any("\ud800" in t for t in texts):
            raise RouterError("not valid Unicode")
        return [RouteChoice(expert="law", score=0.5) for _ in texts]

    def route(self, text):
        return self.route_batch([text])[0]


def test_router_batch_one_bad_query_does_not_fail_the_others():
    out = RouterServer.func_or_class._route_batch(FlakyRouter(), ["ok", "bad \ud800", "ok"])
    assert [c.expert for c in out] == ["law", None, "law"]
    assert "unroutable" in out[1].reason
    empty = RouterServer.func_or_class._route_batch(None, ["x"])
    assert empty[0].expert is None and "no experts" in empty[0].reason


def test_router_reload_keeps_the_loaded_encoder(tmp_path, monkeypatch):
    """A hot-add reloads the router's index; the encoder (seconds to load and trace) stays."""
    from types import SimpleNamespace

    from router import index
    from serve.config import build_serve_config

    asked = []
    monkeypatch.setattr(index, "load_router",
                        lambda d, encoder=None: asked.append(encoder) or "new")
    server = object.__new__(RouterServer.func_or_class)
    server.cfg = build_serve_config({"router": {"encoder": "all-MiniLM-L6-v2"}})
    server.router = None
    assert server._load_router(tmp_path) == "new" and asked[-1] == "all-MiniLM-L6-v2"
    held = SimpleNamespace(name="all-MiniLM-L6-v2")
    server.router = SimpleNamespace(encoder=held)
    server._load_router(tmp_path)
    assert asked[-1] is held  # same model: the loaded one is reused
    server.router = SimpleNamespace(encoder=SimpleNamespace(name="/models/other-encoder"))
    server._load_router(tmp_path)
    assert asked[-1] == "all-MiniLM-L6-v2"  # another model: loaded by name
