"""`selfspec specialize --ray-address ADDR`: one domain per Ray task, one shared registry.

Each domain runs the sequential pipeline (`specialize.pipeline.specialize`) on its own in a Ray
task with declared resources (its own vLLM engine, then training, then an atomic publish under
the registry's file lock). The driver checks everything that can fail fast before submitting,
shows a bar over finished domains, rebuilds the router index once more at the end (each task
already rebuilds it after its publish; `router/index.py` serializes and de-duplicates those
builds), and prints the same summary table as the sequential path. A failed domain does not stop
the others; its work dir stays for `--resume` and its traceback goes to `error.log` in it.

Shared filesystem: every Ray node must see the experts dir, the seed folders and a local base
model folder at the same absolute paths (NFS or similar). The driver writes a probe file into
the experts dir and each task checks that it sees that very file, so a node with its own local
folder of the same name fails with a clear message instead of publishing into a private registry.

Sharding a large domain (`--shards K`): see `specialize/shards.py`, which holds the task bodies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from core.base_model import resolve_base_model
from core.engine import build_vllm_generator
from core.errors import ConfigError, SelfspecError
from core.seeds import Domain, load_domain
from specialize.config import SpecializeConfig
from specialize.pipeline import check_encoder
from specialize.publish import ensure_writable
from specialize.shards import (
    finish_sharded,
    prepare_shards,
    respond_shard,
    run_domain,
    workdir_of,
)

log = logging.getLogger(__name__)

# Set on the driver, needed the same way by the tasks (offline hub, caches, engine logs).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
                 "SELFSPEC_CACHE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL")
# A task lost with its worker or node is retried once; tasks always resume, so the retry
# continues from the last fsynced batch instead of starting over.
MAX_RETRIES = 1


class DistributedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str = Field(description="auto, local, HOST:PORT or ray://HOST:PORT")
    task_cpus: float | None = Field(None, gt=0, description="None: 1 with GPUs, else a node's")
    task_gpus: float | None = Field(None, ge=0, description="None: 1 if the cluster has GPUs")
    task_memory_gib: float | None = Field(None, gt=0, description="None: not declared")
    shards: int = Field(1, ge=1, le=64, description="respond shards for every domain")
    shards_by_domain: dict[str, int] = Field(default_factory=dict)
    log_to_driver: bool = False  # worker progress bars interleave badly with the driver's

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v not in ("auto", "local") and not v.startswith("ray://") and ":" not in v:
            raise ValueError(f"{v!r} is not a Ray address: pass auto (a running `ray start` "
                             "cluster), local (start one here), HOST:PORT or ray://HOST:PORT")
        return v

    @field_validator("shards_by_domain")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {d: k for d, k in v.items() if not 1 <= k <= 64}
        if bad:
            raise ValueError(f"shard counts must be 1..64, got {bad}")
        return v

    def shards_for(self, domain: str) -> int:
        return self.shards_by_domain.get(domain, self.shards)


def build_distributed_config(address: str, shards: list[str] | None = None,
                             **kwargs) -> DistributedConfig:
    """`shards` as given on the command line: `K` (every domain) or `DOMAIN=K`, repeatable."""
    count, by_domain = 1, {}
    for spec in shards or []:
        name, _, k = spec.rpartition("=")
        if not k.isdigit() or (name == "" and "=" in spec):
            raise ConfigError(f"--shards takes K or DOMAIN=K (e.g. --shards finance=4), "
                              f"got {spec!r}")
        if name:
            by_domain[name] = int(k)
        else:
            count = int(k)
    try:
        return DistributedConfig(address=address, shards=count, shards_by_domain=by_domain,
                                 **kwargs)
    except ValidationError as e:
        msgs = [f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid Ray settings:\n  " + "\n  ".join(msgs)) from None


@dataclass(frozen=True)
class TaskResources:
    num_cpus: float
    num_gpus: float
    memory: int | None  # bytes; None leaves Ray's memory resource out

    def options(self) -> dict:
        opts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        return opts | ({"memory": self.memory} if self.memory else {})

    def __str__(self) -> str:
        mem = f", {self.memory / 2**30:.1f} GiB" if self.memory else ""
        return f"{self.num_cpus:g} CPU, {self.num_gpus:g} GPU{mem} per task"


@dataclass
class Outcome:
    results: list[dict]  # the sequential path's summaries, in the order the domains were named
    failed: dict[str, str] = field(default_factory=dict)  # domain -> why


def specialize_distributed(domains: list[str], cfg: SpecializeConfig, dcfg: DistributedConfig,
                           resume: bool = False, restart: bool = False,
                           make_generator=build_vllm_generator, make_encoder=None) -> Outcome:
    """`make_encoder`: as for `specialize()`; each task builds its own from it."""
    # --- everything that can fail fast does, on the driver, before Ray is even contacted -----
    cfg = absolute_paths(cfg)  # tasks run in other working dirs, maybe on other machines
    loaded = check_driver(domains, cfg, dcfg, resume, restart)
    check_encoder(cfg, make_encoder)
    if restart:  # after every check: a refused run discards nothing
        for d in loaded:
            shutil.rmtree(workdir_of(cfg, d.name), ignore_errors=True)

    import ray

    own = _connect(dcfg)
    probe = cfg.experts_dir / ".work" / f".probe-{uuid.uuid4().hex}"
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        res = resolve_resources(dcfg, nodes, cfg.engine.tensor_parallel_size)
        check_fits(res, nodes)
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(socket.gethostname())
        finals, every = {}, []
        tasks = {fn.__name__: ray.remote(fn).options(**res.options(), max_retries=MAX_RETRIES)
                 for fn in (run_domain, prepare_shards, respond_shard, finish_sharded)}
        for d in loaded:
            final, refs = _submit(tasks, d, cfg, dcfg.shards_for(d.name), make_generator, probe,
                                  make_encoder)
            finals[final], every = d.name, every + refs
        sharded = {n: k for n in finals.values() if (k := dcfg.shards_for(n)) > 1}
        tqdm.write(f"{len(loaded)} domain(s) on Ray at {dcfg.address}: {res}" +
                   (f"; respond shards {sharded}" if sharded else ""), file=sys.stderr)
        try:
            outcome = _collect(finals, cfg)
        except KeyboardInterrupt:
            for ref in every:  # free the cluster; finished batches are on the shared disk
                ray.cancel(ref, force=True)
            raise
    finally:
        probe.unlink(missing_ok=True)
        if own:
            ray.shutdown()
    order = {d.name: i for i, d in enumerate(loaded)}
    outcome.results.sort(key=lambda r: order[r["domain"]])
    return outcome


def absolute_paths(cfg: SpecializeConfig) -> SpecializeConfig:
    update: dict = {"experts_dir": cfg.experts_dir.expanduser().resolve()}
    if cfg.respond.corpus:
        update["respond"] = cfg.respond.model_copy(
            update={"corpus": cfg.respond.corpus.expanduser().resolve()})
    if Path(cfg.base_model).expanduser().exists():
        update["base_model"] = str(Path(cfg.base_model).expanduser().resolve())
    return cfg.model_copy(update=update)


def check_driver(domains: list[str], cfg: SpecializeConfig, dcfg: DistributedConfig,
                 resume: bool = False, restart: bool = False) -> list[Domain]:
    """The sequential path's checks, plus the ones a distributed run adds."""
    loaded = [load_domain(d) for d in domains]
    names = [d.name for d in loaded]
    if len(set(names)) != len(names):
        raise ConfigError(f"a domain is named twice: {domains}")
    unknown = sorted(set(dcfg.shards_by_domain) - set(names))
    if unknown:
        raise ConfigError(f"--shards names {unknown}, which this run does not specialize "
                          f"(domains: {', '.join(names)})")
    ensure_writable(cfg.experts_dir)
    corpus = cfg.respond.corpus
    if cfg.respond.retrieval != "none" and corpus and not any(Path(corpus).glob("*.md")):
        raise ConfigError(f"--corpus {corpus} is not a folder of Markdown (.md) passages")
    resolve_base_model(cfg.base_model)
    for d in [] if restart else loaded:  # --restart discards whatever the work dirs hold
        _check_workdir(d.name, workdir_of(cfg, d.name), cfg, dcfg.shards_for(d.name), resume)
    return loaded


