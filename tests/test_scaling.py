"""Scaling flags reach what they configure: `--tensor-parallel-size` reaches vLLM's engine
arguments and Ray's per-task GPU count; the scale bench's fake pipeline keeps what it should."""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest

from bench.scale import HashEncoder, run_size
from core.encoder import MemoEncoder
from core.engine import EngineConfig, VllmGenerator
from core.errors import ConfigError
from selfspec.cli import main
from specialize.config import FilterConfig, build_config
from specialize.distributed import TaskResources, build_distributed_config, resolve_resources
from specialize.filter import InstructionFilter
from specialize.prompts import Task
from specialize.quality import DomainReference
from tests.conftest import write_domain


class _RecordingLLM:
    """Stands in for vllm.LLM: records its keyword arguments, builds nothing."""

    last: ClassVar[dict] = {}

    def __init__(self, **kwargs):
        type(self).last = kwargs
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(dtype="torch.float32"))

    def get_tokenizer(self):
        return None


@pytest.fixture
def recording_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_RecordingLLM))
    _RecordingLLM.last = {}
    return _RecordingLLM


@pytest.mark.parametrize("size", [1, 4])
def test_tensor_parallel_size_reaches_vllm_engine_args(recording_vllm, tmp_path, size):
    VllmGenerator(tmp_path, EngineConfig(tensor_parallel_size=size, dtype="float32"))
    assert recording_vllm.last["tensor_parallel_size"] == size


def test_tensor_parallel_size_from_cli_flag(recording_vllm, tmp_path, monkeypatch):
    """The flag travels CLI -> SpecializeConfig -> engine: the run stops at the engine start."""
    root = tmp_path / "seeds"
    write_domain(root, "demo")
    monkeypatch.setenv("SELFSPEC_SEEDS_DIR", str(root))
    seen = {}

    def stop(domains, cfg, **kwargs):
        seen["tp"] = cfg.engine.tensor_parallel_size
        return []

    monkeypatch.setattr("specialize.pipeline.specialize", stop)
    main(["specialize", "demo", "--experts-dir", str(tmp_path / "e"),
          "--tensor-parallel-size", "2"])
    assert seen["tp"] == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_tensor_parallel_size_must_be_positive(bad):
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size"):
        build_config(engine={"tensor_parallel_size": bad})


def test_tensor_parallel_tasks_ask_for_that_many_gpus():
    nodes = [{"CPU": 16, "GPU": 8}]
    auto = build_distributed_config("auto")
    assert resolve_resources(auto, nodes, tensor_parallel_size=4) == TaskResources(1, 4.0, None)
    # On a CPU-only cluster there are no GPUs to ask for; a declared count still wins.
    assert resolve_resources(auto, [{"CPU": 8}], tensor_parallel_size=4).num_gpus == 0
    declared = build_distributed_config("auto", task_gpus=2)
    assert resolve_resources(declared, nodes, tensor_parallel_size=4).num_gpus == 2


def test_scale_bench_size_keeps_its_target_and_catches_near_repeats():
    row = run_size("finance", 80, "fake", seed=0)
    assert row["kept"] == 80 and row["num_instructions"] == 80
    assert row["candidates"] > 80
    # The fake generator rewords a tenth of its items: the ROUGE filter must catch them.
    assert row["rejected"].get("near_duplicate", 0) > 0
    assert row["peak_rss_mib"] > 0 and row["total_s"] > 0


class _CountingEncoder:
    name, dim = "counting", 384

    def __init__(self):
        self.inner, self.calls = HashEncoder(), []

    def encode(self, texts):
        self.calls.append(len(texts))
        return self.inner.encode(texts)


def test_filter_embeds_a_batch_of_candidates_in_one_encoder_call():
    counting = _CountingEncoder()
    sets = {"demo": ["Explain what a bond yield measures.", "Describe how interest compounds."],
            "other": ["Name the bones of the human arm.", "What does a kidney filter?"]}
    ref = DomainReference(MemoEncoder(counting), "demo", sets)
    filt = InstructionFilter(FilterConfig(max_perplexity_ratio=None), [], [], reference=ref)
    tasks = [Task(f"Explain how bond yield number {i} compounds over time.",
                  "" if i % 2 else f"A bond with coupon {i} percent.") for i in range(40)]
    counting.calls.clear()
    filt.warm(tasks)
    assert len(counting.calls) == 1 and counting.calls[0] == 40 + 2 * 20  # texts + both halves
    verdicts = [filt.check(t) for t in tasks]
    assert len(counting.calls) == 1  # every check was served from the memo
    assert any(v.reason is None for v in verdicts)


def test_train_workers_need_ray(tmp_path, monkeypatch, capsys):
    root = tmp_path / "seeds"
    write_domain(root, "demo")
    monkeypatch.setenv("SELFSPEC_SEEDS_DIR", str(root))
    code = main(["specialize", "demo", "--experts-dir", str(tmp_path / "e"),
                 "--train-workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--train-workers 2 only apply to a run on Ray" in err
    with pytest.raises(ConfigError, match="train.workers"):
        build_config(train={"workers": 0})


def test_train_workers_outside_ray_is_a_config_error(tmp_path, monkeypatch):
    import ray

    from specialize.config import TrainConfig
    from specialize.train_workers import train_adapter_on_workers

    # The suite's integration tests leave a Ray session up in this process; this checks the
    # path a process without one takes (otherwise fit() would wait for workers' CPUs forever).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match="add --ray-address"):
        train_adapter_on_workers(tmp_path, TrainConfig(workers=2), tmp_path / "t.jsonl", tmp_path)


def test_stage1_scores_a_generated_batch_in_one_engine_call():
    """The perplexity judge gets the candidates that pass the rule checks together, once."""
    calls = []

    def judge(texts):
        calls.append(list(texts))
        return [1.0 for _ in texts]

    seeds = [Task(f"Explain what seed number {i} says about bonds.") for i in range(4)]
    filt = InstructionFilter(FilterConfig(max_perplexity_ratio=4.0, wellformed=True), seeds, [],
                             judge=judge)
    batch = [Task(f"Explain how coupon {i} changes a bond's price over {i} years.")
             for i in range(6)] + [Task("too short"), Task("Draw a picture of a bond market.")]
    filt.warm(batch)
    assert len(calls) == 2  # the seeds' median first, then the batch
    assert len(calls[1]) == 6  # the two that fail the rule checks are not scored
    verdicts = [filt.check(t).reason for t in batch]
    assert len(calls) == 2  # every check found its score ready
    assert verdicts[-2:] == ["too_short", "not_text_task"]
    assert verdicts.count(None) >= 1
