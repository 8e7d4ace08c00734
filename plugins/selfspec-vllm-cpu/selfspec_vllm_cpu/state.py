"""The plugin's per-process state, in one object: what the LoRA ops (lora.py) and the fused
layers (lora_fused.py) cache between the layers of one engine step and across steps.

One engine process serves one model, so one `STATE` per process; `reset()` empties it (tests).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class State:
    patched: bool = False  # register() ran and patched vLLM in this process
    # lora.py: set once per engine step by note_step, read by every LoRA layer of that step
    step: tuple | None = None     # (data_ptr, numel, grouping) of this step's token indices
    prefill: tuple | None = None  # per-run slot buffer -> token indices (the sgmv path)
    stacked: dict[tuple, Any] = field(default_factory=dict)  # expand weights laid out for one matmul
    loaded: tuple | None = None   # slot -> adapter id when `stacked` was filled
    # lora_fused.py
    fused: OrderedDict[tuple, dict] = field(default_factory=OrderedDict)  # slot set -> {key: tensor}
    fused_for: tuple | None = None  # the slot -> adapter mapping `fused` was built for
    carry: tuple | None = None  # (buffer data_ptr, shape, masked product, rank): shrink -> expand
    tp: int | None = None       # tensor-parallel size, read once


STATE = State()


def reset() -> None:
    """Forget every cached step and tensor (keeps `patched`: vLLM stays patched)."""
    patched = STATE.patched
    STATE.__dict__.update(State().__dict__)
    STATE.patched = patched
