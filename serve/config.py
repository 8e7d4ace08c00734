"""`ServeConfig`: the typed arguments of `build_app`, the same dict that `deploy/*.yaml` carry
under `applications[].args`. Validated in milliseconds, before Ray or vLLM is touched, so a typo
in a YAML fails at once instead of after a ~40 s engine start.

Nothing heavy is imported here: the CLI and the YAML tests import it freely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from core.errors import ConfigError
from core.lora import VLLM_LORA_RANKS
from core.precision import Dtype

API_KEY_ENV = "SELFSPEC_API_KEY"


def _on_off(v):
    # YAML 1.1 reads a bare `on`/`off` as true/false
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


RequireGain = Annotated[Literal["off", "on", "strict"], BeforeValidator(_on_off)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingOptions(_Config):
    """Ray Serve's `autoscaling_config` (same names): replicas follow the requests in flight."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # Requests in flight per replica that Serve aims for; more -> it adds replicas.
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas "
                             f"{self.max_replicas}")
        if self.initial_replicas is not None and not \
                self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas {self.initial_replicas} is outside "
                             f"[{self.min_replicas}, {self.max_replicas}]")
        return self


class _Replicas(_Config):
    """How Serve places and scales one deployment's replicas (every deployment has these)."""

    # None: 1 replica, or as many as autoscaling_config decides when that is set.
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: AutoscalingOptions | None = None
    # Custom Ray resources each replica needs, e.g. {"selfspec_engine": 1} to pin the engine
    # to the nodes started with that resource (Ray's `ray_actor_options.resources`).
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fixed_or_autoscaled(self):
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both (Serve "
                             "takes the replica count from autoscaling_config)")
        if any(v < 0 for v in self.resources.values()):
            raise ValueError(f"resources must be >= 0, got {self.resources}")
        return self

    def serve_options(self) -> dict:
        """The replica part of Ray Serve's `Deployment.options(...)`."""
        if self.autoscaling_config is not None:
            return {"autoscaling_config": self.autoscaling_config.model_dump(exclude_none=True)}
        return {"num_replicas": self.num_replicas or 1}


class EngineOptions(_Replicas):
    """The vLLM engine deployment. LoRA limits default to what the registry needs."""

    max_model_len: int = Field(2048, ge=128)
    # auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), fp32 on other CPUs;
    # resolved in the engine replica, on the machine that runs it (core/precision.py).
    dtype: Dtype = "auto"
    # vLLM CPU sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); 1 fits a 2-core box.
    kv_cache_gib: int = Field(1, ge=1)
    # vLLM CPU refuses values above 0.5 on small boxes; GPUs use 0.9 (deploy/gpu.yaml).
    gpu_memory_utilization: float = Field(0.5, gt=0, le=0.95)
    # None: from the registry (largest rank rounded up to vLLM's allowed values, >= 16).
    max_lora_rank: int | None = None
    # None: min(number of experts, 8), at least 1: adapters resident in one batch.
    max_loras: int | None = Field(None, ge=1)
    # None: every expert plus `hot_add_headroom`, so hot-added experts stay cached.
    max_cpu_loras: int | None = Field(None, ge=1)
    hot_add_headroom: int = Field(4, ge=0)
    max_num_seqs: int = Field(64, ge=1)
    enforce_eager: bool = False
    seed: int = 0
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)  # vLLM batches only what Serve lets through
    # CPU engines: move Serve's processes on this node onto the cores vLLM's worker leaves free
    # (plugins/selfspec-vllm-cpu/selfspec_vllm_cpu/pinning.py). No effect on GPU engines.
    isolate_worker_cpus: bool = True
    # Any other AsyncEngineArgs field (e.g. tensor_parallel_size on GPUs), passed as is.
    extra_engine_args: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ranks(self) -> EngineOptions:
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank {self.max_lora_rank} is not one of vLLM's "
                             f"{list(VLLM_LORA_RANKS)}")
        if self.max_loras and self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras {self.max_cpu_loras} < max_loras "
                             f"{self.max_loras}: vLLM needs max_cpu_loras >= max_loras")
        return self


class RouterOptions(_Replicas):
    """The router deployment (CPU): batches concurrent routing calls with @serve.batch (gathered
    in each ingress replica, and again in the router for other callers)."""

    encoder: str | None = None  # None: the encoder the index was built with (or the default)
    max_batch_size: int = Field(32, ge=1)
    # No wait: a lone request is routed at once, and under load the requests that arrive while
    # one batch is being encoded make up the next. A wait only adds latency on an idle server.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    # auto sends a query to an expert only if it beat the base model on its validation split
    # (the registry entry's gain, specialize/gain.py); otherwise the base model answers.
    # "on": a measured gain must be > 0, an unmeasured expert (an old registry, `experts add`)
    # is trusted; "strict": unmeasured experts are not routed to either; "off": the router alone.
    require_gain: RequireGain = "on"
    # ...and its P(not better) at most this. 1.0: a positive difference is enough. On ~60
    # validation items a real +0.05 gain has p ~0.2, so p <= 0.05 would turn away most experts
    # that help; raise the bar here when the splits are larger.
    gain_max_p: float = Field(1.0, gt=0, le=1)


class IngressOptions(_Replicas):
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)
    # 1 MiB holds a ~250k-token prompt, far above any context this engine serves.
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Per-request caps: vLLM itself allows n up to 16384 and 1024 prompts a request, so one
    # request could hold a CPU engine for hours. Each is refused with a 400 naming the field.
    max_n: int = Field(8, ge=1)  # choices per request ("n")
    max_tokens: int = Field(4096, ge=1)  # tokens to generate per choice (max_tokens and
    # max_completion_tokens); the engine also refuses more than the context holds
    max_prompts: int = Field(32, ge=1)  # prompts in one /v1/completions request (a list)
    # Wall-clock seconds for one request, streaming included: a 408 (or an error event in the
    # stream), and the engine stops generating for it. ~10 minutes of CPU decoding.
    request_timeout_s: float = Field(600.0, gt=0)


class ServeConfig(_Config):
    experts_dir: Path = Path("experts")
    # None: the base model the registry's experts were trained on.
    base_model: str | None = None
    # Bearer token for /v1 and /admin; None: $SELFSPEC_API_KEY if set, else open.
    api_key: str | None = None
    # Serve on a non-loopback HTTP host with no API key; refused otherwise (serve/app.py).
    insecure_no_auth: bool = False
    # Seconds between registry checks (a stat of registry.json); 0 turns the watch off.
    registry_poll_s: float = Field(2.0, ge=0)
    engine: EngineOptions = EngineOptions()
    router: RouterOptions = RouterOptions()
    ingress: IngressOptions = IngressOptions()

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def build_serve_config(args: dict | ServeConfig | None = None, **overrides) -> ServeConfig:
    """Validate `build_app` args (plus CLI overrides); errors become one readable ConfigError."""
    if isinstance(args, ServeConfig):
        args = args.model_dump()
    merged = {**(args or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return ServeConfig.model_validate(merged)
    except ValidationError as e:
        msgs = [f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid serve configuration:\n  " + "\n  ".join(msgs) +
                          "\n  (see deploy/local.yaml for every field)") from None
