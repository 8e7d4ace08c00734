"""A tiny random Llama (2 layers, width 64) with the embedded model's tokenizer and chat template:
vLLM and PEFT load it like any model, in seconds."""

from __future__ import annotations

from pathlib import Path


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.base_model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64,  # vLLM CPU attention: 64
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
