"""vLLM's engine core on CPU: wait for the worker without spinning on a shared core.

vLLM's shared-memory message-queue readers spin (`sched_yield()` in a loop) for a second after
each message they read, so the next one is picked up at once. On a GPU node that spin costs one
of many host cores. On a CPU node the engine core runs on the cores vLLM keeps for everything
but its worker (`VLLM_CPU_NUM_OF_RESERVED_CPU`, one by default), next to the API server or, in
selfspec, Ray Serve's processes and the router. There the spin took most of that core: 5.7 of
the 7.8 s of one bench run.

So in every vLLM process on CPU except the workers (whose cores are their own, where spinning
is the right trade), a reader naps `SELFSPEC_CPU_ENGINE_NAP_US` microseconds (default 100;
0 keeps vLLM's spin) between polls instead of yielding. Measured on 2 cores: engine-core CPU 5.7
-> 0.7 s per run; in alternating rounds, tokens/s up 3-5% for both the stack and plain
`vllm serve` (both load this plugin), though one full bench run after it showed no gain. A step
waits at most ~0.15 ms longer for its result. Blocking on vLLM's own wake-up
socket instead (`busy_loop_s=0`) was tried: throughput swung between 90 and 213 tokens/s.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

NAP_ENV = "SELFSPEC_CPU_ENGINE_NAP_US"
DEFAULT_NAP_US = 100


def nap_seconds() -> float:
    raw = os.environ.get(NAP_ENV, str(DEFAULT_NAP_US)).strip()
    try:
        us = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of microseconds: using %d", NAP_ENV, raw,
                    DEFAULT_NAP_US)
        us = DEFAULT_NAP_US
    return max(us, 0.0) / 1e6


def is_worker_process() -> bool:
    """Whether this is one of vLLM's worker processes. vLLM starts them as multiprocessing
    processes named VllmWorker-<rank>; their title (VLLM::Worker) is not always set (see
    pinning.py `vllm_processes`), the name always is."""
    import multiprocessing

    if multiprocessing.current_process().name.startswith("VllmWorker"):
        return True
    try:
        with open("/proc/self/comm") as f:
            return "Worker" in f.read()
    except OSError:
        return False


def install(condition_cls=None, nap_s: float | None = None) -> bool:
    """Patch `SpinCondition.wait` (once). Returns whether naps are on."""
    if condition_cls is None:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
        condition_cls = SpinCondition
    nap_s = nap_seconds() if nap_s is None else nap_s
    if nap_s <= 0 or getattr(condition_cls.wait, "_selfspec_nap", None) is not None:
        return nap_s > 0
    original = condition_cls.wait

    def wait(self, timeout_ms: int | None = None) -> None:
        naps = self.__dict__.get("_selfspec_naps")
        if naps is None:  # decided on first use: the process is titled by then
            naps = self.__dict__["_selfspec_naps"] = not is_worker_process()
        if naps and time.monotonic() <= self.last_read + self.busy_loop_s:
            time.sleep(nap_s)  # where vLLM would sched_yield(); the caller polls again
            return
        original(self, timeout_ms)

    wait._selfspec_nap, wait._selfspec_original = nap_s, original
    condition_cls.wait = wait
    return True
