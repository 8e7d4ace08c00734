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

from pydantic import BaseModel, ConfigDict, Field

from core.precision import Dtype, cpu_isa, resolve_dtype

log = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """The offline vLLM engine: the generation stages share one, and `selfspec eval` builds its own."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_model_len: int = Field(2048, ge=256)
    # vLLM CPU: KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB); keep it small on 2-core boxes.
    kv_cache_gib: int = Field(2, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=0.95)
    # GPUs one engine shards the model over (vLLM tensor parallelism), for a base model larger
    # than one GPU's memory (a 70B model in bf16 needs ~140 GB). On Ray, each domain task then
    # asks for this many GPUs.
    tensor_parallel_size: int = Field(1, ge=1)
    # auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), fp32 on other CPUs,
    # where bf16 is emulated and ~8x slower (core/precision.py).
    dtype: Dtype = "auto"
    seed: int = 0


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    regex: str | None = None  # constrain the output (vLLM structured outputs)
    repetition_penalty: float = 1.0
    # Outputs per prompt (vLLM's `n`): one request, so the prompt is prefilled once for all of
    # them; the self-consistency vote samples its answers this way.
    n: int = 1


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens vLLM's prefix cache served (not prefilled again)
    samples: tuple[str, ...] = ()  # with Sampling.n > 1: every output's text (text is the first)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter to generate with (round 2 uses the round-1 expert)."""

    name: str
    int_id: int
    path: Path


@dataclass(frozen=True)
class TokenRequest:
    """One greedy request on token ids (evaluation): `prompt_logprobs` also returns each prompt
    token's log-probability, the way lm-eval scores a continuation."""

    prompt_ids: tuple[int, ...]
    max_tokens: int = 1
    adapter: Adapter | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class TokenResult:
    text: str
    prompt_logprobs: tuple[float | None, ...] | None = None  # None for the first token


class Generator(Protocol):
    def complete(self, prompts: list[str], sampling: Sampling,
                 adapter: Adapter | None = None) -> list[Completion]: ...

    def chat_prompt(self, user: str) -> str:
        """The base model's chat template around one user turn, ready for generation."""
        ...

    def close(self) -> None: ...


class VllmGenerator:
    def __init__(self, model_path: Path, cfg: EngineConfig, max_lora_rank: int | None = None,
                 max_loras: int = 4, lora_target_modules: tuple[str, ...] | None = None):
        # vLLM's CPU backend sizes its KV cache from this variable (GiB); unset it would take a
        # large default share of RAM on a small box.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM

        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras} \
            if max_lora_rank else {}
        if max_lora_rank and lora_target_modules:
            # An explicit list keeps lm_head unwrapped: vLLM 0.32's CPU LoRA logits wrapper
            # breaks prompt logprobs in mixed-adapter batches (see serve/adapters.py).
            lora["lora_target_modules"] = list(lora_target_modules)
        self.cfg_dtype, self.dtype = cfg.dtype, resolve_dtype(cfg.dtype)
        log.info("engine dtype %s (asked %s; CPU %s)", self.dtype, cfg.dtype, cpu_isa().summary)
        self.llm = LLM(model=str(model_path), max_model_len=cfg.max_model_len, dtype=self.dtype,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed,
                       tensor_parallel_size=cfg.tensor_parallel_size, **lora)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len
        self.engine_dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def complete(self, prompts, sampling, adapter=None):
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import StructuredOutputsParams

        guided = StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                                seed=sampling.seed, structured_outputs=guided,
                                repetition_penalty=sampling.repetition_penalty, n=sampling.n)
        lora = LoRARequest(adapter.name, adapter.int_id, str(adapter.path)) if adapter else None
        # Prompts longer than the context (a long seed plus passages) are cut from the left of
        # the demos rather than failing the whole batch.
        prompts = [self._fit(p, sampling.max_tokens) for p in prompts]
        outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [Completion(o.outputs[0].text, o.outputs[0].finish_reason or "stop",
                           len(o.prompt_token_ids or ()), o.num_cached_tokens or 0,
                           tuple(c.text for c in o.outputs) if sampling.n > 1 else ())
                for o in outs]

    def complete_tokens(self, requests: list[TokenRequest]) -> list[TokenResult]:
        """Greedy, on token ids, each request with its own adapter: one engine batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens,
                                 prompt_logprobs=1 if r.prompt_logprobs else None)
                  for r in requests]
        loras = [LoRARequest(r.adapter.name, r.adapter.int_id, str(r.adapter.path))
                 if r.adapter else None for r in requests]
        outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        results = []
        for r, o in zip(requests, outs):
            lps = None
            if r.prompt_logprobs:
                lps = tuple(None if d is None else d[tok].logprob
                            for tok, d in zip(r.prompt_ids, o.prompt_logprobs))
            results.append(TokenResult(o.outputs[0].text, lps))
        return results

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
