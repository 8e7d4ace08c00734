"""The text generator the generation stages share: one vLLM engine for every domain of a run.

Stages talk to the small `Generator` protocol, so unit tests inject a fake and the stages stay
free of vLLM imports. `build_vllm_generator` is the only place that constructs an engine.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from specialize.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    regex: str | None = None  # constrain the output (vLLM structured outputs)
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter to generate with (round 2 uses the round-1 expert)."""

    name: str
    int_id: int
    path: Path


class Generator(Protocol):
    def complete(self, prompts: list[str], sampling: Sampling,
                 adapter: Adapter | None = None) -> list[Completion]: ...

    def chat_prompt(self, user: str) -> str:
        """The base model's chat template around one user turn, ready for generation."""
        ...

    def close(self) -> None: ...


class VllmGenerator:
    def __init__(self, model_path: Path, cfg: EngineConfig, max_lora_rank: int | None = None):
        # vLLM's CPU backend sizes its KV cache from this variable (GiB); unset it would take a
        # large default share of RAM on a small box.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM

        lora = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=4) \
            if max_lora_rank else {}
        self.llm = LLM(model=str(model_path), max_model_len=cfg.max_model_len, dtype=cfg.dtype,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed, **lora)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len

    def complete(self, prompts, sampling, adapter=None):
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import StructuredOutputsParams

        guided = StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                                seed=sampling.seed, structured_outputs=guided,
                                repetition_penalty=sampling.repetition_penalty)
        lora = LoRARequest(adapter.name, adapter.int_id, str(adapter.path)) if adapter else None
        # Prompts longer than the context (a long seed plus passages) are cut from the left of
        # the demos rather than failing the whole batch.
        prompts = [self._fit(p, sampling.max_tokens) for p in prompts]
        outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [Completion(o.outputs[0].text, o.outputs[0].finish_reason or "stop") for o in outs]

    def _fit(self, prompt: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        budget = self.max_model_len - max_tokens - 8
        if len(ids) <= budget:
            return prompt
        log.debug("prompt of %d tokens cut to %d", len(ids), budget)
        return self.tokenizer.decode(ids[-budget:])

    def chat_prompt(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

    def close(self) -> None:
        # Free the engine (and its worker process) before training needs the cores and RAM.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def build_vllm_generator(model_path: Path, cfg: EngineConfig,
                         max_lora_rank: int | None = None) -> Generator:
    return VllmGenerator(model_path, cfg, max_lora_rank)
