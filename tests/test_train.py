"""Stage 5 through TRL's SFTTrainer on a tiny random Llama with the embedded model's tokenizer and
chat template: the answer-only masks are TRL's own, the batches carry them unchanged, the adapter is
one vLLM can serve, and a run killed mid-training resumes from its checkpoint to the same result as
an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from core.lora import validate_adapter
from specialize.config import TrainConfig
from specialize.train import (
    SeededOrder,
    _sft_config,
    _trainer_class,
    tokenize_example,
    train_adapter,
)

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"instruction": f"Explain idea number {i} of the field in plain words.",
         "input": "Some context:\nline two." if i % 3 == 0 else "",
         "output": f"Idea {i} is simple;\n\nit has {i} parts."} for i in range(16)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.integration.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def small(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "micro_batch_size": 2, "max_seq_len": 96,
                          "threads": 2, "learning_rate": 1e-2, **kw})


def test_answer_only_masks_equal_trl_completion_only_loss(tiny):
    """TRL's own prompt/completion preparation of the same chat turns gives exactly the ids and
    labels `tokenize_example` passes in, so handing it pre-tokenized rows loses nothing."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from core.chat import Task, user_message

    tok = AutoTokenizer.from_pretrained(tiny)
    ours = [tokenize_example(tok, r, 512) for r in ROWS[:4]]
    conv = [{"prompt": [{"role": "user", "content": user_message(Task(r["instruction"],
                                                                       r["input"]))}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in ROWS[:4]]
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    trl_side = SFTTrainer(model=model, train_dataset=Dataset.from_list(conv), processing_class=tok,
                          args=SFTConfig(output_dir="unused", report_to="none", bf16=False,
                                         use_cpu=True, max_length=512,
                                         gradient_checkpointing=False))
    for mine, theirs in zip(ours, trl_side.train_dataset, strict=True):
        assert mine["input_ids"] == theirs["input_ids"]
        assert mine["labels"] == theirs["labels"]
        assert mine["labels"][0] == -100 and mine["labels"][-1] != -100


def test_batches_carry_the_masks_in_the_seeded_order(tiny, tmp_path):
    """What the trainer feeds the model: our labels, padded with -100, in the former loop's
    order."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    examples = [tokenize_example(tok, r, 96) for r in ROWS]
    cfg = small()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    Trainer, _ = _trainer_class()
    trainer = Trainer(model=model, args=_sft_config(cfg, tmp_path, False, 2, 2),
                      train_dataset=Dataset.from_list(examples), processing_class=tok)
    loader = trainer.get_train_dataloader()
    order = list(SeededOrder(len(examples), cfg.seed))
    assert sorted(order) == list(range(16)) and order != list(range(16))
    batch = next(iter(loader))
    for row, i in zip(batch["labels"].tolist(), order[:2], strict=True):
        n = len(examples[i]["labels"])
        assert row[:n] == examples[i]["labels"] and set(row[n:]) <= {-100}
    second_epoch = SeededOrder(16, cfg.seed)
    second_epoch.set_epoch(1)
    assert list(second_epoch) != order  # a new permutation each epoch, as the former loop drew


def test_trains_an_adapter_vllm_can_serve(tiny, data, tmp_path):
    out = tmp_path / "demo" / "train"
    res = train_adapter(tiny, small(epochs=2), data, out)
    assert res["steps"] == 8 and res["examples"] == 16
    log = json.loads((out / "loss.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 9))  # every optimizer step
    assert log[-1]["epoch"] == 2.0 and log[0]["lr"] > log[-1]["lr"] > 0
    assert log[-1]["loss"] < log[0]["loss"]  # lr 1e-2 on 16 short answers: it learns
    assert (out / "loss.png").stat().st_size > 0 and not (out / "checkpoints").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["result"]["steps"] == 8

    facts = validate_adapter(out / "adapter", tiny, 16)  # vLLM's loader rules
    assert facts["rank"] == 8
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16 and not cfg.get("modules_to_save")
    assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    from safetensors import safe_open

    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)  # no embedding or lm_head rows: no new token
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out / "adapter")) == \
        len(AutoTokenizer.from_pretrained(tiny))


def test_packing_and_gradient_checkpointing_train_a_valid_adapter(tiny, data, tmp_path):
    """Packed rows (several answers per max_seq_len row, kept apart by position ids) take fewer
    optimizer steps for the same examples; checkpointed activations change nothing served."""
    out = tmp_path / "demo" / "train"
    res = train_adapter(tiny, small(packing=True, gradient_checkpointing=True, max_seq_len=256),
                        data, out)
    assert res["examples"] == 16 and 1 <= res["steps"] < 4  # ~60 tokens each: 4 steps unpacked
    assert validate_adapter(out / "adapter", tiny, 16)["rank"] == 8
    assert json.loads((out / "config.json").read_text())["train"]["packing"] is True


KILLER = """
import os, signal, sys
from pathlib import Path
from transformers import Trainer
from specialize.config import TrainConfig
from specialize.train import train_adapter

step = Trainer.training_step
def training_step(self, *a, **kw):
    if self.state.global_step == 3:  # checkpoint-2 is written: die hard in step 3, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *a, **kw)
Trainer.training_step = training_step
train_adapter(Path(sys.argv[1]), TrainConfig.model_validate_json(sys.argv[2]), Path(sys.argv[3]),
              Path(sys.argv[4]))
"""


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_adapter(tiny, data, tmp_path):
    cfg = small(epochs=2, save_steps=2)
    whole = train_adapter(tiny, cfg, data, tmp_path / "whole" / "train")

    out = tmp_path / "killed" / "train"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny), cfg.model_dump_json(),
                           str(data), str(out)],
                          check=False, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter").exists()

    with pytest.raises(Exception, match="other training settings \\(learning_rate\\)"):
        train_adapter(tiny, small(epochs=2, save_steps=2, learning_rate=1e-3), data, out)
    resumed = train_adapter(tiny, cfg.model_copy(update={"save_steps": 4}), data, out)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 8
    a = json.loads((tmp_path / "whole" / "train" / "loss.json").read_text())
    b = json.loads((out / "loss.json").read_text())
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-4)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "whole" / "train" / "adapter" / "adapter_model.safetensors")
    wb = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_quantize_4bit_on_this_cpu_fails_fast_through_the_cli(tmp_path):
    """The real `selfspec` entry point, before seeds are read or an engine starts."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may train 4-bit")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli", "specialize", "finance",
                           "--quantize", "4bit", "--experts-dir", str(tmp_path / "experts")],
                          check=False, env=env, capture_output=True, text=True, cwd=tmp_path)
    took = time.monotonic() - start
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--quantize 4bit" in lines[0] and "CUDA GPU" in lines[0], lines
    assert not (tmp_path / "experts").exists()
    assert took < 10  # ~0.9 s on the 2-core EPYC under load; the bound leaves room for a busy CI


@pytest.mark.parametrize("flags, message", [
    (["--save-steps", "0"], "train.save_steps"),
    (["--quantize", "8bit"], "invalid choice"),
])
def test_bad_training_flags_exit_2(flags, message, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli", "specialize", "finance", *flags,
                           "--experts-dir", str(tmp_path / "experts")],
                          check=False, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


class _Captured(Exception):
    pass


def test_training_flags_reach_the_config(monkeypatch):
    from selfspec.cli import main
    from specialize import cli

    def capture(domains, cfg, args):
        raise _Captured(cfg.train)

    monkeypatch.setattr(cli, "_specialize_locally", capture)
    with pytest.raises(_Captured) as got:
        main(["specialize", "finance", "--gradient-checkpointing", "--packing",
                  "--save-steps", "50"])
    train = got.value.args[0]
    assert (train.gradient_checkpointing, train.packing, train.save_steps, train.quantize) == \
        (True, True, 50, "none")
