"""The vLLM side of the engine deployment: one `AsyncLLM` with LoRA enabled, and vLLM's own
OpenAI serving classes (`OpenAIServingChat`, `OpenAIServingCompletion`, `OpenAIServingModels`)
doing prompt rendering, sampling-parameter checks, logprobs/echo and SSE formatting. We only
decide which adapter a request uses, and stream back typed messages (serve/clients.py); a request
vLLM refuses raises.

Adapters are registered with vLLM under their versioned name (`finance@v2`: vLLM keys its
prefix cache by adapter name) and a stable int id, while requests and responses use the expert's
public name (`finance`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from core.precision import precision_facts, resolve_dtype
from core.registry import ExpertEntry
from serve.adapters import EnginePlan, lora_int_id
from serve.clients import Answer, Chunk, EngineItem, Usage
from serve.config import ServeConfig
from serve.errors import EngineRequestError

log = logging.getLogger(__name__)


def _expert_models_class():
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    class ExpertModels(OpenAIServingModels):
        """vLLM's model table, answering with the expert's public name in `model`."""

        public: dict[str, str]

        def model_name(self, lora_request=None) -> str:
            if lora_request is None:
                return self.base_model_paths[0].name  # "base"
            return self.public.get(lora_request.lora_name, lora_request.lora_name)

    return ExpertModels


class VllmBackend:
    def __init__(self, cfg: ServeConfig, plan: EnginePlan):
        # vLLM CPU sizes its KV cache from this (GiB); set before the engine process starts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.engine.kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.v1.engine.async_llm import AsyncLLM

        e = cfg.engine
        # Resolved here, in the replica: the node that runs the engine decides bf16 vs fp32.
        self.dtype = resolve_dtype(e.dtype)
        self.precision = precision_facts(e.dtype, self.dtype)
        args = AsyncEngineArgs(
            model=str(plan.base_path), max_model_len=e.max_model_len, dtype=self.dtype,
            gpu_memory_utilization=e.gpu_memory_utilization, seed=e.seed,
            max_num_seqs=e.max_num_seqs, enforce_eager=e.enforce_eager,
            enable_lora=True, max_lora_rank=plan.max_lora_rank, max_loras=plan.max_loras,
            max_cpu_loras=plan.max_cpu_loras, lora_target_modules=list(plan.target_modules),
            **e.extra_engine_args)
        self.engine = AsyncLLM.from_engine_args(args)
        # What vLLM actually computes in (its own `auto` would have kept the checkpoint's bf16).
        self.precision["engine_dtype"] = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.max_model_len = self.engine.model_config.max_model_len
        self.models = _expert_models_class()(
            self.engine, [BaseModelPath(name=a, model_path=str(plan.base_path))
                          for a in plan.base_aliases])
        self.models.public = {}
        renderer = OnlineRenderer(self.engine.model_config, self.engine.renderer,
                                  request_logger=None, chat_template=None,
                                  chat_template_content_format="auto")
        self.chat = OpenAIServingChat(self.engine, self.models, "assistant",
                                      online_renderer=renderer, request_logger=None,
                                      chat_template=None, chat_template_content_format="auto")
        self.completion = OpenAIServingCompletion(self.engine, self.models,
                                                  online_renderer=renderer, request_logger=None)

    async def add_adapter(self, entry: ExpertEntry, path: Path) -> None:
        """Load into the engine now (a broken adapter fails here, not on a user's request)."""
        from vllm.lora.request import LoRARequest

        req = LoRARequest(entry.lora_name, lora_int_id(entry.lora_name), str(path))
        await self.engine.add_lora(req)
        self.models.lora_requests[entry.name] = req
        self.models.public[entry.lora_name] = entry.name

    def remove_adapter(self, name: str) -> None:
        # In-flight requests hold their own LoRARequest; vLLM's LRU drops the weights later.
        self.models.lora_requests.pop(name, None)

    def has(self, name: str) -> bool:
        return name in self.models.lora_requests

    async def generate(self, kind: str, request, expert: str | None) -> AsyncIterator[EngineItem]:
        from vllm.entrypoints.openai.chat_completion.protocol import StreamOptions
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        request.model = expert or "base"
        want_usage = bool(request.stream and request.stream_options and
                          request.stream_options.include_usage)
        if request.stream and not want_usage:
            # Ask for the final usage chunk so token metrics work on streams; dropped below.
            request.stream_options = StreamOptions(include_usage=True)
        # vLLM raises some validation errors and returns others: both leave here raised.
        if kind == "chat":
            out = await self.chat.create_chat_completion(request, None)
        else:
            out = await self.completion.create_completion(request, None)
        if isinstance(out, ErrorResponse):
            raise EngineRequestError.from_response(out)
        if not request.stream:
            body = out.model_dump()
            yield Answer(body, _usage(body.get("usage")))
            return
        async for chunk in out:
            if chunk.startswith("data: {") and '"usage":{' in chunk:
                data = json.loads(chunk[6:])
                usage = data.get("usage")
                if usage and not data.get("choices"):  # the final, usage-only chunk
                    yield _usage(usage)
                    if not want_usage:
                        continue
            yield Chunk(chunk)

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises once the engine core has died

    def shutdown(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()


def _usage(usage: dict | None) -> Usage:
    usage = usage or {}
    return Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
