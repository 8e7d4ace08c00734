"""Publishing: versions, atomicity under a crash, and the registry format contract."""

import json
from pathlib import Path

import pytest

import specialize.publish as publish_mod
from core.errors import RegistryError
from core.registry import REGISTRY_FILE, load_registry, read_version, version_dirs
from core.seeds import load_domain
from specialize.publish import PublishRequest, ensure_writable, publish_expert
from tests.conftest import write_domain


def fake_work(tmp_path: Path) -> tuple[Path, Path, Path]:
    work = tmp_path / "work"
    (work / "train" / "adapter").mkdir(parents=True)
    (work / "train" / "adapter" / "adapter_config.json").write_text("{}")
    (work / "train" / "loss.json").write_text("[]")
    (work / "train" / "loss.png").write_bytes(b"png")
    (work / "filter").mkdir()
    (work / "filter" / "kept.jsonl").write_text(
        "".join(json.dumps({"instruction": f"generated {i}"}) + "\n" for i in range(5)))
    train_file = work / "train.jsonl"
    train_file.write_text('{"instruction": "a", "output": "b"}\n')
    return work, work / "train", train_file


def publish(tmp_path, experts):
    work, train_dir, train_file = fake_work(tmp_path)
    write_domain(tmp_path / "seeds")
    domain = load_domain("demo", tmp_path / "seeds")
    return publish_expert(PublishRequest(
        domain=domain, experts_dir=experts, workdir=work, train_dir=train_dir,
        train_file=train_file, lora={"rank": 8, "alpha": 16, "target_modules": ["q_proj"]},
        train_summary={"examples": 1, "epochs": 1, "loss_first": 2.0, "loss_last": 1.0},
        base_model="tiny", base_model_path=tmp_path / "base", resolved_config={"k": "v"},
        rounds=1, n_exemplars=3))


def test_publish_twice_makes_two_versions(tmp_path):
    experts = tmp_path / "experts"
    e1 = publish(tmp_path / "a", experts)
    e2 = publish(tmp_path / "b", experts)
    assert (e1.version, e2.version) == (1, 2)
    reg = load_registry(experts)
    assert reg.revision == 2 and reg.experts["demo"].version == 2
    assert reg.experts["demo"].lora_name == "demo@v2"
    assert len(reg.experts["demo"].exemplars) == 10 + 3  # every seed + a sample of generated
    assert (experts / "demo").resolve() == (experts / ".versions/demo/v2").resolve()
    assert sorted(p.name for p in (experts / "demo").iterdir()) == [
        "adapter", "config.json", "data", "expert.json", "loss.json", "loss.png"]
    assert json.loads((experts / "demo" / "expert.json").read_text())["version"] == 2
    assert (experts / ".versions/demo/v1/adapter").is_dir()  # old version kept for rollback


def test_crash_mid_publish_leaves_registry_and_folders_unchanged(tmp_path, monkeypatch):
    experts = tmp_path / "experts"
    publish(tmp_path / "a", experts)
    before = (experts / REGISTRY_FILE).read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(publish_mod, "write_json", boom)  # fails while writing expert.json
    with pytest.raises(OSError):
        publish(tmp_path / "b", experts)
    assert (experts / REGISTRY_FILE).read_text() == before
    assert sorted(p.name for p in (experts / ".versions/demo").iterdir()) == ["v1"]
    assert (experts / "demo").resolve().name == "v1"


def test_registry_of_other_format_version_is_refused(tmp_path):
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"format_version": 99, "experts": {}}))
    with pytest.raises(RegistryError, match="format_version 99"):
        load_registry(tmp_path)


def test_corrupt_registry_is_a_clear_error(tmp_path):
    (tmp_path / REGISTRY_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path)


def test_unwritable_experts_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RegistryError, match="not writable"):
        ensure_writable(blocker / "experts")


def test_version_dirs_lists_complete_versions_only(tmp_path):
    experts = tmp_path / "experts"
    publish(tmp_path / "a", experts)
    publish(tmp_path / "b", experts)
    (experts / ".versions/demo/.staging-1234").mkdir()  # a publish that crashed
    (experts / ".versions/demo/v7").mkdir()  # no expert.json: not a published version
    assert list(version_dirs(experts, "demo")) == [1, 2]
    assert version_dirs(experts, "nobody") == {}
    v1 = read_version(experts, "demo", 1)
    assert (v1.version, v1.lora_name, v1.source) == (1, "demo@v1", None)
    assert v1.train.examples == 1  # an expert made by `selfspec specialize` has a training summary
    with pytest.raises(RegistryError, match="cannot read"):
        read_version(experts, "demo", 7)
