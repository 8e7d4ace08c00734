"""vLLM's LoRA serving rules: the ranks it loads, and the adapter check run before publishing.

The rules mirror vLLM's `PEFTHelper` (vllm/lora/peft_helper.py) and `LoRAConfig.max_lora_rank`;
when vLLM is importable its own validator runs too, so a rule vLLM adds later is not missed.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import AdapterError

# vLLM's LoRA loader accepts only these ranks (vllm/config/lora.py, `max_lora_rank` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def base_module_names(base_model_path: Path) -> set[str]:
    """Leaf module names that hold weights in the base checkpoint (q_proj, down_proj, ...)."""
    from safetensors import safe_open

    names = set()
    for f in Path(base_model_path).glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
                    names.add(parts[-2])
    return names


def validate_adapter(adapter_dir: Path, base_model_path: Path, max_lora_rank: int) -> dict:
    """Raise AdapterError naming every rule the adapter breaks; return its LoRA facts."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter)")
    if not any(adapter_dir.glob("adapter_model.*")):
        raise AdapterError(f"{adapter_dir}: no adapter_model.safetensors/.bin weights")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from e

    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; vLLM serves only LORA")
    rank = cfg.get("r")
    if rank not in VLLM_LORA_RANKS:
        problems.append(f"rank {rank} is not one of vLLM's {list(VLLM_LORA_RANKS)}: retrain with "
                        "--rank 8 or 16")
    elif rank > max_lora_rank:
        problems.append(f"rank {rank} > max_lora_rank {max_lora_rank}: pass --max-lora-rank "
                        f"{rank} (and serve with it) or retrain with --rank <= {max_lora_rank}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM: retrain without use_dora")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']} is not supported by vLLM "
                        "(did the tokenizer gain tokens?): retrain without it")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r}: vLLM needs bias='none'")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        pass  # supported by vLLM >= 0.11; the ranks inside must still be legal
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    present = base_module_names(base_model_path)
    # PEFT may save "q_proj" or the full path "model.layers.0.self_attn.q_proj"; like vLLM,
    # match on the last component.
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    missing = [t for t in leaves if t not in present]
    if missing:
        problems.append(f"target modules {missing} do not exist in the base model "
                        f"({base_model_path}); it has {sorted(present)}")
    problems += _vllm_check(cfg, max_lora_rank) if not problems else []
    if problems:
        raise AdapterError(f"{adapter_dir} would be rejected by vLLM:\n  - " +
                           "\n  - ".join(problems))
    return {"rank": rank, "alpha": int(cfg.get("lora_alpha", rank)), "target_modules": leaves}


def _vllm_check(cfg: dict, max_lora_rank: int) -> list[str]:
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:  # the router/serve side may validate without vLLM installed
        return []
    try:
        PEFTHelper.from_dict(cfg).validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
    except ValueError as e:
        return [f"vLLM: {e}"]
    return []
