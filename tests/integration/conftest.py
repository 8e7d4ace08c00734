"""Session fixtures for integration tests: one tiny random Llama and ONE vLLM engine (LoRA on),
shared by every test that generates, so the suite pays the ~40 s engine start once."""

from __future__ import annotations

import pytest

from specialize.config import EngineConfig
from tests.integration.tiny_model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def engine(tiny_model):
    from specialize.engine import VllmGenerator

    gen = VllmGenerator(tiny_model, EngineConfig(max_model_len=2048, kv_cache_gib=1),
                        max_lora_rank=16)
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
