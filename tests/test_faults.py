"""Fault injection for the failure paths of issue 18: each test injects the fault for real (a
U+2028 response, a torn write, a chmod-000 adapter, a deleted registry.json, a truncated index,
CR/LF in a header value, deeply nested JSON, over-limit requests) and asserts that nothing was
lost and the service answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from router.index import load_router, read_meta
from serve.watch import RetrySchedule
from specialize.jsonl import append_jsonl, read_jsonl, resume_jsonl
from specialize.registry import load_registry, write_registry
from tests.test_serve import ask
from tests.test_serve import make as make_service
from tests.test_router import fake_st, two_experts, write_reg  # noqa: F401 - fake_st: fixture
from tests.test_serve_engine import make_base, publish, start

# --- 1. JSONL: rows are never dropped by a line separator or a torn tail ----------------------


def test_jsonl_keeps_rows_after_a_unicode_line_separator(tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = [{"id": 0, "response": "a\u2028b"}, {"id": 1, "response": "c\u2029d\x85e"},
            {"id": 2, "response": "after"}]
    append_jsonl(path, rows)
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as json.dumps does
    assert read_jsonl(path) == rows
    assert resume_jsonl(path) == rows
    assert read_jsonl(path) == rows  # resume did not rewrite the file without them


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


# --- 4-6. the engine replica: unreadable adapters, retried loads, a vanished registry ---------

@contextlib.contextmanager
def unprivileged():
    """Run the block as a user that chmod 000 stops. Root reads any file, so under root (CI
    containers, this machine) the effective uid drops to nobody for the block and comes back."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def experts_root():
    """A temp folder nobody may traverse (pytest's tmp_path sits under a 0700 folder)."""
    root = Path(tempfile.mkdtemp(prefix="selfspec-faults-"))
    root.chmod(0o755)
    yield root
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(root, ignore_errors=True)


def _engine_setup(root: Path):
    base = make_base(root)
    (base / "model.safetensors").chmod(0o644)  # safetensors writes 0600: the server reads it
    experts = root / "experts"
    experts.mkdir()
    publish(experts, base, "finance")
    return experts, base


def _config(experts: Path, name: str) -> Path:
    return experts / ".versions" / name / "v1" / "adapter" / "adapter_config.json"


def test_unreadable_adapters_are_left_out_and_the_engine_starts(experts_root):
    experts, base = _engine_setup(experts_root)
    publish(experts, base, "locked")
    _config(experts, "locked").chmod(0o000)  # published under umask 077 by another user
    publish(experts, base, "garbled")
    _config(experts, "garbled").write_bytes(b'{"peft_type": "LORA", "r": 8, "x": "\xff\xfe"}')
    publish(experts, base, "listy")
    _config(experts, "listy").write_text("[1, 2, 3]")  # JSON, but not an object
    with unprivileged():
        server = asyncio.run(start(experts, base))
        cat = server.catalog()
    assert sorted(cat["experts"]) == ["finance"]
    assert sorted(cat["skipped"]) == ["garbled", "listy", "locked"]
    assert "PermissionError" in cat["skipped"]["locked"] and "chmod" in cat["skipped"]["locked"]
    assert "UnicodeDecodeError" in cat["skipped"]["garbled"]
    assert "AttributeError" in cat["skipped"]["listy"]
    for why in cat["skipped"].values():
        assert str(experts_root) not in why and ".versions/" in why  # no server paths


def test_hot_add_of_an_unreadable_adapter_loads_the_others_and_retries_it(experts_root):
    experts, base = _engine_setup(experts_root)
    server = asyncio.run(start(experts, base))
    now = [0.0]
    server._retries.clock = lambda: now[0]
    publish(experts, base, "locked")  # sorted before "math": the sync used to stop there
    _config(experts, "locked").chmod(0o000)
    publish(experts, base, "math")
    with unprivileged():
        cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "math"] and "locked" in cat["skipped"]
    _config(experts, "locked").chmod(0o644)  # the operator fixes the permissions
    with unprivileged():
        assert "locked" not in asyncio.run(server.reload())["experts"]  # not due yet
        now[0] += 11  # past the first retry delay, no registry change needed
        cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "locked", "math"] and cat["skipped"] == {}


