"""Tiny published experts for the serving tests: random-init LoRA adapters on the tiny Llama,
published through the real `publish_expert` with the shipped domains' seeds (so the real router
indexes real exemplars and can tell finance from law). No training: serving only needs adapters
that vLLM loads and that change the output, which random nonzero B weights do."""

from __future__ import annotations

import json
from pathlib import Path

# Every linear layer of the tiny Llama; r=8 fits vLLM's default max_lora_rank of 16.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_random_adapter(base: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA folder with nonzero A and B (init_lora_weights=False), scaled so the
    adapter visibly changes the tiny model's greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out)
    return out


# A measured validation gain for finance (it "helps": auto keeps routing to it); law stays
# unmeasured, as an old registry's experts are, which require_gain "on" also routes to.
TINY_GAINS = {"finance": {"metric": "validation_score", "expert": 0.5, "base": 0.4, "diff": 0.1,
                          "ci": [0.02, 0.18], "p_not_better": 0.01, "n": 64}}


def publish_tiny_expert(experts_dir: Path, base: Path, domain_name: str, seed: int,
                        work: Path, description: str | None = None, rank: int = 8,
                        gain: dict | None = None):
    from core.seeds import load_domain
    from specialize.publish import PublishRequest, publish_expert

    domain = load_domain(domain_name)
    if description:
        domain = domain.model_copy(update={"description": description})
    workdir, train_dir = work / domain.name / "work", work / domain.name / "train"
    (workdir / "filter").mkdir(parents=True, exist_ok=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    kept = [{"instruction": s.instruction} for s in domain.seeds[:4]]
    (workdir / "filter" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    train_file = workdir / "train.jsonl"
    train_file.write_text("".join(json.dumps({**r, "output": "ok"}) + "\n" for r in kept))
    build_random_adapter(base, train_dir / "adapter", seed, rank)
    (train_dir / "loss.json").write_text("[]")
    (train_dir / "loss.png").write_bytes(b"")
    return publish_expert(PublishRequest(
        domain=domain, experts_dir=experts_dir, workdir=workdir, train_dir=train_dir,
        train_file=train_file,
        lora={"rank": rank, "alpha": 2 * rank, "target_modules": TARGETS},
        train_summary={"examples": len(kept), "epochs": 0.0, "loss_first": None,
                       "loss_last": None, "gain": gain},
        base_model=str(base), base_model_path=base, resolved_config={"tiny": True},
        rounds=1, n_exemplars=4, seed=seed))


def build_tiny_experts(experts_dir: Path, base: Path, work: Path,
                       domains: tuple[str, ...] = ("finance", "law")) -> Path:
    experts_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(domains):
        publish_tiny_expert(experts_dir, base, name, seed=100 + i, work=work,
                            gain=TINY_GAINS.get(name))
    return experts_dir
