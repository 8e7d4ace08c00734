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
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from core.jsonl import append_jsonl, read_jsonl, resume_jsonl
from core.registry import load_registry, write_registry
from router.index import load_router, read_meta
from serve.clients import Usage
from serve.config import build_serve_config
from serve.ingress import Service, build_http_app
from serve.watch import RetrySchedule
from tests import test_router
from tests.test_router import two_experts, write_reg
from tests.test_serve import FakeEngine, FakeRouter, ask, oai
from tests.test_serve import make as make_service
from tests.test_serve_engine import make_base, publish, start

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

fake_st = test_router.fake_st  # the router tests' fixture: encoders by name come out as fakes


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


# --- 9. deeply nested JSON is a 4xx ----------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"[" * 200_000,  # what gave a 500 against a live server
    b'{"model": "auto", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    json.dumps(ask("hi") | {"user": "x", "logit_bias": {}}).encode()[:-1] + b', "stop": ' +
    b"[" * 100 + b"]" * 100 + b"}",
])
def test_deeply_nested_json_is_refused_with_400(body):
    client, engine, _, _ = make_service()
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nests JSON more than 64 levels" in r.json()["error"]["message"]
    assert engine.calls == []
    assert client.post("/v1/chat/completions", json=ask("bond")).status_code == 200


# --- 10. per-request caps and the request timeout ----------------------------------------------

@pytest.mark.parametrize("kind,extra,param,key", [
    ("chat", {"n": 100_000}, "n", "ingress.max_n"),
    ("chat", {"max_tokens": 1_000_000}, "max_tokens", "ingress.max_tokens"),
    ("chat", {"max_completion_tokens": 5000}, "max_completion_tokens", "ingress.max_tokens"),
    ("completion", {"prompt": ["bond"] * 33}, "prompt", "ingress.max_prompts"),
    ("completion", {"prompt": [[1, 2]] * 1024}, "prompt", "ingress.max_prompts"),
    ("completion", {"n": 9}, "n", "ingress.max_n"),
])
def test_requests_over_a_cap_are_refused_naming_it(kind, extra, param, key):
    client, engine, _, _ = make_service()
    oai_client = oai(client)
    call = oai_client.chat.completions.create if kind == "chat" else \
        oai_client.completions.create
    base = {"messages": [{"role": "user", "content": "bond"}]} if kind == "chat" else \
        {"prompt": "bond"}
    with pytest.raises(openai.BadRequestError) as err:
        call(model="auto", **(base | extra))
    body = err.value.body
    assert key in body["message"] and body["param"] == param
    assert engine.calls == []
    at_cap = {"n": 8} if "n" in extra else {"max_tokens": 4096} if "max" in param else \
        {"prompt": ["bond"] * 32}
    assert call(model="auto", **(base | at_cap)).choices  # the limit itself is allowed


def test_caps_come_from_the_ingress_config():
    client, _, _, _ = make_service(ingress={"max_n": 2, "max_tokens": 10, "max_prompts": 1})
    r = client.post("/v1/completions", json={"model": "auto", "prompt": ["a", "b"]})
    assert r.status_code == 400 and "limit of 1 (ingress.max_prompts)" in r.text
    r = client.post("/v1/chat/completions", json=ask("bond", max_tokens=11))
    assert r.status_code == 400 and "limit of 10 tokens" in r.text
    assert client.post("/v1/chat/completions", json=ask("bond", n=2, max_tokens=10)) \
        .status_code == 200


class SlowEngine(FakeEngine):
    """Answers one piece a second: a request that holds the engine."""

    def __init__(self):
        super().__init__()
        self.closed = 0

    async def generate(self, kind, request, expert):
        try:
            async for item in super().generate(kind, request, expert):
                await asyncio.sleep(1.0 if self.calls[-1:] and not isinstance(item, Usage)
                                    else 0)
                yield item
        finally:
            self.closed += 1


