"""`--ray-address` without a cluster: every bad input is refused on the driver before Ray is
contacted, resources are checked against the nodes, and a sharded respond stage (fake engine)
gives the same answers, in the same order, as the sequential one."""

from __future__ import annotations

import json

import pytest

from core.errors import ConfigError, RegistryError, SeedError, UnknownDomainError
from core.jsonl import read_jsonl
from core.seeds import load_domain
from selfspec.cli import main
from specialize import distributed
from specialize.config import build_config
from specialize.distributed import (
    Outcome,
    TaskResources,
    build_distributed_config,
    check_driver,
    check_fits,
    reason,
    resolve_resources,
    specialize_distributed,
)
from specialize.respond import generate_responses
from specialize.shards import check_shared, merge_shards, prepare_shards, respond_shard
from tests.conftest import FakeGenerator, seeds_dir


@pytest.fixture
def seeds(tmp_path, monkeypatch):
    return seeds_dir(tmp_path, monkeypatch)


@pytest.fixture
def base(fake_base):
    return fake_base


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must never get as far as connecting to Ray."""
    def fail(*_):
        raise AssertionError("Ray was contacted before the input was checked")

    monkeypatch.setattr(distributed, "_connect", fail)


def cfg_for(tmp_path, base, **over):
    # The fake's "Explain t1w0 ... clearly" is no real task: the meaning filters stay off.
    return build_config(base_model=str(base), experts_dir=tmp_path / "experts",
                        respond={"retrieval": "none", "batch_size": 3},
                        generate={"num_instructions": 10, "prompts_per_batch": 2},
                        filter={"wellformed": False, "relevance": False}, **over)


# --- settings ------------------------------------------------------------------------------

def test_shards_parse_count_and_per_domain():
    d = build_distributed_config("auto", ["3", "beta=5"])
    assert d.shards_for("alpha") == 3 and d.shards_for("beta") == 5
    assert build_distributed_config("local").shards_for("x") == 1


@pytest.mark.parametrize("address, shards, message", [
    ("auto", ["x"], "--shards takes K or DOMAIN=K"),
    ("auto", ["=3"], "--shards takes K or DOMAIN=K"),
    ("auto", ["a=b"], "--shards takes K or DOMAIN=K"),
    ("auto", ["0"], "shards"),
    ("auto", ["a=0"], "shard counts must be 1..64"),
    ("nowhere", None, "is not a Ray address"),
])
def test_bad_ray_settings(address, shards, message):
    with pytest.raises(ConfigError, match=message):
        build_distributed_config(address, shards)


def test_default_resources_gpu_cluster():
    nodes = [{"CPU": 8, "GPU": 2, "memory": 64 * 2**30}, {"CPU": 4, "GPU": 1}]
    res = resolve_resources(build_distributed_config("auto"), nodes)
    assert res == TaskResources(1.0, 1.0, None)
    assert res.options() == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_default_resources_cpu_cluster_take_a_whole_node():
    # A head node started with --num-cpus 0 takes no tasks: it does not set the size.
    nodes = [{"CPU": 0}, {"CPU": 16}, {"CPU": 8}]
    assert resolve_resources(build_distributed_config("auto"), nodes) == TaskResources(8, 0, None)


def test_declared_resources_win():
    d = build_distributed_config("auto", task_cpus=2, task_gpus=0.5, task_memory_gib=3)
    res = resolve_resources(d, [{"CPU": 8, "GPU": 1}])
    assert res == TaskResources(2, 0.5, 3 * 2**30)
    assert res.options()["memory"] == 3 * 2**30


def test_unsatisfiable_resources_refused():
    nodes = [{"CPU": 2, "memory": 8 * 2**30}]
    check_fits(TaskResources(2, 0, 4 * 2**30), nodes)
    with pytest.raises(ConfigError, match="no node of the Ray cluster can run") as e:
        check_fits(TaskResources(1, 1, None), nodes)
    assert "--task-gpus" in str(e.value) and "2 CPU, 0 GPU" in str(e.value)
    with pytest.raises(ConfigError, match="no node"):
        check_fits(TaskResources(4, 0, None), nodes)
    with pytest.raises(ConfigError, match="no node"):
        check_fits(TaskResources(1, 0, 16 * 2**30), nodes)


# --- driver checks: fail fast, change nothing -----------------------------------------------

@pytest.mark.parametrize("domains, shards, error, message", [
    (["nope"], None, UnknownDomainError, "unknown domain 'nope'"),
    (["alpha", "alpha"], None, ConfigError, "named twice"),
    (["alpha"], ["beta=2"], ConfigError, r"--shards names \['beta'\]"),
])
def test_bad_domains_refused_before_ray(tmp_path, seeds, base, no_ray, domains, shards, error,
                                        message):
    cfg = cfg_for(tmp_path, base)
    with pytest.raises(error, match=message):
        specialize_distributed(domains, cfg, build_distributed_config("auto", shards))
    assert not (tmp_path / "experts" / "registry.json").exists()


def test_malformed_seeds_refused_before_ray(tmp_path, seeds, base, no_ray):
    (seeds / "beta" / "seeds.yaml").write_text("domain: beta\ndescription: short\nseeds: []\n")
    with pytest.raises(SeedError, match="seeds.yaml"):
        specialize_distributed(["alpha", "beta"], cfg_for(tmp_path, base),
                               build_distributed_config("auto"))


def test_unwritable_experts_dir_refused(tmp_path, seeds, base, no_ray):
    (tmp_path / "file").write_text("")
    cfg = build_config(base_model=str(base), experts_dir=tmp_path / "file" / "experts")
    with pytest.raises(RegistryError, match="not writable"):
        specialize_distributed(["alpha"], cfg, build_distributed_config("auto"))


def test_unknown_base_model_refused(tmp_path, seeds, no_ray):
    cfg = build_config(base_model="/no/such/model", experts_dir=tmp_path / "experts")
    with pytest.raises(Exception, match="unknown base model"):
        specialize_distributed(["alpha"], cfg, build_distributed_config("auto"))


def test_interrupted_work_dir_needs_resume_or_restart(tmp_path, seeds, base, no_ray):
    cfg = distributed.absolute_paths(cfg_for(tmp_path, base))
    work = cfg.experts_dir / ".work" / "beta"
    work.mkdir(parents=True)
    (work / "state.json").write_text(json.dumps(
        {"done": {"generate": {}, "filter": {}}, "seconds": {}, "base_model": cfg.base_model,
         "shards": 3}))
    d = build_distributed_config("auto")
    with pytest.raises(ConfigError, match="pass --resume"):
        specialize_distributed(["alpha", "beta"], cfg, d)
    with pytest.raises(ConfigError, match="split into 3 shards; pass --shards beta=3"):
        specialize_distributed(["beta"], cfg, d, resume=True)
    check_driver(["beta"], cfg, build_distributed_config("auto", ["beta=3"]), resume=True)
    check_driver(["beta"], cfg, d, restart=True)  # --restart discards it (after every check)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    other = cfg.model_copy(update={"base_model": str(tmp_path / "other")})
    with pytest.raises(ConfigError, match="was started with base model"):
        check_driver(["beta"], other, build_distributed_config("auto", ["3"]), resume=True)
    assert work.exists()


def test_paths_made_absolute_for_other_nodes(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(base_model="base", experts_dir="experts", respond={"corpus": "c"})
    out = distributed.absolute_paths(cfg)
    assert out.experts_dir == tmp_path / "experts" and out.respond.corpus == tmp_path / "c"
    assert out.base_model == str(base)
    assert distributed.absolute_paths(build_config()).base_model == "smollm2-135m-instruct"


def test_task_refuses_a_node_without_the_shared_dir(tmp_path, seeds):
    probe = tmp_path / "experts" / ".work" / ".probe-x"
    with pytest.raises(ConfigError, match="must mount it at the same path"):
        check_shared(str(seeds / "alpha"), probe)
    probe.parent.mkdir(parents=True)
    probe.write_text("driver")
    check_shared(str(seeds / "alpha"), probe)
    with pytest.raises(ConfigError, match="does not see the seeds"):
        check_shared(str(tmp_path / "elsewhere"), probe)


# --- CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--shards", "2"], "--shards only apply to a run on Ray"),
    (["--task-cpus", "2", "--task-gpus", "1"], "--task-cpus, --task-gpus only apply"),
    (["--ray-address", "nowhere"], "is not a Ray address"),
    (["--ray-address", "local", "--shards", "gamma=2"], "--shards names ['gamma']"),
])
def test_cli_bad_ray_flags(tmp_path, seeds, no_ray, capsys, args, message):
    code = main(["specialize", "alpha", "--experts-dir", str(tmp_path / "e")] + args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("selfspec: error:") and message in err


def test_cli_reports_failed_domains_and_exits_1(tmp_path, seeds, monkeypatch, capsys):
    summary = {"domain": "alpha", "version": 1, "candidates": 9, "kept_instructions": 8,
               "rejected_instructions": {}, "train_examples": 8, "rejected_responses": {},
               "loss_first": 2.0, "loss_last": 1.0, "seconds": {"train": 1.0},
               "path": "e/alpha"}
    seen = {}

    def fake(domains, cfg, dcfg, resume, restart, make_encoder):
        seen.update(domains=domains, dcfg=dcfg, make_encoder=make_encoder)
        return Outcome([summary], {"beta": "RuntimeError: boom"})

    monkeypatch.setattr(distributed, "specialize_distributed", fake)
    code = main(["specialize", "--all", "--ray-address", "auto", "--shards", "beta=2",
                 "--task-cpus", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "alpha" in out and "published alpha v1" in out and "loss first" in out
    assert "selfspec: beta failed: RuntimeError: boom" in err and "--resume" in err
    assert seen["domains"] == ["alpha", "beta"] and seen["dcfg"].shards_for("beta") == 2
    assert seen["dcfg"].task_cpus == 2 and seen["dcfg"].task_gpus is None
    assert seen["make_encoder"] is None  # BM25 by default: no encoder for the tasks


def test_reason_unwraps_the_task_error():
    class Wrapper(Exception):  # what ray.get raises: the task's error kept in `.cause`
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last): ...")
            self.cause = cause

    assert reason(Wrapper(Wrapper(ConfigError("every response rejected")))) == \
        "every response rejected"
    assert reason(Wrapper(ValueError("bad\nmore lines"))) == "ValueError: bad"
    assert reason(MemoryError()) == "MemoryError: "


# --- sharding: same answers, same order, resumable ------------------------------------------

def _filtered(tmp_path, base, shards):
    """A domain through generate + filter (fake engine), split into `shards`."""
    cfg = distributed.absolute_paths(cfg_for(tmp_path, base))
    domain = load_domain("alpha")
    probe = cfg.experts_dir / ".work" / ".probe"
    probe.parent.mkdir(parents=True)
    probe.write_text("driver")
    prepare_shards(str(domain.root), cfg, shards, lambda *a, **k: FakeGenerator(), probe)
    return cfg, domain, cfg.experts_dir / ".work" / "alpha"


def test_sharded_answers_equal_sequential_ones_in_order(tmp_path, seeds, base):
    cfg, domain, wd = _filtered(tmp_path, base, 3)
    kept = read_jsonl(wd / "filter" / "kept.jsonl")
    parts = [read_jsonl(wd / "shards" / f"{i:02d}" / "filter" / "kept.jsonl") for i in range(3)]
    assert [len(p) for p in parts] == [3, 3, 4] and [r for p in parts for r in p] == kept
    results = [respond_shard(str(domain.root), cfg, i, lambda *a, **k: FakeGenerator(), 3)
               for i in range(3)]
    merge_shards(str(domain.root), cfg, results)

    # The same kept instructions answered in one go, as the sequential pipeline does.
    solo = tmp_path / "solo"
    (solo / "filter").mkdir(parents=True)
    (solo / "filter" / "kept.jsonl").write_text((wd / "filter" / "kept.jsonl").read_text())
    generate_responses(domain, cfg.respond, FakeGenerator(), solo)
    merged = read_jsonl(wd / "respond" / "responses.jsonl")
    assert merged == read_jsonl(solo / "respond" / "responses.jsonl")
    state = json.loads((wd / "state.json").read_text())
    assert state["shards"] == 3 and state["done"]["respond"]["responses"] == 10
    assert state["done"]["respond_filter"]["kept"] == len(read_jsonl(
        wd / "respond_filter" / "train.jsonl")) == 10


class Interrupting(FakeGenerator):
    def complete(self, prompts, sampling, adapter=None):
        if self.calls:
            raise KeyboardInterrupt
        return super().complete(prompts, sampling, adapter)


def test_interrupted_shard_resumes_without_duplicates(tmp_path, seeds, base):
    cfg, domain, wd = _filtered(tmp_path, base, 2)
    with pytest.raises(KeyboardInterrupt):  # one batch of 3 written, then Ctrl-C
        respond_shard(str(domain.root), cfg, 1, lambda *a, **k: Interrupting(), 2)
    shard = wd / "shards" / "01"
    assert len(read_jsonl(shard / "respond" / "responses.jsonl")) == 3
    # A resumed run splits nothing again and answers only what is missing.
    split = (shard / "filter" / "kept.jsonl").read_text()
    prepare_shards(str(domain.root), cfg, 2, None, cfg.experts_dir / ".work" / ".probe")
    assert (shard / "filter" / "kept.jsonl").read_text() == split
    made = []

    def count(*a, **k):
        made.append(1)
        return FakeGenerator()

    results = [respond_shard(str(domain.root), cfg, i, count, 2) for i in range(2)]
    assert results[1]["new"] == 2 and len(made) == 2
    assert [r["new"] for r in results] == [5, 2]
    merge_shards(str(domain.root), cfg, results)
    ids = [r["id"] for r in read_jsonl(wd / "respond" / "responses.jsonl")]
    assert ids == [r["id"] for r in read_jsonl(wd / "filter" / "kept.jsonl")]
    # Once merged, a retried shard starts no engine.
    respond_shard(str(domain.root), cfg, 0, count, 2)
    assert len(made) == 2
