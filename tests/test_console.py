"""The console of engine commands: build status file, progress line, log routing, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from core.build_status import (
    BUILD_STATUS_FILE,
    STALE_AFTER_S,
    BuildStatus,
    DomainProgress,
    clear_build_status,
    describe_in_progress,
    read_build_status,
    write_build_status,
)
from core.console import Console, format_seconds
from specialize.progress import (
    ProgressMonitor,
    bar_stage,
    continue_command,
    format_progress,
    kept_summary,
    next_stage,
)
from tests.conftest import REPO

# --- the status file -------------------------------------------------------------------------


def test_build_status_round_trip_and_what_the_server_reports(tmp_path):
    status = BuildStatus(domains={
        "law": DomainProgress(state="running", stage="respond", done=40, total=96, eta_s=310.0),
        "math": DomainProgress(state="queued"),
        "finance": DomainProgress(state="published")})
    write_build_status(tmp_path, status)
    assert json.loads((tmp_path / BUILD_STATUS_FILE).read_text())["format"] == 1
    back = read_build_status(tmp_path)
    assert back.domains == status.domains and back.pid == os.getpid()
    # Published experts are in the registry, not "being made".
    assert describe_in_progress(back) == {
        "law": {"state": "running", "stage": "respond", "done": 40, "total": 96, "eta_s": 310.0},
        "math": {"state": "queued"}}
    clear_build_status(tmp_path)
    clear_build_status(tmp_path)  # twice: no error
    assert read_build_status(tmp_path) is None and describe_in_progress(None) == {}


def test_a_stale_or_unreadable_status_file_means_nothing_in_progress(tmp_path):
    write_build_status(tmp_path, BuildStatus(domains={"law": DomainProgress(state="running")}))
    written = read_build_status(tmp_path).updated
    later = written + timedelta(seconds=STALE_AFTER_S + 1)
    assert read_build_status(tmp_path, now=later) is None  # the writer died (SIGKILL)
    assert read_build_status(tmp_path, now=written + timedelta(seconds=5)) is not None
    (tmp_path / BUILD_STATUS_FILE).write_text('{"format": 2, "domains": {}}')
    assert read_build_status(tmp_path) is None
    (tmp_path / BUILD_STATUS_FILE).write_text("{not json")
    assert read_build_status(tmp_path) is None


# --- progress ----------------------------------------------------------------------------------


def test_format_seconds():
    assert [format_seconds(s) for s in (None, 0.4, 42, 65, 3725)] == [
        "?", "0 s", "42 s", "1 min 05 s", "1 h 02 min"]


def test_stages_and_bars_map_to_the_pipeline():
    assert next_stage({}) == "generate"
    assert next_stage({"generate": {}, "filter": {}, "respond": {}}) == "respond_filter"
    done1 = {s: {} for s in ("generate", "filter", "respond", "respond_filter", "train",
                             "validate_train")}
    assert next_stage(done1) == "publish" and next_stage(done1, rounds=2) == "respond2"
    # stage 2b (user-style routing queries) counts only when it runs
    assert next_stage({"generate": {}, "filter": {}}) == "respond"
    assert next_stage({"generate": {}, "filter": {}}, queries=True) == "queries"
    assert next_stage({"generate": {}, "filter": {}, "queries": {}}, queries=True) == "respond"
    assert bar_stage("law: instructions", "law") == "generate"
    assert bar_stage("law: responses (r2)", "law") == "respond2"
    assert bar_stage("train law", "law") == "train"
    assert bar_stage("math: responses", "law") is None
    assert bar_stage("Processed prompts", "law") is None  # vLLM's own bar


def _work(experts: Path, name: str, done: list[str], files: dict[str, int] | None = None):
    wd = experts / ".work" / name
    wd.mkdir(parents=True)
    (wd / "state.json").write_text(json.dumps({"done": {s: {} for s in done}}))
    for rel, n in (files or {}).items():
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("".join(json.dumps({"id": i}) + "\n" for i in range(n)))


def test_monitor_reads_work_dirs_and_bars_writes_the_file_and_one_line(tmp_path):
    experts, out = tmp_path / "experts", io.StringIO()
    experts.mkdir()
    bars = []
    mon = ProgressMonitor(experts, ["law", "math", "finance"], Console(out, tty=False),
                          bars=lambda: list(bars))
    # Nothing on disk, no bar: the first domain waits for its engine, the others are queued.
    s = mon.snapshot(now=100.0)
    assert (s.domains["law"].state, s.domains["law"].stage) == ("running", "engine start")
    assert [s.domains[d].state for d in ("math", "finance")] == ["queued", "queued"]
    assert format_progress(s) == "law: starting the engine (0 s) | next: math, finance"

    _work(experts, "law", ["generate", "filter"])
    bars.append({"desc": "law: responses", "n": 40, "total": 96, "rate": 0.5})
    s = mon.snapshot(now=130.0)
    assert s.domains["law"] == DomainProgress(state="running", stage="respond", done=40,
                                              total=96, eta_s=112.0, elapsed_s=0.0)
    assert format_progress(s).startswith("law: answers 40/96, 1 min 52 s left | next:")

    mon.refresh()
    assert read_build_status(experts).domains["law"].done == 40
    mon.refresh()  # the same stage: off a terminal, not printed again
    assert out.getvalue().splitlines() == [format_progress(mon.snapshot())]
    with mon:
        pass
    assert not (experts / BUILD_STATUS_FILE).exists()  # the run ended: nothing in progress


def test_kept_summary_and_the_command_that_continues(tmp_path):
    from core.registry import Registry, write_registry
    from tests.test_serve_config import entry

    write_registry(tmp_path, Registry(revision=1, experts={"law": entry("law")}))
    _work(tmp_path, "math", ["generate", "filter"], {"respond/responses.jsonl": 17})
    _work(tmp_path, "finance", ["generate", "filter", "respond", "respond_filter"])
    assert kept_summary(tmp_path, ["law", "math", "finance", "biomedicine"]) == (
        f"kept experts law in {tmp_path} and the work on math (17 answers), finance (at "
        f"training) in {tmp_path / '.work'}")
    assert kept_summary(tmp_path, ["biomedicine"]) == "nothing to keep yet"
    assert continue_command(["specialize", "law", "--experts-dir", "my dir"]) == \
        "selfspec specialize law --experts-dir 'my dir' --resume"
    assert continue_command(["specialize", "--all", "--restart"]) == \
        "selfspec specialize --all --resume"
    assert continue_command(["up", "--port", "9000"], flag=None) == "selfspec up --port 9000"


# --- the console --------------------------------------------------------------------------------


def test_plain_console_prints_a_status_on_change_and_a_spinner_its_time():
    out = io.StringIO()
    c = Console(out, tty=False)
    c.status("a: 1/3", key="a")
    c.status("a: 2/3", key="a")  # same key: not repeated off a terminal
    c.status("b: 1/3", key="b")
    c.say("hello")
    with c.spinner("starting the engine"):
        pass
    with pytest.raises(RuntimeError), c.spinner("index build"):
        raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["a: 1/3", "b: 1/3", "hello"]
    assert lines[3].startswith("| starting the engine ... 0 s")
    assert lines[4] == "starting the engine: done in 0 s"
    assert "index build: done" not in out.getvalue()  # a failed step does not say done


def test_terminal_console_rewrites_one_line():
    out = io.StringIO()
    c = Console(out, tty=True)
    c.status("a: 1/3")
    c.status("a: 2/3")
    c.say("hello")
    c.end_status()
    assert out.getvalue() == ("\r\x1b[2Ka: 1/3\r\x1b[2Ka: 2/3\r\x1b[2Khello\na: 2/3"
                              "\r\x1b[2K")


# --- log routing and Ctrl-C, in real processes ---------------------------------------------------

ROUTE = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from core.console import console, route_output
    path = route_output("serve", verbose=sys.argv[1] == "-v")
    console.say(f"log: {path}")
    subprocess.run([sys.executable, "-c", "import sys; print('engine core noise', file=sys.stderr)"])
    os.write(2, b"triton noise from C\\n")
    logging.getLogger("vllm").warning("vllm warning")
    logging.getLogger("specialize.pipeline").warning("our own warning")
    warnings.warn("a python warning")
    console.say("progress line")
    print("result on stdout")
    console.quiet_stdout()  # a server printed its ready message: Ray's prints go to the log
    print("(raylet) Task failed", flush=True)
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_engine_noise_goes_to_the_log_file_and_verbose_tees_it(tmp_path, verbose):
    proc = subprocess.run([sys.executable, "-c", ROUTE, "-v" if verbose else "-"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "SELFSPEC_LOG_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    (log,) = tmp_path.glob("serve-*.log")
    text = log.read_text()
    noise = ("engine core noise", "triton noise from C", "vllm warning", "a python warning")
    assert all(n in text for n in noise) and "our own warning" in text
    assert proc.stdout == "result on stdout\n" + ("(raylet) Task failed\n" if verbose else "")
    assert ("(raylet) Task failed" in text) != verbose
    assert f"log: {log}" in proc.stderr and "progress line" in proc.stderr
    assert "our own warning" in proc.stderr
    assert all((n in proc.stderr) == verbose for n in noise), proc.stderr


SLOW_SPECIALIZE = textwrap.dedent("""
    # `selfspec specialize` with an engine whose core is a real child process that, like vLLM's,
    # gets the terminal's SIGINT, prints a traceback and dies; the run then sees the engine dead.
    import functools, subprocess, sys, time
    from pathlib import Path
    import specialize.pipeline as pipeline

    TMP = sys.argv[-1]

    class Tok:  # the perplexity judge tokenizes before its one engine call
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    class SlowEngine:
        tokenizer = Tok()
        def __init__(self, *args, **kwargs):
            self.core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        def chat_prompt(self, user):
            return user
        def complete(self, prompts, sampling=None, adapter=None):
            Path(TMP, "in-engine").touch()
            while self.core.poll() is None:
                time.sleep(0.05)
            raise RuntimeError("EngineDeadError: EngineCore encountered an issue")
        complete_tokens = complete  # the perplexity filter's call, if it comes first
        def close(self):  # like vLLM's shutdown: give the core a moment, then kill it
            try:
                self.core.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.core.kill()

    pipeline.resolve_base_model = lambda spec: Path(spec)
    pipeline.specialize = functools.partial(pipeline.specialize, make_generator=SlowEngine)
    sys.argv = ["selfspec", "specialize", "finance", "--experts-dir", TMP + "/experts",
                "--base-model", TMP, "--retrieval", "bm25"]
    from selfspec.cli import main
    sys.exit(main())