def test_request_timeout_is_a_408_and_streams_end_with_an_error():
    engine = SlowEngine()
    service = Service(engine, FakeRouter(),
                      build_serve_config({"ingress": {"request_timeout_s": 0.3}}))
    client = TestClient(build_http_app(service))
    r = client.post("/v1/chat/completions", json=ask("bond"))
    assert r.status_code == 408
    assert "ingress.request_timeout_s" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=ask("bond", stream=True))
    assert r.status_code == 408  # nothing came in time: still a status, not a stream
    service.cfg.ingress.request_timeout_s = 1.5  # the first piece comes, the rest is too slow
    r = client.post("/v1/chat/completions", json=ask("bond", stream=True))
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert "ingress.request_timeout_s" in events[-2] and events[-1] == "data: [DONE]"
    assert engine.closed == 3  # the engine stopped generating each time


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


# --- 11. exposure: no open server beyond this machine by accident ------------------------------

def test_serving_beyond_loopback_without_a_key_is_refused(tmp_path, monkeypatch):
    from core.errors import ConfigError
    from serve.app import refuse_open_exposure
    from serve.config import build_serve_config

    monkeypatch.delenv("SELFSPEC_API_KEY", raising=False)
    open_cfg = build_serve_config({})
    for host in ("127.0.0.1", "localhost", "::1"):
        refuse_open_exposure(host, open_cfg, insecure_no_auth=False)
    with pytest.raises(ConfigError, match="--host 0.0.0.0 serves beyond this machine"):
        refuse_open_exposure("0.0.0.0", open_cfg, insecure_no_auth=False)
    refuse_open_exposure("0.0.0.0", open_cfg, insecure_no_auth=True)
    refuse_open_exposure("0.0.0.0", build_serve_config({"api_key": "k"}), False)
    monkeypatch.setenv("SELFSPEC_API_KEY", "from-env")
    refuse_open_exposure("10.0.0.5", open_cfg, insecure_no_auth=False)

    experts = tmp_path / "experts"
    experts.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SELFSPEC_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "selfspec.cli", "serve", "--experts-dir",
                          str(experts), "--host", "0.0.0.0"], check=False, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[1], env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--insecure-no-auth" in out.stderr.strip().splitlines()[-1]


def test_api_key_from_a_file(tmp_path):
    from argparse import Namespace

    from core.errors import ConfigError
    from serve.cli import cli_api_key

    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    assert cli_api_key(Namespace(api_key="sk-cli", api_key_file=key)) == "sk-from-file"
    assert cli_api_key(Namespace(api_key="sk-cli", api_key_file=None)) == "sk-cli"
    key.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        cli_api_key(Namespace(api_key=None, api_key_file=key))
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        cli_api_key(Namespace(api_key=None, api_key_file=tmp_path / "missing"))


def test_health_details_need_the_key(monkeypatch):
    client, engine, _, _ = make_service(api_key="sk-health")
    engine.cat["base"]["path"] = "/srv/models/tiny"
    engine.cat["skipped"] = {"broken": "cannot read /srv/experts/.versions/broken/v1"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.get("/health", headers=headers)  # a probe, or anyone who reaches the port
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert "/srv" not in r.text and "broken" not in r.text and "skipped" not in r.json()
    full = client.get("/health", headers={"Authorization": "Bearer sk-health"}).json()
    assert full["skipped"] == engine.cat["skipped"] and full["experts"] == ["finance", "law"]

    async def down():
        from core.errors import RegistryError
        raise RegistryError("engine died reading /srv/experts/registry.json")

    monkeypatch.setattr(engine, "catalog", down)
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}
    r = client.get("/health", headers={"Authorization": "Bearer sk-health"})
    assert r.status_code == 503 and "engine died" in r.json()["error"]["message"]
    # a server without a key serves anyone /v1 anyway: its /health keeps the details
    open_client, _, _, _ = make_service()
    assert "skipped" in open_client.get("/health").json()


