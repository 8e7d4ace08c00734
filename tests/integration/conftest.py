"""Fixtures for integration tests: one tiny random Llama for the session, ONE vLLM engine (LoRA on)
shared by the specialize tests, and ONE Ray Serve app shared by the serving tests, so the suite
pays each ~40 s engine start once."""

from __future__ import annotations

import json

import pytest

from core.engine import EngineConfig
from tests.conftest import REPO
from tests.integration.tiny_model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")  # closed when its module ends: the serving tests start their own
def engine(tiny_model):
    from core.engine import VllmGenerator

    # float32 whatever the CPU: the serving app covers `auto` (bf16 on CPUs with native bf16),
    # this engine covers the fp32 path AVX2-only CPUs take.
    gen = VllmGenerator(tiny_model, EngineConfig(max_model_len=2048, kv_cache_gib=1,
                                                 dtype="float32"), max_lora_rank=16)
    assert gen.engine_dtype == "float32", gen.engine_dtype
    yield gen
    gen.close()


class Shared:
    """Hands the session engine to the pipeline without letting it close it; optionally
    raises KeyboardInterrupt on the n-th call, as a Ctrl-C in the middle of a stage would."""

    def __init__(self, engine, interrupt_on_call: int | None = None):
        self.engine, self.calls, self.interrupt_on_call = engine, 0, interrupt_on_call
        self.adapters = []  # every adapter the pipeline asked vLLM to use

    def __call__(self, *args, **kwargs):  # the pipeline's make_generator(base, cfg[, rank])
        return self

    def complete(self, prompts, sampling, adapter=None):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        if adapter:
            self.adapters.append(adapter)
        return self.engine.complete(prompts, sampling, adapter)

    def chat_prompt(self, user):
        return self.engine.chat_prompt(user)

    def close(self):
        pass


@pytest.fixture
def shared_engine(engine):
    return lambda interrupt_on_call=None: Shared(engine, interrupt_on_call)


# --- serving (tests/integration/test_serve_http_integration.py, test_serve_integration.py) ----
# ONE Ray Serve app (one vLLM engine, the router, the ingress) for every serving test, over a
# registry with two good tiny experts and one whose adapter weights are corrupt.
SERVE_API_KEY = "sk-selfspec-test"
AUTH = {"Authorization": f"Bearer {SERVE_API_KEY}"}  # /health's details need the key


def queries(domain: str, n: int) -> list[str]:
    lines = (REPO / "seeds" / domain / "routing.jsonl").read_text().splitlines()
    return [json.loads(line)["query"] for line in lines if line.strip()][:n]


def chat(text, model="auto", **kw):
    return dict(model=model, messages=[{"role": "user", "content": text}], max_tokens=6,
                temperature=0, **kw)


@pytest.fixture(scope="session")
def serve_experts(tmp_path_factory, tiny_model):
    from tests.integration.tiny_experts import build_tiny_experts, publish_tiny_expert

    root = tmp_path_factory.mktemp("serve")
    experts = build_tiny_experts(root / "experts", tiny_model, root / "work")
    bad = publish_tiny_expert(experts, tiny_model, "biomedicine", seed=7, work=root / "work")
    (experts / bad.adapter_path / "adapter_model.safetensors").write_bytes(b"\x00corrupt" * 64)
    return experts


@pytest.fixture(scope="session")
def serve_app(serve_experts):
    """(base_url, experts_dir): the whole stack on a free port, shut down at the end."""
    import socket

    import ray
    from ray import serve

    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"experts_dir": str(serve_experts), "api_key": SERVE_API_KEY,
                             "registry_poll_s": 1.0, "engine": {"max_model_len": 1024}}),
                  name="selfspec", route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve_experts
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(serve_app):
    """The official `openai` client on the shared app, with the key."""
    import openai

    url, _ = serve_app
    return openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_API_KEY, max_retries=0,
                         timeout=120)
