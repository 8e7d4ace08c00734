"""Keep Ray Serve's processes off the cores vLLM's CPU worker computes on.

On a CPU node, vLLM binds its worker's OpenMP threads to the node's cores minus
`VLLM_CPU_NUM_OF_RESERVED_CPU` (default: one per worker) and leaves the reserved cores to "other
processes": its engine core and its front end. Under Ray Serve there are more of those (the proxy,
the controller, this app's ingress, router and engine replicas) and Linux places them on any core.
One that lands on a worker core preempts a thread the whole step is waiting for. With them moved
to the reserved cores, the stack served 7-12% more tokens/s on a 2-core machine
(`selfspec bench serving`).

The engine replica does this once vLLM is up, and again at each health check, for replicas that
start later (autoscaling, restarts). Only processes on its own node, only Serve's: the engine
replica and what it spawned (except the worker), and, in the same Ray session, this app's
replicas and Serve's proxy and controller. Nothing happens when the worker is not bound to a
subset of the cores (GPU engines, `VLLM_CPU_OMP_THREADS_BIND=nobind`, one core).
`engine.isolate_worker_cpus: false` turns it off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

# vLLM's process titles (prefix `VLLM_PROCESS_NAME_PREFIX`): VLLM::EngineCore, VLLM::Worker_TP1...
ENGINE_TITLE, WORKER_TITLE = "::EngineCore", "::Worker"
# What a process started by multiprocessing's spawn runs, when nothing has retitled it.
SPAWNED = "from multiprocessing.spawn import spawn_main"
SERVE_TITLES = ("ray::ProxyActor", "ray::ServeController")
# The cores this process could use before any pinning: what vLLM saw when it bound its worker.
_NODE_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


@dataclass(frozen=True)
class Pinning:
    worker_cpus: tuple[int, ...]
    serve_cpus: tuple[int, ...]
    processes: int  # processes now on serve_cpus

    def as_dict(self) -> dict:
        return {"worker_cpus": list(self.worker_cpus), "serve_cpus": list(self.serve_cpus),
                "processes": self.processes}


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process this user can see on the node."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        yield int(entry.name), ppid, cmd


def _children(table: list[tuple[int, int, str]]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in table:
        children.setdefault(ppid, []).append(pid)
    return children


def _descendants(root: int, children: dict[int, list[int]]) -> set[int]:
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _pin(pid: int, cpus: frozenset[int]) -> bool:
    """Every thread of pid onto cpus (affinity is per thread; new threads inherit it)."""
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    for tid in threads:
        try:
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended, or the process is not ours
            continue
    return True


def vllm_processes(root: int, table: list[tuple[int, int, str]] | None = None,
                   ) -> tuple[set[int], set[int]]:
    """(engine cores, workers) of the vLLM engine run by process `root` (an engine replica).

    The engine core is a multiprocessing child of `root`, and the workers are its children.
    Titles alone are not enough: vLLM titles them with setproctitle, which silently leaves the
    title unset when the first entry of the process's environment was rewritten before the
    title was set, and Ray hands its workers their environment in a random order. On a 2-core
    CI machine that left 2 engine starts in 5 untitled. So an untitled spawned child counts by
    its place in the tree."""
    table = list(_processes()) if table is None else table
    children = _children(table)
    cmds = {pid: cmd for pid, _, cmd in table}

    def title(pid: int) -> str:
        return cmds[pid].split(" ", 1)[0]

    below = _descendants(root, children)
    workers = {pid for pid in below if WORKER_TITLE in title(pid)}
    cores = {pid for pid in below if ENGINE_TITLE in title(pid)}
    cores |= {pid for pid in children.get(root, []) if pid not in workers and SPAWNED in cmds[pid]}
    workers |= {pid for core in cores for pid in children.get(core, [])
                if SPAWNED in cmds[pid] and "::" not in title(pid)}
    return cores, workers


def isolate_worker_cpus(app: str, root: int | None = None) -> Pinning | None:
    """Move Serve's processes on this node onto the cores vLLM's workers leave free.

    `root` is the engine replica's pid (default: this process); vLLM's workers are among its
    descendants. Returns what was done, or None when there was nothing to do."""
    if _NODE_CPUS is None or not os.path.isdir("/proc"):
        return None
    root = os.getpid() if root is None else root
    table = list(_processes())
    below = _descendants(root, _children(table))
    _, workers = vllm_processes(root, table)
    worker_cpus: set[int] = set()
    for pid in workers:
        try:
            worker_cpus |= os.sched_getaffinity(pid)  # the worker's main thread: its OMP binding
        except OSError:
            continue
    free = _NODE_CPUS - worker_cpus
    if not worker_cpus or not free:
        return None
    # Ray's workers are children of the node's raylet, as is this replica: siblings of `root`
    # are this Ray session's processes (another session's Serve on the node is left alone).
    raylet = next(ppid for pid, ppid, _ in table if pid == root)
    replica_prefix = f"ray::ServeReplica:{app}:"
    targets = ({root} | below) - workers
    targets |= {pid for pid, ppid, cmd in table if ppid == raylet
                and (cmd.startswith(replica_prefix) or cmd.startswith(SERVE_TITLES))}
    pinned = sum(_pin(pid, frozenset(free)) for pid in sorted(targets))
    return Pinning(tuple(sorted(worker_cpus)), tuple(sorted(free)), pinned)
