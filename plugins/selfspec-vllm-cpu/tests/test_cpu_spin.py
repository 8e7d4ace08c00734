"""The engine core's nap instead of vLLM's spin (selfspec_vllm_cpu/spin.py), on a stand-in condition
with vLLM's SpinCondition.wait contract; the real class is patched in every CPU engine the
integration tests start."""

from __future__ import annotations

import time

import pytest

from selfspec_vllm_cpu import spin


class FakeCondition:
    def __init__(self, busy_loop_s: float = 1.0):
        self.last_read, self.busy_loop_s, self.polls = time.monotonic(), busy_loop_s, 0

    def wait(self, timeout_ms=None):  # vLLM: sched_yield() in the busy window, else poll
        self.polls += 1


@pytest.fixture
def cls():
    class C(FakeCondition):
        pass
    return C


def test_naps_in_the_busy_window_instead_of_spinning(cls, monkeypatch):
    monkeypatch.setattr(spin, "is_worker_process", lambda: False)
    assert spin.install(cls, nap_s=0.002)
    c = cls()
    t0 = time.perf_counter()
    for _ in range(5):
        c.wait()
    assert time.perf_counter() - t0 >= 0.009 and c.polls == 0
    c.last_read -= 5  # idle for longer than the busy window: vLLM's own blocking poll
    c.wait(timeout_ms=10)
    assert c.polls == 1


def test_workers_keep_vllms_spin(cls, monkeypatch):
    monkeypatch.setattr(spin, "is_worker_process", lambda: True)
    spin.install(cls, nap_s=0.05)
    c = cls()
    t0 = time.perf_counter()
    c.wait()
    assert time.perf_counter() - t0 < 0.04 and c.polls == 1


def test_installs_once_and_zero_turns_it_off(cls, monkeypatch):
    assert not spin.install(cls, nap_s=0)
    assert cls.wait is FakeCondition.wait
    spin.install(cls, nap_s=0.001)
    patched = cls.wait
    spin.install(cls, nap_s=0.001)
    assert cls.wait is patched
    monkeypatch.setenv(spin.NAP_ENV, "250")
    assert spin.nap_seconds() == pytest.approx(250e-6)
    monkeypatch.setenv(spin.NAP_ENV, "fast")
    assert spin.nap_seconds() == pytest.approx(spin.DEFAULT_NAP_US / 1e6)


def test_vllms_spin_condition_has_what_the_patch_relies_on():
    import inspect

    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    wait = getattr(SpinCondition.wait, "_selfspec_original", SpinCondition.wait)
    assert "self.last_read + self.busy_loop_s" in inspect.getsource(wait)
    assert "busy_loop_s" in inspect.signature(SpinCondition.__init__).parameters


def _report_worker(q):
    q.put(spin.is_worker_process())


@pytest.mark.parametrize("name,worker", [("VllmWorker-0", True), ("EngineCore", False)])
def test_workers_are_known_by_their_process_name_not_their_title(name, worker):
    # vLLM's names for its spawned processes; no title is set here, as when setproctitle fails
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_report_worker, args=(q,), name=name)
    p.start()
    try:
        assert q.get(timeout=60) is worker
    finally:
        p.join(10)
