"""Engine precision chosen by the CPU: bf16 only where it is native, fp32 where it is emulated."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.precision import CpuIsa, cpu_isa, precision_facts, resolve_dtype

AVX2 = CpuIsa("AMD EPYC", amx_bf16=False, avx512_bf16=False, avx512f=False, avx2=True)
AVX512_BF16 = CpuIsa("AMD EPYC", amx_bf16=False, avx512_bf16=True, avx512f=True, avx2=True)
AMX = CpuIsa("Intel Xeon", amx_bf16=True, avx512_bf16=True, avx512f=True, avx2=True)


@pytest.mark.parametrize("isa, want", [(AVX2, "float32"), (AVX512_BF16, "bfloat16"),
                                       (AMX, "bfloat16")])
def test_auto_on_cpu_follows_native_bf16(isa, want):
    assert resolve_dtype("auto", isa=isa, gpu=False) == want


def test_auto_on_gpu_is_left_to_vllm():
    assert resolve_dtype("auto", isa=AVX2, gpu=True) == "auto"


@pytest.mark.parametrize("asked", ["bfloat16", "float32", "float16"])
def test_explicit_dtype_wins_everywhere(asked):
    assert resolve_dtype(asked, isa=AVX2, gpu=False) == asked
    assert resolve_dtype(asked, isa=AMX, gpu=True) == asked


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8", isa=AVX2, gpu=False)


def test_isa_names():
    assert AVX2.summary == "avx2" and not AVX2.native_bf16
    assert AVX512_BF16.summary == "avx512_bf16" and AVX512_BF16.native_bf16
    assert AMX.summary == "amx_bf16"
    assert AMX.as_dict()["native_bf16"] is True


def test_cpu_isa_reads_this_machine():
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.MULTILINE).group(1).split())
    isa = cpu_isa()
    assert isa.avx512_bf16 == ("avx512_bf16" in flags)
    assert isa.amx_bf16 == ("amx_bf16" in flags)
    assert isa.model in text
    facts = precision_facts("auto", resolve_dtype("auto"))
    assert facts["cpu"]["isa"] == isa.summary
    assert facts["dtype"] == ("bfloat16" if isa.native_bf16 else "float32")


def test_configs_validate_dtype():
    from core.engine import EngineConfig
    from core.errors import ConfigError
    from serve.config import build_serve_config

    assert EngineConfig(dtype="float32").dtype == "float32"
    with pytest.raises(ValueError):
        EngineConfig(dtype="fp8")
    assert build_serve_config({"engine": {"dtype": "bfloat16"}}).engine.dtype == "bfloat16"
    with pytest.raises(ConfigError):
        build_serve_config({"engine": {"dtype": "half-ish"}})


def test_serve_dtype_flag_overrides_config_file():
    from serve.cli import with_dtype

    assert with_dtype({"engine": {"dtype": "bfloat16", "seed": 3}}, "float32") == \
        {"engine": {"dtype": "float32", "seed": 3}}
    assert with_dtype({"engine": {"dtype": "bfloat16"}}, None) == {"engine": {"dtype": "bfloat16"}}


@pytest.mark.parametrize("cmd", [["specialize", "math"], ["eval"]])
def test_cli_refuses_unknown_dtype(cmd):
    r = subprocess.run([sys.executable, "-m", "selfspec.cli", *cmd, "--dtype", "fp8"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice: 'fp8'" in r.stderr
