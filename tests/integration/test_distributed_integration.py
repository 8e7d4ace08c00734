"""`specialize --ray-address local` for real: domains as Ray tasks on a local cluster, the tiny
random Llama, one shared registry.

Each run happens in a subprocess with its own local Ray cluster, so it neither needs nor
disturbs the Ray session that the serving fixtures start in the pytest process.

1. Two domains, real vLLM engines (one per task), real PEFT: both publish into one registry
   concurrently and the router index is rebuilt for both.
2. Sharding and failure isolation with a fake engine (no engine start, so it takes seconds): a
   domain answered by 2 shard tasks publishes, while a domain whose engine fails is reported
   with its reason and keeps its work dir for --resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.jsonl import read_jsonl
from core.registry import load_registry
from tests.conftest import REPO, FakeGenerator, write_domain

pytestmark = pytest.mark.integration


class FailsFor(FakeGenerator):
    """The fake engine, except that it breaks on the prompts of one domain."""

    def complete(self, prompts, sampling, adapter=None):
        if any("broken" in p for p in prompts):
            raise RuntimeError("engine lost for the broken domain")
        return super().complete(prompts, sampling, adapter)


def fake_engine(*args, **kwargs):  # make_generator(base_path, engine_cfg[, max_lora_rank])
    return FailsFor()


def run_in_subprocess(spec: dict, tmp_path: Path) -> tuple[dict, str, float]:
    """Run `_main` below in a fresh interpreter; return (outcome, stderr, seconds)."""
    spec_file, out_file = tmp_path / "spec.json", tmp_path / "outcome.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out_file)}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_distributed_integration", str(spec_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    seconds = time.time() - started
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out_file.read_text()), proc.stderr, seconds


def test_two_domains_publish_concurrently_into_one_registry(tmp_path, tiny_model):
    experts = tmp_path / "experts"
    outcome, stderr, seconds = run_in_subprocess(
        {"domains": ["math", "finance"], "experts": str(experts), "base": str(tiny_model),
         "task_cpus": 1}, tmp_path)
    print(f"two domains on Ray with vLLM: {seconds:.0f} s; stages (s): " +
          "; ".join(f"{r['domain']} {r['seconds']}" for r in outcome["results"]))
    assert outcome["failed"] == {}
    assert [r["domain"] for r in outcome["results"]] == ["math", "finance"]
    reg = load_registry(experts)
    assert sorted(reg.experts) == ["finance", "math"]
    # Two publishers, one lock: each bumped the revision once, nobody overwrote the other.
    assert reg.revision == 2 and {e.version for e in reg.experts.values()} == {1}
    for name, entry in reg.experts.items():
        assert (experts / entry.adapter_path / "adapter_config.json").is_file()
        assert (experts / name).resolve() == (experts / entry.path).resolve()
    assert not any((experts / ".work").glob("*/")) and not list((experts / ".work").glob(".probe-*"))
    meta = json.loads((experts / "router" / "meta.json").read_text())
    assert meta["registry_revision"] == 2 and sorted(meta["experts"]) == ["finance", "math"]
    assert "2 domain(s) on Ray at local: 1 CPU, 0 GPU per task" in stderr
    assert "ok     math: published v1" in stderr and "ok     finance: published v1" in stderr


def test_sharded_domain_publishes_and_a_failed_one_is_reported(tmp_path, tiny_model):
    seeds = tmp_path / "seeds"
    for name in ("sharded", "broken"):
        write_domain(seeds, name)
    experts = tmp_path / "experts"
    outcome, stderr, _ = run_in_subprocess(
        {"domains": [str(seeds / "sharded"), str(seeds / "broken")], "experts": str(experts),
         "base": str(tiny_model), "task_cpus": 1, "shards": ["sharded=2"], "fake": True},
        tmp_path)
    assert [r["domain"] for r in outcome["results"]] == ["sharded"]
    assert outcome["failed"]["broken"].startswith(
        "RuntimeError: engine lost for the broken domain (details: ")
    reg = load_registry(experts)
    assert list(reg.experts) == ["sharded"] and reg.revision == 1
    data = experts / reg.get("sharded").path / "data"
    kept = [r["id"] for r in read_jsonl(data / "kept_instructions.jsonl")]
    # Both shards answered, merged back in kept order, trained on.
    assert [r["id"] for r in read_jsonl(data / "responses.jsonl")] == kept and len(kept) == 8
    assert len(read_jsonl(data / "train.jsonl")) == 8
    work = experts / ".work" / "broken"
    assert "RuntimeError: engine lost" in (work / "error.log").read_text()
    assert (work / "state.json").is_file()  # kept for --resume
    assert json.loads((experts / "router" / "meta.json").read_text())["experts"] == ["sharded"]
    assert "FAILED broken" in stderr and "respond shards {'sharded': 2}" in stderr


def _main(spec_file: str) -> None:
    """The subprocess: build the tiny config and run the distributed driver."""
    from selfspec.cli import rebuild_router_index
    from specialize.distributed import build_distributed_config, specialize_distributed
    from tests.integration.test_specialize_integration import tiny_config

    spec = json.loads(Path(spec_file).read_text())
    cfg = tiny_config(Path(spec["experts"]), Path(spec["base"]))
    dcfg = build_distributed_config("local", spec.get("shards"), task_cpus=spec["task_cpus"])
    make = {"make_generator": fake_engine} if spec.get("fake") else {}
    outcome = specialize_distributed(spec["domains"], cfg, dcfg, **make)
    if outcome.results:  # what the selfspec command does after a run publishes
        rebuild_router_index(cfg.experts_dir)
    Path(spec["out"]).write_text(json.dumps(
        {"results": outcome.results, "failed": outcome.failed}))


if __name__ == "__main__":
    _main(sys.argv[1])
