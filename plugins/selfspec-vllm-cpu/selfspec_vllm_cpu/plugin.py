"""vLLM general-plugin entry point for CPU serving: install the grouped LoRA ops (lora.py), the
whole-layer fused ones (lora_fused.py) and the engine core's nap (spin.py).

vLLM loads `vllm.general_plugins` entry points in every process it starts (API server, engine
core, workers), so `register` runs wherever the model runs; this package's pyproject.toml
declares it. It only patches on the CPU platform, and only where this package is installed:
selfspec itself never imports it.
"""

from __future__ import annotations

import logging
import os

from selfspec_vllm_cpu import lora, lora_fused, spin
from selfspec_vllm_cpu.state import STATE

log = logging.getLogger(__name__)

def enabled() -> bool:
    return os.environ.get("SELFSPEC_CPU_LORA", "1").lower() not in ("0", "false", "no", "off")


def register() -> None:
    """vLLM general-plugin entry point, on CPU: the engine core naps instead of spinning on its
    shared core (spin.py), and the gathering LoRA ops become grouped ones."""
    if STATE.patched:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    spin.install()  # idempotent; SELFSPEC_CPU_ENGINE_NAP_US=0 turns it off
    if not enabled():
        return
    import vllm.lora.ops.torch_ops.lora_ops as torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # sgmv_* in torch_ops call these bgmv_* through the module globals; punica_cpu imported
    # all of them by name. Patch both namespaces.
    for module in (torch_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink",
                     "sgmv_expand", "sgmv_expand_slice"):
            if hasattr(module, name):
                setattr(module, name, getattr(lora, name))
    original = punica_cpu.PunicaWrapperCPU.update_metadata

    def update_metadata(self, mapping, lora_index_to_id, *args, **kwargs):
        original(self, mapping, lora_index_to_id, *args, **kwargs)
        lora.note_step(self.token_lora_indices, lora_index_to_id,
                  self.prefill_metadata[2] if self.is_prefill else None)

    punica_cpu.PunicaWrapperCPU.update_metadata = update_metadata
    _patch_layers(punica_cpu.PunicaWrapperCPU)
    STATE.patched = True
    log.info("selfspec: grouped CPU LoRA ops installed")


def _patch_layers(cls) -> None:
    def patched(fused, original):
        def method(self, *args, **kwargs):
            return fused(self, original, *args, **kwargs)
        return method

    for name in ("add_lora_linear", "add_shrink", "add_expand"):
        setattr(cls, name, patched(getattr(lora_fused, name), getattr(cls, name)))
