"""Fault injection for issue 18's data paths: each test injects the fault for real (a U+2028
response, a torn write, a publish race under a lock that excludes nothing, a filesystem without
flock, a kill between publish and cleanup) and asserts that nothing was lost. The serving paths:
tests/test_faults_serve.py and tests/test_faults_requests.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.jsonl import append_jsonl, read_jsonl, resume_jsonl
from core.registry import load_registry

# --- 1. JSONL: rows are never dropped by a line separator or a torn tail ----------------------


def test_jsonl_keeps_rows_after_a_unicode_line_separator(tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = [{"id": 0, "response": "a\u2028b"}, {"id": 1, "response": "c\u2029d\x85e"},
            {"id": 2, "response": "after"}]
    # raw, as json.dumps(ensure_ascii=False) wrote them (files made before the writer escaped)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    assert read_jsonl(path) == rows
    assert resume_jsonl(path) == rows
    assert read_jsonl(path) == rows  # resume did not rewrite the file without them
    append_jsonl(path, [{"id": 3, "response": "d\u2028e"}])
    assert read_jsonl(path)[-1] == {"id": 3, "response": "d\u2028e"}
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3 + 3 + 1  # the new row: one


def test_jsonl_torn_inside_a_multibyte_character_resumes(tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = [{"id": 0, "response": "ok"}, {"id": 1, "response": "é\u2028"}]
    append_jsonl(path, rows)
    whole = json.dumps({"id": 2, "response": "日本語"}, ensure_ascii=False).encode()
    cut = whole.index("本".encode()) + 1  # the kill lands inside a 3-byte character
    with open(path, "ab") as f:
        f.write(whole[:cut])
    assert read_jsonl(path) == rows
    assert resume_jsonl(path) == rows
    assert path.read_bytes().endswith(b"\n")  # the torn tail is cut: appends start clean
    append_jsonl(path, [{"id": 2, "response": "again"}])
    assert [r["id"] for r in read_jsonl(path)] == [0, 1, 2]


def test_jsonl_tail_of_any_bytes_is_tolerated(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"id": 0}])
    for tail in (b"\xff\xfe", b"\x00\x00\x00", b'{"id": 1', b"\xe6\x97", b"\r", b"[1, 2]"):
        path.write_bytes(b'{"id": 0}\n' + tail)
        assert read_jsonl(path) == [{"id": 0}], tail
        assert resume_jsonl(path) == [{"id": 0}] and path.read_bytes() == b'{"id": 0}\n'


def test_jsonl_row_cut_just_before_its_newline_is_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1}')
    assert resume_jsonl(path) == [{"id": 0}, {"id": 1}]
    assert path.read_bytes() == b'{"id": 0}\n{"id": 1}\n'


# --- 2. a publish is on disk before the registry names it --------------------------------------

def test_publish_fsyncs_every_staged_file_before_the_registry_names_it(tmp_path, monkeypatch):
    import core.jsonl as jsonl_mod
    import core.registry as registry_mod
    from tests.test_registry import publish as publish_demo

    synced: set[int] = set()  # inodes: a staged file keeps its inode when renamed into place
    real_fsync = os.fsync

    def spy(fd):
        synced.add(os.fstat(fd).st_ino)
        return real_fsync(fd)

    monkeypatch.setattr(jsonl_mod.os, "fsync", spy)
    experts = tmp_path / "experts"
    seen_at_claim = {}
    real_claim = registry_mod._claim

    def claim(experts_dir, registry):  # the moment a revision names the version
        version = experts_dir / registry.experts["demo"].path
        # what a power cut right now would need on disk: every file and folder of the version
        seen_at_claim["missing"] = [
            str(p) for p in [version, version.parent, *version.rglob("*")]
            if p.stat().st_ino not in synced]
        return real_claim(experts_dir, registry)

    monkeypatch.setattr(registry_mod, "_claim", claim)
    entry = publish_demo(tmp_path / "a", experts)
    assert entry.version == 1 and seen_at_claim["missing"] == []
    assert experts.stat().st_ino in synced  # the registry's rename too


# A publisher process whose registry lock excludes nothing (NFS with local_lock, gcsfuse,
# s3fs), on a slow volume: 20 ms between reading the registry and replacing it.
RACE_PUBLISHER = """
import contextlib, sys, time
from pathlib import Path
import core.registry as registry
import specialize.publish as publish
from core.seeds import load_domain
from tests.conftest import write_domain
from tests.test_registry import fake_work

registry.locked = lambda experts_dir: contextlib.nullcontext()
for module in (registry, publish):
    if hasattr(module, "locked"):
        module.locked = registry.locked
