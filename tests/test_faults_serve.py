"""Fault injection for issue 18's serving state: each test injects the fault for real (a
chmod-000 adapter, a one-off load failure, a deleted registry.json, a truncated router index, a
mistyped experts dir, CR/LF and paths in a header value) and asserts that the service answered
with what it had."""

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

from core.registry import load_registry, write_registry
from router.index import load_router, read_meta
from serve.watch import RetrySchedule
from tests import test_router_index
from tests.serve_fakes import ask
from tests.serve_fakes import make as make_service
from tests.test_router import two_experts, write_reg
from tests.test_serve_engine import make_base, publish, start

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
    publish(experts, base, "locked")  # sorted before "math": the sync used to stop there
    _config(experts, "locked").chmod(0o000)
    publish(experts, base, "math")
    with unprivileged():
        cat = asyncio.run(server.reload())
        assert sorted(cat["experts"]) == ["finance", "math"] and "locked" in cat["skipped"]
        assert not server._retries_due()  # nothing changed: not tried again every poll
        assert "locked" in asyncio.run(server.reload())["skipped"]
    _config(experts, "locked").chmod(0o644)  # the operator fixes the permissions
    with unprivileged():
        assert server._retries_due()  # the watch calls reload without a registry change
        cat = asyncio.run(server.reload())
    assert sorted(cat["experts"]) == ["finance", "locked", "math"] and cat["skipped"] == {}


def test_one_off_load_failure_is_retried_with_backoff(experts_root):
    """A failure nothing on disk shows (a storage hiccup): tried again after 30 s, then 60 s..."""
    experts, base = _engine_setup(experts_root)
    server = asyncio.run(start(experts, base))
    now = [0.0]
    server._retries = RetrySchedule(clock=lambda: now[0])
    real_add, attempts = server.backend.add_adapter, []

    async def flaky(entry, path):
        attempts.append(entry.name)
        if len(attempts) <= 2:
            raise OSError(5, "Input/output error")
        await real_add(entry, path)

    server.backend.add_adapter = flaky
    publish(experts, base, "law")
    assert "law" in asyncio.run(server.reload())["skipped"] and attempts == ["law"]
    now[0] += 29
    assert not server._retries_due()
    now[0] += 2
    assert server._retries_due()
    assert "law" in asyncio.run(server.reload())["skipped"] and len(attempts) == 2
    now[0] += 31
    assert not server._retries_due()  # the delay doubled to 60 s
    now[0] += 30
    assert "law" in asyncio.run(server.reload())["experts"] and len(attempts) == 3
    assert not server._retries_due()


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
    client, engine, _, _ = make_service()
    engine.cat["skipped"] = {}
    assert client.get("/health").json()["status"] == "ok"
    engine.cat["registry_problem"] = "registry.json is missing from the experts dir: ..."
    body = client.get("/health").json()
    assert body["status"] == "degraded" and "missing" in body["registry_problem"]
    r = client.post("/v1/chat/completions", json=ask("bond"))
    assert r.status_code == 200 and r.headers["x-selfspec-expert"] == "finance"


# --- 7. a truncated router index is rebuilt, not crash-looped -----------------------------------

fake_st = test_router_index.fake_st  # the router tests' fixture: encoders by name come out as fakes


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["index_file", "offtopic_file"])
@pytest.mark.parametrize("old_meta", [False, True], ids=["sized", "unsized-meta"])
def test_truncated_router_index_is_rebuilt(tmp_path, fake_st, damaged, old_meta):
    write_reg(tmp_path, two_experts())
    built = load_router(tmp_path)
    meta = read_meta(tmp_path)
    if old_meta:  # written before meta.json recorded the index size: found when it is read
        raw = meta.model_dump(mode="json")
        raw.pop("index_bytes")
        (tmp_path / "router" / "meta.json").write_text(json.dumps(raw))
    _truncate(tmp_path / "router" / getattr(meta, damaged))  # a torn copy, a full disk
    loaded = load_router(tmp_path)
    assert read_meta(tmp_path).index_file != meta.index_file  # a new build
    qs = ["law x", "math y", "cook z"]
    assert [c.expert for c in loaded.route_batch(qs)] == [c.expert for c in built.route_batch(qs)]
    assert load_router(tmp_path).names == ["law", "math"]  # and the rebuilt one reads back


def test_router_index_is_on_disk_before_meta_names_it(tmp_path, fake_st, monkeypatch):
    import core.jsonl as jsonl_mod
    import router.index as index_mod

    synced: set[int] = set()
    real_fsync = os.fsync

    def spy(fd):
        synced.add(os.fstat(fd).st_ino)
        return real_fsync(fd)

    monkeypatch.setattr(jsonl_mod.os, "fsync", spy)
    real_write_meta = index_mod.write_meta
    missing = {}

    def write_meta(experts_dir, meta):  # the moment readers follow meta.json to the new files
        folder = experts_dir / "router"
        missing["files"] = [n for n in (meta.index_file, meta.offtopic_file, ".")
                            if n and (folder / n).stat().st_ino not in synced]
        return real_write_meta(experts_dir, meta)

    monkeypatch.setattr(index_mod, "write_meta", write_meta)
    write_reg(tmp_path, two_experts())
    load_router(tmp_path)
    assert missing == {"files": []}


# --- 6b. a typo in --experts-dir is refused before Ray or vLLM starts --------------------------

def test_serve_refuses_an_experts_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "nonexistent" / "dir"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "selfspec.cli", "serve", "--experts-dir",
                          str(missing)], check=False, capture_output=True, text=True,
                         timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("selfspec: error: the experts dir") and str(missing) in last
    assert "starting Ray" not in out.stderr and time.monotonic() - t0 < 60


# --- 8. header values: one ASCII line, no server paths -----------------------------------------

def test_skip_reason_with_newline_and_path_is_a_safe_header():
    client, engine, _, _ = make_service()
    engine.cat["skipped"]["broken"] = (
        "/srv/selfspec/experts/.versions/broken/v1/adapter would be rejected by vLLM:\n"
        "  - rank 7 is not one of vLLM's [8, 16]\r\nSet-Cookie: x=y")
    r = client.post("/v1/chat/completions", json=ask("a broken question"))  # routed to broken
    assert r.status_code == 200 and r.headers["x-selfspec-expert"] == "base"
    reason = r.headers["x-selfspec-route-reason"]
    assert "router chose broken" in reason and "rejected by vLLM" in reason
    assert "\n" not in reason and "\r" not in reason and "/srv" not in reason
    assert "set-cookie" not in {k.lower() for k in r.headers}


@pytest.mark.parametrize("text,safe", [
    ("a\r\nb", "a b"), ("tab\there", "tab here"), ("é", "?"),
    ("cannot read /home/u/experts/x.json: no", "cannot read <path> no"),
    ("C:\\experts\\law left out", "<path> left out"), ("~/experts gone", "<path> gone"),
    ("score 0.41/0.40 (.versions/law/v1)", "score 0.41/0.40 (.versions/law/v1)"),
])
def test_header_value(text, safe):
    from serve.selection import header_value

    assert header_value(text) == safe


def test_model_name_with_crlf_is_a_404_and_serving_goes_on():
    client, _, _, _ = make_service()
    r = client.post("/v1/chat/completions", json=ask("bond", model="law\r\nX-Evil: 1"))
    assert r.status_code == 404 and "x-evil" not in {k.lower() for k in r.headers}
    assert client.post("/v1/chat/completions", json=ask("bond")).status_code == 200