def test_ready_message_never_prints_the_key(monkeypatch):
    from serve.cli import ready_message

    reg = load_registry(Path(tempfile.mkdtemp()))  # empty: the base model only
    msg = ready_message("http://10.0.0.5:8000", reg, "sk-secret-123", {"status": "ok"})
    assert "sk-secret-123" not in msg and "$SELFSPEC_API_KEY" in msg
    assert "$SELFSPEC_API_KEY" not in ready_message("http://h:1", reg, None, {"status": "ok"})
    # the pasted example works once the key is in the environment: the shell fills it in
    curl = next(ln for ln in msg.splitlines() if "Authorization" in ln)
    header = curl.split("-H ", 2)[2].rstrip(" \\")
    out = subprocess.run(["bash", "-c", f"echo {header}"],
                         env={"SELFSPEC_API_KEY": "sk-secret-123", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Authorization: Bearer sk-secret-123"


def test_api_key_on_the_command_line_warns(capsys):
    from argparse import Namespace

    from serve.cli import cli_api_key

    assert cli_api_key(Namespace(api_key="sk-cli", api_key_file=None)) == "sk-cli"
    err = capsys.readouterr().err
    assert "shows in `ps`" in err and "--api-key-file" in err and "SELFSPEC_API_KEY" in err
    assert "sk-cli" not in err
    assert cli_api_key(Namespace(api_key=None, api_key_file=None)) is None
    assert capsys.readouterr().err == ""


# --- 5b. /admin/reload reaches every replica, not one of each deployment -----------------------

class LocalActor:
    """A plain object behind Ray's call syntax (`actor.method.remote(...)`, awaited)."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        async def call(*a, **k):
            return method(*a, **k)

        return SimpleNamespace(remote=call)


def test_admin_reload_reaches_every_replica(tmp_path):
    from serve.config import build_serve_config
    from serve.watch import ReloadBoard, broadcast_reload, start_watch

    board = LocalActor(ReloadBoard())
    reloads = {f"engine#{i}": 0 for i in range(3)}
    stuck = asyncio.Event()

    def replica(name):
        async def on_change():
            if name == "engine#2" and not stuck.is_set():
                await asyncio.sleep(3600)  # a reload that hangs (a storage stall)
            reloads[name] += 1
        return start_watch(tmp_path, 0.05, on_change, board=board, replica=name)

    async def scenario():
        tasks = {name: replica(name) for name in reloads}
        await asyncio.sleep(0.3)  # every replica polled once: known to the board
        assert reloads == {n: 0 for n in reloads}  # a start is no reload
        stuck.set()
        out = await broadcast_reload(board, 0.05, timeout_s=5)
        assert out["replicas"] == sorted(reloads) and out["behind"] == []
        assert reloads == {n: 1 for n in reloads}  # each replica, once: not one of them

        stuck.clear()  # engine#2's next reload hangs: the answer names it, after the wait
        out = await broadcast_reload(board, 0.05, timeout_s=0.5)
        assert out["behind"] == ["engine#2"] and reloads["engine#0"] == 2
        tasks["engine#2"].cancel()  # the replica dies: it stops polling and drops out
        stuck.set()
        await asyncio.sleep(3 * 0.05 + 2.0 + 0.2)
        out = await broadcast_reload(board, 0.05, timeout_s=5)
        assert out["replicas"] == ["engine#0", "engine#1"] and out["behind"] == []

        # through the ingress: /admin/reload answers with what every replica did
        service = Service(FakeEngine(), FakeRouter(), build_serve_config({
            "registry_poll_s": 0.05}), board=board)
        body = await service.reload(SimpleNamespace(headers={}))
        assert body["replicas"]["behind"] == [] and reloads["engine#1"] == 4
        assert body["experts"] == ["finance", "law"]
        for t in tasks.values():
            t.cancel()

    asyncio.run(scenario())