slow_write = registry.atomic_write_text
registry.atomic_write_text = lambda path, text: (time.sleep(0.02), slow_write(path, text))
tag, experts, rounds, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
root = experts.parent / tag
for name in ("shared", tag):
    write_domain(root / "seeds", name)
work, train_dir, train_file = fake_work(root)
time.sleep(max(0.0, start - time.time()))  # both processes start publishing together
for _ in range(rounds):
    for name in ("shared", tag):
        entry = publish.publish_expert(publish.PublishRequest(
            domain=load_domain(name, root / "seeds"), experts_dir=experts, workdir=work,
            train_dir=train_dir, train_file=train_file,
            lora={"rank": 8, "alpha": 16, "target_modules": ["q_proj"]},
            train_summary={"examples": 1, "epochs": 1, "loss_first": 2.0, "loss_last": 1.0},
            base_model="tiny", base_model_path=root / "base", resolved_config={}, rounds=1,
            n_exemplars=3))
        print(name, entry.version, flush=True)
"""


def test_publish_race_with_a_lock_that_does_not_exclude_loses_no_version(tmp_path):
    experts, rounds = tmp_path / "experts", 5
    experts.mkdir()
    start = time.time() + 4  # past both interpreters' imports
    procs = [subprocess.Popen([sys.executable, "-c", RACE_PUBLISHER, tag, str(experts),
                               str(rounds), str(start)], cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("p0", "p1")]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    published = sorted(tuple(line.split()) for out, _ in outs for line in out.splitlines())
    # every publish that reported success has its own version, on disk, with its own number
    shared = sorted(int(v) for name, v in published if name == "shared")
    assert shared == list(range(1, 2 * rounds + 1))
    for name, v in published:
        path = experts / ".versions" / name / f"v{v}" / "expert.json"
        assert json.loads(path.read_text())["version"] == int(v)
    reg = load_registry(experts)
    assert reg.revision == 4 * rounds  # one revision per publish: none overwritten
    assert {n: e.version for n, e in reg.experts.items()} == {
        "shared": 2 * rounds, "p0": rounds, "p1": rounds}
    assert (experts / "shared").resolve().name == f"v{2 * rounds}"


@pytest.mark.parametrize("lands", ["after_the_version_is_read", "before_the_revision_claim"])
def test_experts_add_racing_another_publisher_loses_no_version(tmp_path, monkeypatch, lands):
    """`experts add` and a second real `experts add` of the same expert, the registry lock
    excluding nothing (as on NFS with local_lock): the second lands between the first's read of
    the next version number and its rename, or between its rename and its revision claim."""
    import core.registry as registry_mod
    import specialize.add as manage_mod
    import specialize.publish as publish_mod
    from core.registry import read_version, version_dirs
    from specialize.add import add_expert, build_add_config
    from tests.conftest import write_domain
    from tests.test_manage import make_adapter, tiny_base

    for module in (registry_mod, manage_mod, publish_mod):
        if hasattr(module, "locked"):
            monkeypatch.setattr(module, "locked", lambda experts_dir: contextlib.nullcontext())
    base, experts = tiny_base(tmp_path / "base"), tmp_path / "experts"
    seeds = write_domain(tmp_path / "seeds", "tax") / "seeds.yaml"
    adapters = {rank: make_adapter(tmp_path / f"r{rank}", base, rank=rank) for rank in (1, 8, 16)}

    def add(rank: int):
        return add_expert(build_add_config(name="tax", adapter=adapters[rank], experts_dir=experts,
                                           seeds=seeds, base_model=str(base)))

    add(1)  # v1, revision 1
    armed, other = [True], []

    def race():  # fires once, on the first add's call: the second add runs to the end inside it
        if armed and armed.pop():
            other.append(add(16))

    if lands == "after_the_version_is_read":
        real_rename = os.rename

        def rename(src, dst, *a, **kw):
            if Path(src).name.startswith(".staging-"):
                race()
            return real_rename(src, dst, *a, **kw)

        monkeypatch.setattr(os, "rename", rename)
    else:
        real_claim = registry_mod._claim

        def claim(experts_dir, registry):
            race()
            return real_claim(experts_dir, registry)

        monkeypatch.setattr(registry_mod, "_claim", claim)
    first = add(8)
    (second,) = other
    assert {first.after.version, second.after.version} == {2, 3}  # each its own number
    # Both versions on disk, each with its own adapter, readable for `experts rollback --to`.
    assert sorted(version_dirs(experts, "tax")) == [1, 2, 3]
    for change, rank in ((first, 8), (second, 16)):
        v = change.after.version
        on_disk = read_version(experts, "tax", v)
        assert (on_disk.version, on_disk.lora.rank) == (v, rank)
        assert (experts / on_disk.adapter_path / "adapter_model.safetensors").read_bytes() == \
            (adapters[rank] / "adapter_model.safetensors").read_bytes()
    reg = load_registry(experts)
    assert reg.revision == 3  # one revision per add: neither overwritten
    assert {first.revision, second.revision} == {2, 3}
    assert reg.experts["tax"].version == 3  # the newer version stays current
    assert (experts / "tax").resolve().name == "v3"
    assert not list((experts / ".versions" / "tax").glob(".staging-*"))


def test_experts_dir_without_flock_fails_at_start(tmp_path, monkeypatch, capsys):
    import errno

    import core.registry as registry_mod
    from core.errors import RegistryError
    from selfspec.cli import main
    from specialize.pipeline import specialize
    from specialize.publish import ensure_writable
    from tests.conftest import write_domain
    from tests.test_datacard import _cfg

    def no_flock(fd, op):  # what NFS mounted without lockd answers
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(registry_mod.fcntl, "flock", no_flock)
    with pytest.raises(RegistryError, match="does not support file locks"):
        ensure_writable(tmp_path / "experts")

    write_domain(tmp_path / "seeds", "alpha")
    monkeypatch.setenv("SELFSPEC_SEEDS_DIR", str(tmp_path / "seeds"))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    engines = []
    with pytest.raises(RegistryError, match="No locks available"):
        specialize(["alpha"], _cfg(tmp_path, tmp_path / "base"),
                   make_generator=lambda *a, **k: engines.append(a))
    assert engines == []  # refused before any engine started, not after training

    rc = main(["specialize", "alpha", "--experts-dir", str(tmp_path / "cli-experts"),
               "--base-model", str(tmp_path / "base"), "--corpus", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not support file locks" in err[0]
    assert "Traceback" not in err[0]


# --- 3. --resume after a kill between publish and cleanup does not publish again -------------

def test_resume_after_a_kill_between_publish_and_cleanup_does_not_republish(
        tmp_path, monkeypatch):
    from specialize import pipeline, quality
    from specialize.pipeline import specialize
    from tests.conftest import FakeGenerator, write_domain
    from tests.test_datacard import WordEncoder, _cfg

    write_domain(tmp_path / "seeds", "alpha")
    monkeypatch.setenv("SELFSPEC_SEEDS_DIR", str(tmp_path / "seeds"))
    monkeypatch.setattr(quality, "load_default_encoder", lambda: WordEncoder())  # no model load
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")

    def train(base_path, cfg, train_file, out, gain_items, gain_cfg):  # no PEFT: seconds
        (out / "adapter").mkdir(parents=True)
        (out / "adapter" / "adapter_config.json").write_text("{}")
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
        (out / "loss.json").write_text("[]")
        (out / "loss.png").write_bytes(b"png")
        return {"examples": 3, "epochs": 1, "loss_first": 2.0, "loss_last": 1.0}

    monkeypatch.setattr(pipeline, "train_adapter", train)
    monkeypatch.setattr(pipeline, "validate_adapter", lambda *a: {
        "rank": 8, "alpha": 16, "target_modules": ["q_proj"]})
    real_rmtree = shutil.rmtree
    cfg = _cfg(tmp_path, tmp_path / "base")
    workdir = cfg.experts_dir / ".work" / "alpha"

    def killed_at_cleanup(path, *a, **k):
        if Path(path) == workdir:
            raise KeyboardInterrupt  # the kill lands after the registry named the version
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(pipeline.shutil, "rmtree", killed_at_cleanup)
    with pytest.raises(KeyboardInterrupt):
        specialize(["alpha"], cfg, make_generator=lambda *a, **k: FakeGenerator())
    assert load_registry(cfg.experts_dir).experts["alpha"].version == 1 and workdir.exists()
    monkeypatch.setattr(pipeline.shutil, "rmtree", real_rmtree)

    out = specialize(["alpha"], cfg, resume=True, make_generator=lambda *a, **k: FakeGenerator())
    reg = load_registry(cfg.experts_dir)
    assert reg.experts["alpha"].version == 1 and reg.revision == 1  # not published again
    assert out[0]["version"] == 1 and not workdir.exists()
    assert sorted(p.name for p in (cfg.experts_dir / ".versions" / "alpha").iterdir()) == ["v1"]

    # a later run of the same domain (a new work dir, a new publish id) is a new version
    specialize(["alpha"], cfg, make_generator=lambda *a, **k: FakeGenerator())
    assert load_registry(cfg.experts_dir).experts["alpha"].version == 2
