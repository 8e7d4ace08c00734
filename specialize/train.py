"""Stage 5: LoRA training on the self-generated data, through TRL's SFTTrainer with a PEFT LoRA.

Each example is rendered with the base model's own chat template (user: instruction + input,
assistant: response), so the expert is trained on exactly what the serving endpoint sends. Loss is
on the assistant's tokens only: the examples reach SFTTrainer already tokenized, with labels -100
on the prompt (`tokenize_example`), and TRL keeps a dataset's own labels. LoRA r=8, alpha=16 on all
linear layers and no `modules_to_save` (Self-MoE's setting; vLLM refuses adapters with
modules_to_save). Nothing is added to the tokenizer: a new token would force `lm_head` into the
adapter, which vLLM cannot serve.

The trainer brings what a long run on a big model needs: 4-bit QLoRA (bitsandbytes, CUDA only),
gradient checkpointing, packing, a checkpoint every `save_steps` optimizer steps in
`<out>/checkpoints`, and resuming from the newest one. Under torch.distributed (LOCAL_RANK and
WORLD_SIZE set, as Ray Train's TorchTrainer does) every rank trains its share of each batch and only
rank 0 writes. Writes adapter/, loss.json (every optimizer step), loss.png and config.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from core.chat import Task, user_message
from core.errors import ConfigError
from core.jsonl import read_jsonl, write_json
from specialize.config import GainConfig, TrainConfig

# Settings that may change between an interrupted run and its --resume: they change how fast the
# run goes, not what it computes.
_RESUMABLE_CHANGES = {"threads", "save_steps"}


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


def check_quantize(quantize: str) -> None:
    """4-bit QLoRA needs bitsandbytes and a CUDA GPU. Checked before any engine starts; the
    package check comes first because it needs no torch import (under a second on any machine)."""
    if quantize == "none":
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--quantize 4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package, "
                          "which is not installed: pip install bitsandbytes on a GPU machine, or "
                          "train without --quantize")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--quantize 4bit (QLoRA) needs a CUDA GPU and this machine has none: "
                          "train without --quantize")


class SeededOrder:
    """Epoch e visits the examples in the (e+1)-th permutation drawn from random.Random(seed): the
    former loop's order, so one seed trains on the same batches as before (exactly when the example
    count is a multiple of the batch size), and a resumed run replays the epoch it stopped in
    (the trainer calls set_epoch and skips the batches already done)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = random.Random(self.seed)
        for _ in range(self.epoch):
            rng.sample(range(self.n), self.n)
        return iter(rng.sample(range(self.n), self.n))


def _trainer_class():
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        warmup_ratio = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.args.device.type == "cuda":  # TRL's fused LM head: no full logits in memory
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Off CUDA the fused head scores every position, prompt and padding included, and
            # recomputes the logits in backward: 1.7-1.9x the CPU time of the plain head (a
            # 49K-vocabulary head is a fifth of the 135M model's FLOPs). The plain one computes
            # the same token-weighted loss (docs/scaling.md, "Training backend").
            inputs["use_cache"] = False
            return HFTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            return SeededOrder(len(train_dataset or self.train_dataset), self.args.seed)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # The former loop's warmup, int(total * ratio); transformers rounds a ratio up, which
            # on a short run turns 0.8 steps into a whole step at learning rate 0.
            self.args.warmup_steps = int(num_training_steps * self.warmup_ratio)
            return super().create_scheduler(num_training_steps, optimizer)

    class Progress(TrainerCallback):
        """The pipeline's tqdm bar (one per domain, loss in the postfix) in place of the trainer's
        own bar and log printer."""

        def __init__(self, desc: str):
            self.desc, self.bar = desc, None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc,
                                unit="step")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(state.global_step - self.bar.n)
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Trainer, Progress


def _load_model(base_model_path: Path, cfg: TrainConfig, on_cuda: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # fp32 on CPU: bf16 matmuls there are slow without AMX.
    kwargs = {"dtype": torch.bfloat16 if on_cuda else torch.float32}
    if cfg.quantize == "4bit":
        import os

        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base_model_path, **kwargs)
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    # Wrapped here rather than through SFTTrainer's peft_config, so that the adapter's random
    # init comes right after the seeded model load (as in the former loop).
    return get_peft_model(model, lora)


