"""Stage 5: LoRA training with PEFT on the self-generated data.

Each example is rendered with the base model's own chat template (user: instruction + input,
assistant: response), so the expert is trained on exactly what the serving endpoint sends. Loss is
on the assistant's tokens only. LoRA r=8, alpha=16 on all linear layers and no `modules_to_save`
(Self-MoE's setting; vLLM refuses adapters with modules_to_save). Nothing is added to the
tokenizer: a new token would force `lm_head` into the adapter, which vLLM cannot serve.
Writes adapter/, loss.json (every optimizer step) and loss.png.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from tqdm import tqdm

from specialize.config import GainConfig, TrainConfig
from core.jsonl import read_jsonl, write_json
from core.chat import Task, user_message


def tokenize_example(tokenizer, row: dict, max_len: int) -> dict | None:
    """input_ids with labels = -100 on the prompt part, so only the response is learned."""
    user = user_message(Task(row["instruction"], row.get("input", "")))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                           tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                          {"role": "assistant", "content": row["output"]}],
                                         tokenize=False)
    if not full.startswith(prompt):  # a template that rewrites earlier turns: cannot mask safely
        raise ValueError("chat template renders the prompt differently inside the conversation")
    # Tokenize the two parts apart so the mask boundary is exact (no BPE merge across it).
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if len(p_ids) >= max_len:
        return None  # nothing of the answer would fit
    f_ids = (p_ids + c_ids)[:max_len]
    labels = [-100] * len(p_ids) + f_ids[len(p_ids):]
    return {"input_ids": f_ids, "labels": labels}


def train_adapter(base_model_path: Path, cfg: TrainConfig, train_file: Path,
                  out_dir: Path, gain_items: list | None = None,
                  gain_cfg: GainConfig | None = None) -> dict:
    """Train, save; then, with `gain_items` (the domain's validation split), score the expert
    against the base on them while the model is still in memory (specialize/gain.py)."""
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


def plot_loss(log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss per step")
    if len(losses) >= 5:  # a moving average: per-step loss on tiny batches is noisy
        w = max(2, len(losses) // 10)
        avg = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1])
               for i in range(len(losses))]
        ax.plot(steps, avg, lw=2, label=f"moving average ({w})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("completion-token loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
