"""`--train-workers 2` for real: stage 5 data-parallel on two Ray Train workers (gloo, CPU) on
the tiny random Llama gives one valid adapter, published as a one-process run's would be.

As in test_distributed_integration.py, the run happens in a subprocess with its own local Ray
cluster (2 CPUs), apart from the serving fixtures' Ray session; the engine is the unit tests'
fake (no vLLM start), so what is exercised is Ray, torch.distributed, TRL and PEFT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.jsonl import read_jsonl
from core.lora import validate_adapter
from core.registry import load_registry
from tests.conftest import REPO, FakeGenerator, write_domain

pytestmark = pytest.mark.integration


def fake_engine(*args, **kwargs):  # make_generator(base_path, engine_cfg[, max_lora_rank])
    return FakeGenerator()


def test_two_gloo_workers_train_one_valid_adapter(tmp_path, tiny_model):
    seeds, experts = tmp_path / "seeds", tmp_path / "experts"
    write_domain(seeds, "pair")
    spec = {"domain": str(seeds / "pair"), "experts": str(experts), "base": str(tiny_model),
            "out": str(tmp_path / "outcome.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_train_workers_integration",
         str(tmp_path / "spec.json")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["failed"] == {} and [r["domain"] for r in outcome["results"]] == ["pair"]

    entry = load_registry(experts).get("pair")
    adapter = experts / entry.adapter_path
    assert sorted(p.name for p in adapter.iterdir() if p.name.startswith("adapter_")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    validate_adapter(adapter, tiny_model, max_lora_rank=16)  # what vLLM would refuse, refused
    folder = experts / entry.path
    assert json.loads((folder / "config.json").read_text())["train"]["workers"] == 2
    # One writer, and batch_size stays the examples per optimizer step over both ranks:
    # 8 examples, batch 4, 2 epochs = 4 steps, each logged once.
    assert [r["step"] for r in json.loads((folder / "loss.json").read_text())] == [1, 2, 3, 4]
    assert entry.train.examples == len(read_jsonl(folder / "data" / "train.jsonl")) == 8
    assert not list(experts.glob(".work/*/train/ray_train"))


def _main(spec_file: str) -> None:
    """The subprocess: the tiny config with two train workers, on a local 2-CPU Ray cluster."""
    import ray

    from specialize.distributed import build_distributed_config, specialize_distributed
    from tests.integration.test_specialize_integration import tiny_config

    spec = json.loads(Path(spec_file).read_text())
    cfg = tiny_config(Path(spec["experts"]), Path(spec["base"]),
                      train={"workers": 2, "threads": 1}, gain={"enabled": False})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = specialize_distributed([spec["domain"]], cfg,
                                         build_distributed_config("local", task_cpus=1),
                                         make_generator=fake_engine)
    finally:
        ray.shutdown()
    Path(spec["out"]).write_text(json.dumps(
        {"results": outcome.results, "failed": outcome.failed}, default=str))


if __name__ == "__main__":
    _main(sys.argv[1])
