"""The engine half of `selfspec bench serving`: how multi-LoRA batching scales with the number of
distinct experts in one vLLM engine, and what one engine with N experts costs in weight memory
against N merged model copies.

Runs in its own process (`python -m bench.serving_engine SPEC.json OUT.json`) so that its engine's
memory and threads are gone before the HTTP phases start. One engine, `max_loras` = the largest
N, prefix caching off (every setup sends the same prompts; a cache hit would flatter the later
ones), every answer exactly `max_tokens` long. Setups: base only, one expert, and the batch spread
round-robin over 2/4/8/16 experts, run in alternation for `rounds` rounds (medians reported).
The registry's real adapters come first; the rest are random-init adapters of the same shape
(throughput does not depend on what the weights say).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SWEEP = (2, 4, 8, 16)


def synthetic_adapters(base: Path, like: Path, n: int, out: Path) -> list[Path]:
    """n random LoRA adapters with the config of the adapter at `like` (rank, targets)."""
    if n <= 0:
        return []
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = json.loads((like / "adapter_config.json").read_text())
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"]))
    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.normal_(0.0, 0.02)
        path = out / f"synthetic-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def memory_table(base: Path, adapters: list[Path], max_rank: int, sizes) -> list[dict]:
    """Weights only (the KV cache is the same budget either way): one engine holds the base once,
    every adapter in its CPU LoRA cache and `max_loras` rank-padded slots; merged serving holds
    one full model per expert."""
    base_b = weight_bytes(base)
    cfg = json.loads((adapters[0] / "adapter_config.json").read_text())
    per = weight_bytes(adapters[0])
    slot = per * max_rank / cfg["r"]
    rows = []
    for n in sizes:
        one = base_b + n * per + n * slot
        rows.append({"experts": n, "one_engine_mb": round(one / 2**20, 1),
                     "merged_copies_mb": round(n * base_b / 2**20, 1),
                     "ratio_merged_over_engine": round(n * base_b / one, 2)})
    return rows


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base = Path(spec["base"])
    real = [Path(p) for p in spec["adapters"]]
    n_max = max(SWEEP)
    extra = synthetic_adapters(base, real[0], n_max - len(real), Path(spec["tmp"]))
    adapters = (real + extra)[:n_max]
    llm = LLM(str(base), enable_lora=True, max_lora_rank=spec["max_lora_rank"],
              max_loras=n_max, max_cpu_loras=n_max, max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], gpu_memory_utilization=0.5,
              enable_prefix_caching=False, seed=0, dtype=spec.get("dtype", "auto"))
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                       add_generation_prompt=True) for t in spec["texts"]]
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]

    def run_once(lora_for) -> tuple[float, int]:
        reqs = [lora_for(i) for i in range(len(prompts))]
        t0 = time.perf_counter()
        out = llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in out)

    choices = {"base": lambda i: None, "experts_1": lambda i: loras[0]}
    choices |= {f"experts_{n}": (lambda i, n=n: loras[i % n]) for n in SWEEP}
    # Warm-up: every adapter resident, every shape compiled. Then the setups in alternation,
    # `rounds` times, and the median of each: drift on a shared machine hits them all alike.
    llm.generate(prompts[:n_max], sp, lora_request=[loras[i] for i in range(n_max)],
                 use_tqdm=False)
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in choices}
    for _ in range(max(1, spec.get("rounds", 1))):
        for name, lora_for in choices.items():
            runs[name].append(run_once(lora_for))
    setups = {}
    for name, rs in runs.items():
        rates = [toks / dt for dt, toks in rs]
        dt, toks = sorted(rs, key=lambda r: r[1] / r[0])[(len(rs) - 1) // 2]
        setups[name] = {"seconds": round(dt, 3), "completion_tokens": toks,
                        "tokens_per_s": round(toks / dt, 2),
                        "runs_tokens_per_s": [round(r, 2) for r in rates]}
    print("[bench] engine: " + ", ".join(f"{k} {v['tokens_per_s']}" for k, v in setups.items()),
          file=sys.stderr, flush=True)
    single = setups["experts_1"]["tokens_per_s"]
    return {"requests": len(prompts), "max_tokens": spec["max_tokens"],
            "synthetic_adapters": len(extra), "max_loras": n_max,
            "rounds": max(1, spec.get("rounds", 1)),
            "cpu_lora_ops": "fused (plugins/selfspec-vllm-cpu/selfspec_vllm_cpu/lora_fused.py)"
            if os.environ.get("SELFSPEC_CPU_LORA", "1") != "0" else "vLLM torch_ops",
            "setups": setups,
            "mixed_over_single": {str(n): round(setups[f"experts_{n}"]["tokens_per_s"] / single, 3)
                                  for n in SWEEP},
            "memory": memory_table(base, adapters, spec["max_lora_rank"], (1,) + SWEEP)}


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1], sys.argv[2]
    result = run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
