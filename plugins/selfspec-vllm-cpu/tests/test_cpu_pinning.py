"""selfspec_vllm_cpu/pinning.py on real processes titled the way vLLM and Ray title theirs: Serve's
processes move off the worker's cores; the worker, other apps and unrelated processes do not."""

import os
import signal
import subprocess
import sys

import pytest

from selfspec_vllm_cpu import pinning

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 usable cores")

SLEEP = "import time; time.sleep(120)"
# (Children get the interpreter's path spelled out: under another argv[0], sys.executable is
# empty.) An engine replica stand-in: starts a worker bound to the first core (as vLLM's OMP binding
# does) and an engine core, then prints their pids.
ENGINE = f"""
import os, subprocess, time
w = subprocess.Popen(["VLLM::Worker", "-c", "import os; os.sched_setaffinity(0, {{{CPUS[0]}}}); "
                      "print('bound', flush=True); {SLEEP}"],
                     executable={sys.executable!r}, stdout=subprocess.PIPE, text=True)
w.stdout.readline()
e = subprocess.Popen(["VLLM::EngineCore", "-c", "{SLEEP}"], executable={sys.executable!r})
print(w.pid, e.pid, flush=True)
time.sleep(120)
"""


def titled(title: str, code: str = SLEEP, **kw) -> subprocess.Popen:
    return subprocess.Popen([title, "-c", code], executable=sys.executable,
                            start_new_session=True, **kw)


@pytest.fixture
def procs():
    started = []

    def start(title, code=SLEEP, **kw):
        p = titled(title, code, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def affinity(pid):
    return sorted(os.sched_getaffinity(pid))


def test_serve_processes_move_off_the_worker_cores(procs):
    engine = procs("ray::ServeReplica:demo:engine", ENGINE, stdout=subprocess.PIPE, text=True)
    worker, core = map(int, engine.stdout.readline().split())
    router = procs("ray::ServeReplica:demo:router")
    proxy = procs("ray::ProxyActor")
    other_app = procs("ray::ServeReplica:other:router")
    unrelated = procs("python3")
    # the same title in another Ray session (not a child of this "raylet"): left alone
    elsewhere = procs("python3", "import subprocess, time; subprocess.Popen(['ray::ProxyActor', "
                      f"'-c', {SLEEP!r}], executable={sys.executable!r}); print('up', "
                      "flush=True); time.sleep(120)", stdout=subprocess.PIPE, text=True)
    elsewhere.stdout.readline()
    other_proxy = next(pid for pid, ppid, _ in pinning._processes() if ppid == elsewhere.pid)

    got = pinning.isolate_worker_cpus("demo", root=engine.pid)

    free = CPUS[1:]
    assert got is not None
    assert got.worker_cpus == (CPUS[0],) and list(got.serve_cpus) == free
    for pid in (engine.pid, core, router.pid, proxy.pid):
        assert affinity(pid) == free, pid
    assert affinity(worker) == [CPUS[0]]
    for pid in (other_app.pid, unrelated.pid, other_proxy):
        assert affinity(pid) == CPUS, pid
    assert got.processes == 4
    # threads started later inherit the pinning; a second pass changes nothing
    again = pinning.isolate_worker_cpus("demo", root=engine.pid)
    assert again == got


def test_nothing_to_do_without_a_bound_worker(procs):
    # GPU engines and `nobind`: the worker may use every core, so there is nowhere to move to
    engine = procs("ray::ServeReplica:demo:engine",
                   "import subprocess, time; subprocess.Popen(['VLLM::Worker', '-c', "
                   f"{SLEEP!r}], executable={sys.executable!r}); print('up', flush=True); "
                   "time.sleep(120)", stdout=subprocess.PIPE, text=True)
    engine.stdout.readline()
    router = procs("ray::ServeReplica:demo:router")
    assert pinning.isolate_worker_cpus("demo", root=engine.pid) is None
    assert affinity(router.pid) == CPUS
    lone = procs("ray::ServeReplica:demo:engine")  # no worker at all
    assert pinning.isolate_worker_cpus("demo", root=lone.pid) is None


# What multiprocessing's spawn runs (the command line an untitled vLLM process keeps); the
# actual code comes through the environment.
SPAWNED_CMD = [sys.executable, "-c", f"{pinning.SPAWNED}; import os; exec(os.environ['CODE'])"]
UNTITLED_WORKER = f"import os; os.sched_setaffinity(0, {{{CPUS[0]}}}); print('bound', flush=True); {SLEEP}"
UNTITLED_CORE = f"""
import os, subprocess, time
w = subprocess.Popen({SPAWNED_CMD!r}, env={{**os.environ, "CODE": {UNTITLED_WORKER!r}}},
                     stdout=subprocess.PIPE, text=True)
w.stdout.readline()
print(w.pid, flush=True)
time.sleep(120)
"""


def test_untitled_vllm_processes_are_found_by_their_place_in_the_tree(procs):
    # setproctitle can fail in vLLM's spawned processes (environment order): the engine core is
    # then the replica's spawned child and the worker the engine core's.
    engine = procs("ray::ServeReplica:demo:engine", "import os, subprocess, time; "
                   # multiprocessing's resource tracker: a child too, not an engine core
                   f"subprocess.Popen([{sys.executable!r}, '-c', 'from multiprocessing.resource_tracker"
                   f" import main; {SLEEP}']); "
                   f"c = subprocess.Popen({SPAWNED_CMD!r}, env={{**os.environ, 'CODE': "
                   f"{UNTITLED_CORE!r}}}, stdout=subprocess.PIPE, text=True); "
                   # every child has run exec by now: a forked child that has not yet still
                   # shows this process's command line, which names spawn_main
                   "print(c.pid, c.stdout.readline().strip(), flush=True); time.sleep(120)",
                   stdout=subprocess.PIPE, text=True)
    core, worker = map(int, engine.stdout.readline().split())
    router = procs("ray::ServeReplica:demo:router")

    assert pinning.vllm_processes(engine.pid) == ({core}, {worker})
    got = pinning.isolate_worker_cpus("demo", root=engine.pid)

    assert got is not None and got.worker_cpus == (CPUS[0],)
    for pid in (engine.pid, core, router.pid):
        assert affinity(pid) == CPUS[1:], pid
    assert affinity(worker) == [CPUS[0]]