def _check_workdir(name: str, workdir: Path, cfg: SpecializeConfig, shards: int,
                   resume: bool) -> None:
    if not workdir.exists():
        return
    if not resume:
        raise ConfigError(f"an interrupted run of {name!r} is in {workdir}: pass --resume "
                          "to continue it, or --restart to discard it and start over")
    state_path = workdir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("base_model", cfg.base_model) != cfg.base_model:
        raise ConfigError(f"--resume: {workdir} was started with base model "
                          f"{state['base_model']!r}, not {cfg.base_model!r}")
    started = state.get("shards", 1)
    if started > 1 and started != shards and "respond" not in state.get("done", {}):
        raise ConfigError(f"--resume: {name}'s answers were split into {started} shards; pass "
                          f"--shards {name}={started} to continue them, or --restart")


def _connect(dcfg: DistributedConfig) -> bool:
    """Connect (or start a local cluster); True when this call owns the connection."""
    import ray

    if ray.is_initialized():  # a caller's own session (Python API): use it, leave it running
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs = {"log_to_driver": dcfg.log_to_driver,
              "runtime_env": {"env_vars": env} if env else None,
              "logging_level": logging.INFO if dcfg.log_to_driver else logging.WARNING}
    try:
        if dcfg.address == "local":
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=dcfg.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot connect to Ray at {dcfg.address!r} ({e}): start a cluster "
                          "with `ray start --head` (then --ray-address auto), or pass "
                          "--ray-address local for one on this machine") from None
    return True


