"""A short check of LoRA training on whatever accelerator this machine has; not part of the
library and never run by CI.

    python bench/gpu_check.py                 # bf16 LoRA (+ 4-bit QLoRA if bitsandbytes is here)
    python bench/gpu_check.py --device cpu    # fp32 dry run of the same steps

It builds a tiny random Llama in a temporary folder (no hub, no tokenizer: the batches are random
token ids), trains a rank-8 LoRA on every linear layer with the loss on the second half of each
row only (as stage 5 masks the prompt), saves the adapter, loads it back onto a fresh base with
PEFT and checks that the reloaded model gives the trained model's logits. Each mode prints one
JSON line: steps/s and tokens/s over the timed steps (after warm-up), peak accelerator memory,
first and last loss, and whether the reload matched. With `$OUT` set (the device runner's output
folder) the lines also go to `$OUT/gpu_check.jsonl`.

Only torch, transformers and peft are needed (a lent GPU machine has these, and no network, no
vLLM, no Ray); the loop is plain torch, so trl and accelerate need not travel with it. The exit
status is 0 only if every mode that ran trained (loss fell) and reloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(folder: Path, args) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64),
                         max_position_embeddings=2 * args.seq_len, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_base(folder: Path, mode: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    if mode == "4bit":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q,
                                                    dtype=torch.bfloat16, device_map={"": 0})
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)


def batches(args, device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    # A learnable pattern (each row repeats a short random motif), so the loss must fall.
    for _ in range(args.steps + args.warmup):
        motif = torch.randint(0, args.vocab, (args.batch, 16), generator=g)
        ids = motif.repeat(1, args.seq_len // 16)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100  # loss on the "answer" half only
        yield ids.to(device), labels.to(device)


def run_mode(folder: Path, mode: str, device: str, args) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = load_base(folder, mode, device)
    if mode == "4bit":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, started = [], None
    for step, (ids, labels) in enumerate(batches(args, device)):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() syncs: each step is really finished
    seconds = time.perf_counter() - started

    # Reload: the saved adapter on a fresh base must reproduce the trained model's logits.
    model.eval()
    probe = next(batches(args, device))[0][:2]
    with torch.no_grad():
        want = model(input_ids=probe).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        del model, opt
        reloaded = PeftModel.from_pretrained(load_base(folder, mode, device), tmp).eval()
        with torch.no_grad():
            got = reloaded(input_ids=probe).logits.float()
    diff = (got - want).abs().max().item()
    tol = 1e-4 if mode == "fp32" else 5e-2  # bf16/4-bit kernels may reorder sums
    return {
        "mode": mode, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "model": f"llama {args.layers}x{args.hidden}, vocab {args.vocab}",
        "batch": args.batch, "seq_len": args.seq_len, "timed_steps": args.steps,
        "steps_per_s": round(args.steps / seconds, 3),
        "tokens_per_s": round(args.steps * args.batch * args.seq_len / seconds),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "adapter_files": files, "reload_max_abs_diff": diff,
        "ok": losses[-1] < losses[0] and diff <= tol and "adapter_model.safetensors" in files,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quantize", choices=["auto", "none", "4bit"], default="auto",
                   help="auto: also a 4-bit QLoRA run when CUDA and bitsandbytes are here")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("gpu_check: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if args.device in ("auto", "cuda") and cuda else "cpu"
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if args.quantize == "4bit" and not (device == "cuda" and has_bnb):
        print("gpu_check: error: --quantize 4bit needs a CUDA device and bitsandbytes "
              f"(device {device}, bitsandbytes {'present' if has_bnb else 'missing'})",
              file=sys.stderr)
        return 2
    modes = ["bf16" if device == "cuda" else "fp32"]
    if args.quantize == "4bit" or (args.quantize == "auto" and device == "cuda" and has_bnb):
        modes.append("4bit")
    import peft
    import transformers

    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "cuda": torch.version.cuda if cuda else None,
                      "bitsandbytes": has_bnb, "modes": modes}), flush=True)
    out = Path(os.environ["OUT"]) / "gpu_check.jsonl" if os.environ.get("OUT") else None
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "tiny-llama", args)
        for mode in modes:
            try:
                row = run_mode(folder, mode, device, args)
            except Exception as e:  # noqa: BLE001 - report the mode's failure, try the next
                row = {"mode": mode, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            ok &= row["ok"]
            print(json.dumps(row), flush=True)
            if out:
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print("gpu_check: " + ("ok" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
