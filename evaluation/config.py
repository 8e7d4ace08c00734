"""`EvalConfig`: the validated arguments of `selfspec eval`. Nothing heavy is imported here."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ConfigError
from core.precision import Dtype

TARGET_GROUPS = ("base", "experts", "auto")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experts_dir: Path = Path("experts")
    # None: every shipped domain that has an eval.jsonl
    domains: list[str] | None = None
    # "base", "experts" (every served expert), "auto" (routed), or expert names
    targets: list[str] = Field(default_factory=lambda: list(TARGET_GROUPS), min_length=1)
    out: Path = Path("reports")
    endpoint: str | None = None  # None: a direct vLLM engine over --experts-dir
    api_key: str | None = None
    tokenizer: str | None = None  # HTTP only; None: the base model folder the server reports
    limit: int | None = Field(None, ge=1, description="items per domain, spread over the types")
    resamples: int = Field(1000, ge=100)  # bootstrap resamples for every interval
    seed: int = 0  # of the bootstrap: the same resampled items for every target
    concurrency: int = Field(8, ge=1, le=256)  # HTTP requests in flight
    kv_cache_gib: int = Field(1, ge=1)  # direct engine (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = Field(2048, ge=256)
    dtype: Dtype = "auto"  # direct engine; resolved by the CPU (core/precision.py)

    @field_validator("targets", "domains")
    @classmethod
    def _no_blanks(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        names = [x.strip() for x in v if x.strip()]
        if not names:
            raise ValueError("is empty")
        return list(dict.fromkeys(names))

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
        return v


def build_eval_config(**kwargs) -> EvalConfig:
    """Validate; errors become one readable ConfigError (exit 2) before any model loads."""
    try:
        return EvalConfig.model_validate({k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        msgs = [f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                for err in e.errors()]
        raise ConfigError("invalid eval arguments: " + "; ".join(msgs)) from None
