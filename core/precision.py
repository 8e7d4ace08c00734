"""Which floating-point type an engine should compute in, chosen by the machine it runs on.

vLLM's `dtype: auto` keeps the checkpoint's dtype (bf16 for the embedded model). On a GPU that
is right. On a CPU it is right only where the CPU does bf16 arithmetic natively (AMX or
AVX512-BF16); elsewhere (AVX2-only CPUs, e.g. many AMD EPYC boxes) every bf16 matmul is
emulated through fp32 and a linear layer runs about 8x slower than in fp32. So on CPU `auto`
means bf16 where it is native and fp32 otherwise. An explicit dtype always wins.

The choice is made where the engine runs (the engine replica, the generator's process), not
where the command was typed: on a cluster the two can be different machines.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# What vLLM accepts for `dtype` (vllm/config/model.py); float16 on CPU is converted by vLLM.
DTYPES = ("auto", "bfloat16", "float32", "float16")
Dtype = Literal["auto", "bfloat16", "float32", "float16"]


@dataclass(frozen=True)
class CpuIsa:
    """The CPU features that decide bf16 speed, as /proc/cpuinfo and torch see them."""

    model: str
    amx_bf16: bool
    avx512_bf16: bool
    avx512f: bool
    avx2: bool

    @property
    def native_bf16(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16

    @property
    def summary(self) -> str:
        """The best instruction set present, as a short name ("amx_bf16", "avx2", ...)."""
        for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
            if getattr(self, name):
                return name
        return "baseline"

    def as_dict(self) -> dict:
        return {**asdict(self), "native_bf16": self.native_bf16, "isa": self.summary}


def cpu_model() -> str:
    """The CPU's model name for reports (platform.processor() is empty on most Linux systems)."""
    import platform

    return cpu_isa().model or platform.processor() or platform.machine()


@functools.cache
def cpu_isa() -> CpuIsa:
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    except OSError:  # not Linux: ask torch below
        pass
    amx, avx512_bf16 = "amx_bf16" in flags, "avx512_bf16" in flags
    if not flags:
        import platform

        import torch

        model = model or platform.processor()
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return CpuIsa(model=model, amx_bf16=amx, avx512_bf16=avx512_bf16,
                  avx512f="avx512f" in flags, avx2="avx2" in flags or avx512_bf16)


def _on_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_dtype(requested: str = "auto", *, isa: CpuIsa | None = None,
                  gpu: bool | None = None) -> str:
    """The dtype to hand vLLM. `auto` on a GPU stays `auto` (vLLM keeps the checkpoint's bf16);
    on a CPU it becomes bfloat16 where bf16 is native and float32 where it would be emulated."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if _on_gpu() if gpu is None else gpu:
        return "auto"
    return "bfloat16" if (isa or cpu_isa()).native_bf16 else "float32"


def precision_facts(dtype_requested: str, dtype_used: str) -> dict:
    """What reports and /health record: the CPU's instruction set and the dtype the engine used."""
    return {"cpu": cpu_isa().as_dict(), "dtype_requested": dtype_requested,
            "dtype": dtype_used, "gpu": _on_gpu()}
