"""Stage 5's former hand-written training loop, kept only as the baseline of `selfspec bench
train` (bench/train.py): SFTTrainer (specialize/train.py) must match its loss curve and
stay within 1.2x its wall time on CPU. Nothing in the pipeline calls it.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from tqdm import tqdm

from core.jsonl import read_jsonl, write_json
from specialize.config import GainConfig, TrainConfig
from specialize.train import plot_loss, tokenize_example


def train_adapter_loop(base_model_path: Path, cfg: TrainConfig, train_file: Path,
                  out_dir: Path, gain_items: list | None = None,
                  gain_cfg: GainConfig | None = None) -> dict:
    """The hand-written loop stage 5 used before SFTTrainer, kept verbatim for `selfspec bench
    train` only: the same data, seed and settings through both, timed side by side."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    rows = read_jsonl(train_file)
    examples = [e for e in (tokenize_example(tokenizer, r, cfg.max_seq_len) for r in rows) if e]
    if not examples:
        raise ValueError(f"no usable training examples in {train_file}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # fp32: CPU bf16 matmul is slow
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype).to(device)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()

    micro = min(cfg.micro_batch_size, cfg.batch_size)
    accum = math.ceil(cfg.batch_size / micro)
    steps_per_epoch = math.ceil(len(examples) / (micro * accum))
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.learning_rate, weight_decay=0.0)
    warmup = int(total * cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else
        max(0.0, (total - s) / max(1, total - warmup)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rng = random.Random(cfg.seed)
    log, step, started = [], 0, time.time()
    bar = tqdm(total=total, desc=f"train {out_dir.parent.name}", unit="step")
    order: list[int] = []
    while step < total:
        loss_sum, tokens = 0.0, 0
        for _ in range(accum):
            if len(order) < micro:
                order += rng.sample(range(len(examples)), len(examples))
            batch = [examples[i] for i in order[:micro]]
            del order[:micro]
            n = max(len(e["input_ids"]) for e in batch)
            ids = torch.tensor([e["input_ids"] + [pad] * (n - len(e["input_ids"])) for e in batch])
            labels = torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in batch])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"]))
                                 for e in batch])
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device))
            (out.loss / accum).backward()
            count = int((labels[:, 1:] != -100).sum())
            loss_sum += float(out.loss.detach()) * count
            tokens += count
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss = loss_sum / max(1, tokens)
        log.append({"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": loss,
                    "lr": sched.get_last_lr()[0]})
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "adapter")
    tokenizer.save_pretrained(out_dir / "adapter")  # same tokenizer: servers may load it
    write_json(out_dir / "loss.json", log)
    plot_loss(log, out_dir / "loss.png", title=f"{out_dir.parent.name}: LoRA r={cfg.rank}")
    summary = {"examples": len(examples), "steps": total, "epochs": cfg.epochs,
               "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
               "seconds": round(time.time() - started, 1)}
    if gain_items:
        from specialize.gain import measure_gain

        t = time.time()
        summary["gain"] = measure_gain(model, tokenizer, gain_items, gain_cfg or GainConfig(),
                                       cfg.seed)
        summary["gain_seconds"] = round(time.time() - t, 1)
    write_json(out_dir / "config.json", {"train": cfg.model_dump(mode="json"),
                                         "base_model_path": str(base_model_path),
                                         "result": summary})
    return summary