def test_one_off_load_failure_is_retried_with_backoff(experts_root):
    experts, base = _engine_setup(experts_root)
    publish(experts, base, "law", corrupt=True)  # the loader refuses it (a half-copied file)
    server = asyncio.run(start(experts, base))
    now = [0.0]
    server._retries = RetrySchedule(clock=lambda: now[0])
    server._retries.failed("law")  # the start-up failure, on this clock
    assert "law" in server.catalog()["skipped"]
    now[0] += 11
    assert server._retries.due("law")
    assert "law" in asyncio.run(server.reload())["skipped"]  # retried, fails again
    assert not server._retries.due("law")
    now[0] += 11
    assert not server._retries.due("law")  # the delay doubled to 20 s
    (experts / ".versions" / "law" / "v1" / "adapter" / "CORRUPT").unlink()  # copy finished
    now[0] += 10
    assert "law" in asyncio.run(server.reload())["experts"]


def test_rollback_that_reuses_a_revision_is_applied(experts_root):
    experts, base = _engine_setup(experts_root)
    publish(experts, base, "finance", version=2)
    server = asyncio.run(start(experts, base))
    assert server.catalog()["experts"]["finance"]["version"] == 2
    reg = load_registry(experts)
    reg.experts["finance"] = reg.experts["finance"].model_copy(
        update={"version": 1, "path": ".versions/finance/v1"})
    write_registry(experts, reg)  # same revision number, other content
    cat = asyncio.run(server.reload())
    assert cat["experts"]["finance"]["lora_name"] == "finance@v1"


def test_deleted_registry_keeps_the_experts_and_reports_degraded(experts_root):
    experts, base = _engine_setup(experts_root)
    publish(experts, base, "law")
    server = asyncio.run(start(experts, base))
    saved = (experts / "registry.json").read_bytes()
    (experts / "registry.json").unlink()  # a lost mount, a mistaken rm
    cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "law"]
    assert sorted(server.backend.loaded) == ["finance", "law"]
    assert "registry.json is missing" in cat["registry_problem"]
    assert str(experts_root) not in cat["registry_problem"]
    (experts / "registry.json").write_bytes(saved[: len(saved) // 2])  # back, but torn
    cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "law"] and "cannot be read" in \
        cat["registry_problem"]
    (experts / "registry.json").write_bytes(saved)
    cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "law"] and cat["registry_problem"] is None


def test_health_says_degraded_while_the_registry_is_missing():
    client, engine, router, _ = make_service()
    engine.cat["skipped"] = {}
    assert client.get("/health").json()["status"] == "ok"
    engine.cat["registry_problem"] = "registry.json is missing from the experts dir: ..."
    body = client.get("/health").json()
    assert body["status"] == "degraded" and "missing" in body["registry_problem"]
    r = client.post("/v1/chat/completions", json=ask("bond"))
    assert r.status_code == 200 and r.headers["x-selfspec-expert"] == "finance"


# --- 7. a truncated router index is rebuilt, not crash-looped -----------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["index_file", "offtopic_file"])
@pytest.mark.parametrize("old_meta", [False, True], ids=["sized", "unsized-meta"])
def test_truncated_router_index_is_rebuilt(tmp_path, fake_st, damaged, old_meta):
    write_reg(tmp_path, two_experts())
    built = load_router(tmp_path)
    meta = read_meta(tmp_path)
    if old_meta:  # written before meta.json recorded the index size: found when it is read
        meta.pop("index_bytes")
        (tmp_path / "router" / "meta.json").write_text(json.dumps(meta))
    _truncate(tmp_path / "router" / meta[damaged])  # a torn copy, a full disk
    loaded = load_router(tmp_path)
    assert read_meta(tmp_path)["index_file"] != meta["index_file"]  # a new build
    qs = ["law x", "math y", "cook z"]
    assert [c.expert for c in loaded.route_batch(qs)] == [c.expert for c in built.route_batch(qs)]
    assert load_router(tmp_path).names == ["law", "math"]  # and the rebuilt one reads back


# --- 6b. a typo in --experts-dir is refused before Ray or vLLM starts --------------------------

def test_serve_refuses_an_experts_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "nonexistent" / "dir"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "specialize.cli", "serve", "--experts-dir",
                          str(missing)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("selfspec: error: the experts dir") and str(missing) in last
    assert "starting Ray" not in out.stderr and time.monotonic() - t0 < 60
