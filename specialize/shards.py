"""The Ray task bodies of `selfspec specialize --ray-address`: plain functions (Ray wraps them
at submit time in `specialize/distributed.py`; tests call them directly).

Sharding a large domain (`--shards K` or `--shards DOMAIN=K`) splits the respond stage: one task
generates and filters the instructions, K tasks (each with its own engine) answer contiguous
slices of the kept instructions, and a last task merges the answers in kept order, then filters,
trains and publishes. Respond is the stage to split: every answer depends only on its own
instruction (demos are seeded per instruction id; at the default greedy decoding the merged
answers equal a sequential run's), whereas instruction generation is a loop whose filter must see
every earlier kept instruction, so splitting it would change what is kept. Shards resume like
the stage does (each shard appends to its own file); a resumed run must use the shard count it
started with, which the driver checks. Round 2 answers are not sharded.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from core.base_model import resolve_base_model
from core.errors import ConfigError
from core.jsonl import read_jsonl, write_json, write_jsonl
from core.seeds import load_domain
from specialize.config import SpecializeConfig
from specialize.pipeline import (
    filter_answers,
    prepare_run,
    retriever_for,
    specialize,
    write_instructions,
    write_queries,
)
from specialize.respond import generate_responses


def run_domain(domain_path: str, cfg: SpecializeConfig, make_generator, probe: Path,
               make_encoder=None) -> dict:
    """The whole sequential pipeline for one domain; resume=True, so a retried task goes on."""
    check_shared(domain_path, probe)
    return specialize([domain_path], cfg, resume=True, make_generator=make_generator,
                      make_encoder=make_encoder)[0]


def prepare_shards(domain_path: str, cfg: SpecializeConfig, shards: int, make_generator,
                   probe: Path) -> int:
    """Sharded domain, step 1: generate and filter instructions, split the kept ones."""
    check_shared(domain_path, probe)
    domain = load_domain(domain_path)
    run = prepare_run(domain, workdir_of(cfg, domain.name), cfg, resume=True, restart=False)
    wd = run.workdir
    if run.done("respond"):
        return shards
    done = run.done("generate") and (run.done("queries") or not cfg.router_queries)
    generator = None if done else make_generator(resolve_base_model(cfg.base_model), cfg.engine)
    try:
        write_instructions(run, cfg, generator)
        write_queries(run, cfg, generator)
    finally:
        if generator is not None:
            generator.close()
    # Recorded before the split: a resumed run then refuses another shard count (driver check).
    run.state["shards"] = shards
    write_json(wd / "state.json", run.state)
    # Instructions an earlier unsharded attempt already answered stay answered.
    answered = {r["id"] for r in read_jsonl(wd / "respond" / "responses.jsonl")}
    todo = [r for r in read_jsonl(wd / "filter" / "kept.jsonl") if r["id"] not in answered]
    for i in range(shards):
        part = _shard_dir(wd, i) / "filter" / "kept.jsonl"
        if not part.exists():  # the split is a pure function of kept.jsonl: safe to redo
            write_jsonl(part, todo[i * len(todo) // shards:(i + 1) * len(todo) // shards])
    return shards


def respond_shard(domain_path: str, cfg: SpecializeConfig, index: int, make_generator,
                  _prepared: int, make_encoder=None) -> dict:
    """Sharded domain, step 2 (K of these at once): answer one slice with its own engine."""
    domain = load_domain(domain_path)
    wd, sd = workdir_of(cfg, domain.name), _shard_dir(workdir_of(cfg, domain.name), index)
    state = json.loads((wd / "state.json").read_text())
    todo = read_jsonl(sd / "filter" / "kept.jsonl")
    answered = {r["id"] for r in read_jsonl(sd / "respond" / "responses.jsonl")}
    if "respond" in state["done"] or {r["id"] for r in todo} <= answered:
        return {"responses": len(todo), "new": 0, "seconds": 0.0}  # no engine start for nothing
    generator = make_generator(resolve_base_model(cfg.base_model), cfg.engine)
    try:
        return generate_responses(domain, cfg.respond, generator, sd,
                                  retriever_for(domain, cfg, make_encoder))
    finally:
        generator.close()


def finish_sharded(domain_path: str, cfg: SpecializeConfig, make_generator,
                   *shard_results: dict, make_encoder=None) -> dict:
    """Sharded domain, step 3: merge and filter the answers, then the pipeline's own train /
    validate / publish (it finds every stage up to respond_filter done)."""
    merge_shards(domain_path, cfg, shard_results)
    return specialize([domain_path], cfg, resume=True, make_generator=make_generator,
                      make_encoder=make_encoder)[0]


def merge_shards(domain_path: str, cfg: SpecializeConfig, shard_results) -> None:
    domain = load_domain(domain_path)
    run = prepare_run(domain, workdir_of(cfg, domain.name), cfg, resume=True, restart=False)
    wd = run.workdir
    if not run.done("respond"):
        kept = read_jsonl(wd / "filter" / "kept.jsonl")
        answers = {r["id"]: r for r in read_jsonl(wd / "respond" / "responses.jsonl")}
        for i in range(run.state["shards"]):
            answers |= {r["id"]: r for r in
                        read_jsonl(_shard_dir(wd, i) / "respond" / "responses.jsonl")}
        missing = [r["id"] for r in kept if r["id"] not in answers]
        if missing:
            raise RuntimeError(f"{domain.name}: {len(missing)} kept instructions have no answer "
                               f"after the shards finished (first: {missing[0]})")
        write_jsonl(wd / "respond" / "responses.jsonl", [answers[r["id"]] for r in kept])
        write_json(wd / "respond" / "config.json",
                   {**cfg.respond.model_dump(mode="json"), "shards": run.state["shards"]})
        seconds = max((r["seconds"] for r in shard_results), default=0.0)  # wall: in parallel
        run.finish("respond", {"responses": len(kept), "shards": run.state["shards"],
                               "new": sum(r["new"] for r in shard_results)}, seconds)
    filter_answers(run, cfg)


def check_shared(domain_path: str, probe: Path) -> None:
    """Cheap proof that this node sees the driver's experts dir and seeds (shared filesystem)."""
    where = socket.gethostname()
    if not probe.is_file():
        raise ConfigError(f"node {where} does not see {probe.parent.parent}, the driver's "
                          "experts dir: every Ray node must mount it at the same path (NFS or "
                          "similar), or pass --experts-dir on such a shared volume")
    if not (Path(domain_path) / "seeds.yaml").is_file():
        raise ConfigError(f"node {where} does not see the seeds in {domain_path}: put the seeds "
                          "on a volume every Ray node mounts at the same path")


def workdir_of(cfg: SpecializeConfig, name: str) -> Path:
    return cfg.experts_dir / ".work" / name


def _shard_dir(workdir: Path, index: int) -> Path:
    return workdir / "shards" / f"{index:02d}"