""")


def test_ctrl_c_in_specialize_ends_in_one_line_without_a_traceback(tmp_path):
    env = {**os.environ, "SELFSPEC_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SPECIALIZE, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while not (tmp_path / "in-engine").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fake engine was never called"
        time.sleep(0.1)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    console = (out + err).strip().splitlines()
    assert "Traceback" not in out + err and "EngineDeadError" not in out + err
    assert [line for line in console if "interrupted" in line] == [console[-1]]
    experts = tmp_path / "experts"
    assert console[-1] == (
        f"interrupted: kept the work on finance (at instructions) in "
        f"{experts / '.work'}; continue with: selfspec specialize finance --experts-dir "
        f"{experts} --base-model {tmp_path} --retrieval bm25 --resume")
    (log,) = (tmp_path / "logs").glob("specialize-*.log")
    assert "Traceback" in log.read_text()  # the engine core's, kept for whoever needs it
    assert not (experts / BUILD_STATUS_FILE).exists()


def test_stop_child_ends_the_childs_whole_process_group(tmp_path):
    from selfspec.up import stop_child

    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)']); "
              "print('started', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             start_new_session=True, text=True)
    assert child.stdout.readline() == "started\n"
    rc = stop_child(child, grace_s=10)
    assert rc != 0

    def group_alive() -> list[str]:  # zombies are dead: only reaping is left
        rows = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True,
                              text=True, check=True).stdout.splitlines()
        return [r for r in rows if r.split()[1] == str(child.pid) and
                not r.split()[2].startswith("Z")]

    # The grandchild ignored SIGINT; SIGKILL to the group took it too.
    deadline = time.monotonic() + 10
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_alive() == []


def test_health_and_models_say_which_experts_are_being_made(tmp_path):
    from tests.serve_fakes import make

    client, *_ = make(experts_dir=str(tmp_path))
    assert client.get("/health").json()["building"] == {}
    assert client.get("/v1/models").json()["building"] == {}
    write_build_status(tmp_path, BuildStatus(domains={
        "math": DomainProgress(state="running", stage="train", elapsed_s=12.0),
        "law": DomainProgress(state="published"),
        "biomedicine": DomainProgress(state="queued")}))
    want = {"math": {"state": "running", "stage": "train", "elapsed_s": 12.0},
            "biomedicine": {"state": "queued"}}
    assert client.get("/health").json()["building"] == want
    models = client.get("/v1/models").json()
    assert models["building"] == want and "math" not in [m["id"] for m in models["data"]]
    clear_build_status(tmp_path)  # the run ended
    assert client.get("/health").json()["building"] == {}


def test_up_shows_the_childs_progress_and_each_expert_the_server_gains(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from core.console import console
    from selfspec import up

    write_build_status(tmp_path, BuildStatus(domains={
        "law": DomainProgress(state="running", stage="respond", done=3, total=8, eta_s=20.0),
        "math": DomainProgress(state="queued")}))
    served = iter([["auto", "base"], ["auto", "base", "law"]])
    monkeypatch.setattr(up, "served_models", lambda url, key: next(served, ["law", "math"]))
    monkeypatch.setattr(up, "POLL_S", 0.05)
    clock = iter(range(0, 10_000, 6))  # each look at the clock is 6 s later: /v1/models each poll
    monkeypatch.setattr(up, "time", SimpleNamespace(monotonic=lambda: next(clock),
                                                    sleep=time.sleep))
    out = io.StringIO()
    monkeypatch.setattr(console, "_stream", out)
    monkeypatch.setattr(console, "_tty", False)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    cfg = SimpleNamespace(experts_dir=tmp_path, api_key=None)
    assert up.watch_child(child, cfg, "http://x", ["law", "math"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "law: answers 3/8, 20 s left | next: math"
    assert "now serving law: model='law', and auto routes to it" in lines
    assert lines[-1].startswith("all experts made: law, math")

    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert up.watch_child(failing, cfg, None, ["law"]) == 1
    assert "specialization stopped with exit 3" in out.getvalue().splitlines()[-1]


def test_bad_input_in_a_real_process_is_one_line_without_the_log_path():
    # The log path is shown before the first progress output only; an unknown domain fails first.
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli", "specialize", "nope"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("selfspec: error: unknown domain 'nope'")


def test_the_queries_stage_is_named_not_taken_for_an_engine_start(tmp_path):
    """Stage 2b has no bar and runs on the engine already started: with `router_queries` on,
    a domain between the instruction filter and the answers is writing its routing queries."""
    experts = tmp_path / "experts"
    _work(experts, "law", ["generate", "filter"])
    mon = ProgressMonitor(experts, ["law"], Console(io.StringIO(), tty=False), bars=list,
                          queries=True)
    s = mon.snapshot(now=10.0)
    assert s.domains["law"].stage == "queries"
    assert format_progress(s) == "law: writing routing queries (0 s)"
    off = ProgressMonitor(experts, ["law"], Console(io.StringIO(), tty=False), bars=list)
    assert off.snapshot(now=10.0).domains["law"].stage == "engine start"  # the answers' engine