def resolve_resources(dcfg: DistributedConfig, nodes: list[dict],
                      tensor_parallel_size: int = 1) -> TaskResources:
    """Defaults: a GPU per task when the cluster has GPUs (vLLM and PEFT then need only a CPU
    to feed them), or `tensor_parallel_size` GPUs when the engine shards the model over several
    (vLLM starts its extra workers on the GPUs Ray gave the task); on CPUs a whole node per task,
    because vLLM's CPU backend and torch both use every core they get and two tasks on one node
    would just halve each other's speed."""
    gpus = dcfg.task_gpus if dcfg.task_gpus is not None else \
        (float(tensor_parallel_size) if any(n.get("GPU", 0) > 0 for n in nodes) else 0.0)
    if dcfg.task_cpus is not None:
        cpus = dcfg.task_cpus
    else:
        cpus = 1.0 if gpus else min((n["CPU"] for n in nodes if n.get("CPU", 0) > 0), default=1.0)
    memory = int(dcfg.task_memory_gib * 2**30) if dcfg.task_memory_gib else None
    return TaskResources(cpus, gpus, memory)


def check_fits(res: TaskResources, nodes: list[dict]) -> None:
    """Ray would queue a task no node can ever run forever: refuse it now instead. (A cluster
    whose autoscaler adds bigger nodes later is not foreseen: pass resources that fit now.)"""
    def fits(n: dict) -> bool:
        return (n.get("CPU", 0) >= res.num_cpus and n.get("GPU", 0) >= res.num_gpus and
                (res.memory is None or n.get("memory", 0) >= res.memory))

    if not any(fits(n) for n in nodes):
        have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU, "
                         f"{n.get('memory', 0) / 2**30:.1f} GiB" for n in nodes) or "no nodes"
        raise ConfigError(f"no node of the Ray cluster can run a domain task ({res}); nodes "
                          f"have: {have}. Lower --task-cpus / --task-gpus / --task-memory-gib, "
                          "or add a node that fits")


def _submit(tasks: dict, d: Domain, cfg: SpecializeConfig, shards: int, make_generator,
            probe: Path, make_encoder=None) -> tuple:
    """Submit one domain; return (the ref whose value is its summary, every ref it made)."""
    path = str(d.root.resolve())
    if shards == 1:
        ref = tasks["run_domain"].remote(path, cfg, make_generator, probe, make_encoder)
        return ref, [ref]
    # Ray starts a task only once the refs it is given are ready: no task holds a GPU waiting.
    prep = tasks["prepare_shards"].remote(path, cfg, shards, make_generator, probe)
    parts = [tasks["respond_shard"].remote(path, cfg, i, make_generator, prep, make_encoder)
             for i in range(shards)]
    final = tasks["finish_sharded"].remote(path, cfg, make_generator, *parts,
                                           make_encoder=make_encoder)
    return final, [prep, *parts, final]


def _collect(finals: dict, cfg: SpecializeConfig) -> Outcome:
    import ray

    outcome, pending, started = Outcome([]), list(finals), time.time()
    with tqdm(total=len(finals), desc="domains", unit="domain") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = finals[ready[0]]
            took = f"{time.time() - started:.0f} s"
            try:
                r = ray.get(ready[0])
                outcome.results.append(r)
                bar.write(f"  ok     {name}: published v{r['version']} ({r['train_examples']} "
                          f"examples, loss {r['loss_first']:.3f}→{r['loss_last']:.3f}) at {took}",
                          file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - one domain's failure must not lose the others
                outcome.failed[name] = reason(e)
                logfile = workdir_of(cfg, name) / "error.log"
                try:
                    logfile.parent.mkdir(parents=True, exist_ok=True)
                    logfile.write_text("".join(traceback.format_exception(e)))
                    outcome.failed[name] += f" (details: {logfile})"
                except OSError:
                    pass
                bar.write(f"  FAILED {name} at {took}: {outcome.failed[name]}", file=sys.stderr)
            bar.update()
    return outcome


def reason(e: BaseException) -> str:
    """One readable line for a task failure: the task's own error, not Ray's wrapper."""
    cause = e
    while getattr(cause, "cause", None) is not None:  # RayTaskError keeps the task's exception
        cause = cause.cause
    if isinstance(cause, SelfspecError):
        return str(cause)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:400]