def _sft_config(cfg: TrainConfig, ckpt_dir: Path, on_cuda: bool, micro: int, accum: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(ckpt_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, weight_decay=0.0, lr_scheduler_type="linear",
        max_grad_norm=1.0, optim="adamw_torch", seed=cfg.seed, data_seed=cfg.seed,
        bf16=on_cuda, fp16=False, use_cpu=not on_cuda, dataloader_pin_memory=on_cuda,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        packing=cfg.packing, max_length=cfg.max_seq_len, shuffle_dataset=False,
        logging_steps=1, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 1, report_to="none", disable_tqdm=True)


def _resume_point(ckpt_dir: Path, cfg: TrainConfig) -> str | None:
    """The newest checkpoint to continue from, after checking that it was made with the same
    training settings; None when there is none."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last is None:
        return None
    saved_file = ckpt_dir / "train_config.json"
    if not saved_file.exists():  # written by rank 0 before the first checkpoint; absent: trust it
        return last
    saved = json.loads(saved_file.read_text())
    now = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"the checkpoints in {ckpt_dir} were made with other training settings "
                          f"({', '.join(changed)}): pass them as before, or --restart")
    return last


def train_adapter(base_model_path: Path, cfg: TrainConfig, train_file: Path,
                  out_dir: Path, gain_items: list | None = None,
                  gain_cfg: GainConfig | None = None) -> dict:
    """Train, save; then, with `gain_items` (the domain's validation split), score the expert
    against the base on them while the model is still in memory (specialize/gain.py). Continues
    from the newest checkpoint in `out_dir/checkpoints` when one is there (a --resume)."""
    check_quantize(cfg.quantize)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    rows = read_jsonl(train_file)
    examples = [e for e in (tokenize_example(tokenizer, r, cfg.max_seq_len) for r in rows) if e]
    if not examples:
        raise ValueError(f"no usable training examples in {train_file}")
    ckpt_dir = out_dir / "checkpoints"
    resume_from = _resume_point(ckpt_dir, cfg)

    on_cuda = torch.cuda.is_available()
    model = _load_model(base_model_path, cfg, on_cuda)
    # batch_size is the examples per optimizer step over all ranks (WORLD_SIZE: Ray Train's
    # workers, specialize/train_workers.py): each rank takes its share of every batch.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = min(cfg.micro_batch_size, -(-cfg.batch_size // world))
    accum = max(1, -(-cfg.batch_size // (micro * world)))
    Trainer, Progress = _trainer_class()
    trainer = Trainer(model=model, args=_sft_config(cfg, ckpt_dir, on_cuda, micro, accum),
                      train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                      callbacks=[Progress(f"train {out_dir.parent.name}")])
    trainer.warmup_ratio = cfg.warmup_ratio
    trainer.remove_callback(PrinterCallback)
    rank0 = trainer.is_world_process_zero()
    if rank0 and cfg.save_steps and resume_from is None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(ckpt_dir / "train_config.json", cfg.model_dump(mode="json"))

    started = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    log = [{"step": r["step"], "epoch": round(r["epoch"], 3), "loss": r["loss"],
            "lr": r["learning_rate"]} for r in trainer.state.log_history if "loss" in r]
    model = trainer.model
    summary = {"examples": len(examples), "steps": trainer.state.global_step,
               "epochs": cfg.epochs, "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
               "seconds": round(time.time() - started, 1)}
    if resume_from:
        summary["resumed_from_step"] = int(Path(resume_from).name.split("-")[-1])
    if not rank0:
        return summary

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "adapter")
    tokenizer.save_pretrained(out_dir / "adapter")  # same tokenizer: servers may load it
    write_json(out_dir / "loss.json", log)
    plot_loss(log, out_dir / "loss.png", title=f"{out_dir.parent.name}: LoRA r={cfg.rank}")
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the adapter is saved: nothing left to resume
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
