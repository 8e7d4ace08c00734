"""`selfspec specialize`: seeds -> generated data -> filters -> LoRA -> validated -> published.

All domains of a run share one vLLM engine (start-up costs ~35 s on CPU), so the run goes in
phases: generate + filter (+ user-style router queries) + respond + filter for every domain, free
the engine, train + validate every domain, (round 2: regenerate responses with each round-1
expert through vLLM LoRA, retrain), then publish each expert atomically. Each domain's work dir
`<experts>/.work/<domain>/` records finished stages in `state.json`; `--resume` skips them and
continues the append-only files of the stage that was interrupted. A successful publish removes
the work dir.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from core.base_model import resolve_base_model
from core.engine import Adapter, Generator, build_vllm_generator
from core.errors import ConfigError
from core.jsonl import write_json
from core.lora import validate_adapter
from core.registry import ExpertEntry, GainInfo, load_registry
from core.seeds import Domain, load_domain
from specialize.config import STAGES, SpecializeConfig
from specialize.datacard import build_data_card, write_data_card
from specialize.filter import build_filter, filter_instructions
from specialize.filter_responses import filter_responses
from specialize.gain import VALIDATION_FILE, load_validation
from specialize.generate import generate_instructions
from specialize.publish import PublishRequest, ensure_writable, publish_expert
from specialize.queries import generate_queries, kept_queries
from specialize.respond import generate_responses
from specialize.retrieve import build_retriever
from specialize.train import train_adapter
from specialize.train_workers import train_adapter_on_workers

log = logging.getLogger(__name__)


@dataclass
class DomainRun:
    domain: Domain
    workdir: Path
    state: dict = field(default_factory=lambda: {"done": {}, "seconds": {}})

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def finish(self, stage: str, result: dict, seconds: float) -> None:
        self.state["done"][stage] = result
        self.state["seconds"][stage] = round(seconds, 1)
        write_json(self.workdir / "state.json", self.state)


# What each stage records in state.json when it is done (`--stop-after` names the stage).
_DONE_KEY = {"generate": "generate", "filter": "filter", "respond": "respond",
             "filter_responses": "respond_filter", "train": "validate_train"}


def specialize(domains: list[str], cfg: SpecializeConfig, resume: bool = False,
               restart: bool = False, make_generator=build_vllm_generator,
               stop_after: str | None = None, make_encoder=None) -> list[dict]:
    """Run every stage and publish; with `stop_after`, stop after that stage instead, keep the
    work dirs for `--resume`, write each one's data card there and return where it is.
    `make_encoder()`: the sentence encoder `--retrieval dense` embeds passages with, built at
    most once, when a respond stage first needs it (the caller owns the choice of encoder)."""
    # --- everything that can fail fast does, before a model is loaded -------------------------
    if stop_after is not None and stop_after not in STAGES:
        raise ConfigError(f"--stop-after {stop_after!r} is no stage; use one of "
                          f"{', '.join(STAGES)}")
    loaded = [load_domain(d) for d in domains]
    if len({d.name for d in loaded}) != len(loaded):
        raise ConfigError(f"a domain is named twice: {domains}")
    experts_dir = cfg.experts_dir
    ensure_writable(experts_dir)
    corpus = cfg.respond.corpus
    if cfg.respond.retrieval != "none" and corpus and not any(Path(corpus).glob("*.md")):
        raise ConfigError(f"--corpus {corpus} is not a folder of Markdown (.md) passages")
    check_encoder(cfg, make_encoder)
    make_encoder = functools.cache(make_encoder) if make_encoder is not None else None
    # The validation splits the new experts are scored on (a bad file fails now, not after
    # training); a domain without one publishes with no measured gain.
    validation = {d.name: load_validation(d, cfg.gain) for d in loaded}
    for d in [d for d in loaded if cfg.gain.enabled and not validation[d.name]]:
        log.warning("%s: no scorable items in %s: its gain over the base model is not measured",
                    d.name, d.root / VALIDATION_FILE)
    base_path = resolve_base_model(cfg.base_model)
    # Work dirs only now: a run that failed a check above leaves nothing to --resume.
    runs = [prepare_run(d, experts_dir / ".work" / d.name, cfg, resume, restart) for d in loaded]

    # --- phase 1: the base model writes instructions and answers them -------------------------
    last = stop_after if stop_after in ("generate", "filter", "respond") else "filter_responses"
    need = [r for r in runs if not r.done(_DONE_KEY[last])]
    if need:
        generator = make_generator(base_path, cfg.engine)
        try:
            for run in need:
                _generate_data(run, cfg, generator, last, make_encoder)
        finally:
            generator.close()
    if stop_after == last:
        return _preview(runs, cfg, stop_after)

    # --- phase 2: train and validate round-1 adapters ----------------------------------------
    for run in runs:
        _train(run, cfg, base_path, "respond_filter", "train",
               validation[run.domain.name] if cfg.rounds == 1 else None)
    if stop_after == "train":
        return _preview(runs, cfg, stop_after)

    # --- phase 3 (optional): round 2 regenerates answers with each round-1 expert ------------
    if cfg.rounds == 2:
        need = [r for r in runs if not r.done("respond2_filter")]
        if need:
            generator = make_generator(base_path, cfg.engine, cfg.validate_.max_lora_rank)
            try:
                for i, run in enumerate(need, 1):
                    _respond_round2(run, cfg, generator, i, make_encoder)
            finally:
                generator.close()
        for run in runs:
            _train(run, cfg, base_path, "respond2_filter", "train2", validation[run.domain.name])

    # --- phase 4: publish --------------------------------------------------------------------
    results = []
    for run in runs:
        final = "train2" if cfg.rounds == 2 else "train"
        # The publish id goes in state.json before publishing and, inside summary.json, into
        # the published version: a run killed after the registry named the version but before
        # the work dir was removed (or a Ray task retried) finds it on --resume, instead of
        # publishing the same adapter again as a new version.
        publish_id = run.state.setdefault("publish_id", uuid.uuid4().hex)
        write_json(run.workdir / "state.json", run.state)
        summary = {**_summary(run, final), "publish_id": publish_id}
        started = time.time()
        entry = already_published(experts_dir, run.domain.name, publish_id)
        if entry is not None:
            log.warning("%s: published as v%d by an earlier run that stopped before cleaning up;"
                        " not publishing it again", run.domain.name, entry.version)
        else:
            write_json(run.workdir / "summary.json", summary)
            write_data_card(_data_card(run, cfg), run.workdir)  # publish copies it along
            entry = publish_expert(PublishRequest(
                domain=run.domain, experts_dir=experts_dir, workdir=run.workdir,
                train_dir=run.workdir / final,
                train_file=run.workdir / ("respond2_filter" if cfg.rounds == 2
                                          else "respond_filter") / "train.jsonl",
                lora=run.state["done"][f"validate_{final}"],
                train_summary=run.state["done"][final], base_model=cfg.base_model,
                base_model_path=base_path,
                resolved_config=cfg.model_dump(mode="json", by_alias=True), rounds=cfg.rounds,
                n_exemplars=cfg.router_exemplars, seed=cfg.engine.seed,
                queries=tuple(kept_queries(run.workdir, cfg.router_queries))))
        run.finish("published", {"version": entry.version}, time.time() - started)
        summary["seconds"]["publish"] = round(time.time() - started, 1)
        summary["version"] = entry.version
        summary["path"] = str(experts_dir / entry.path)
        shutil.rmtree(run.workdir, ignore_errors=True)
        results.append(summary)
    return results


def _data_card(run: DomainRun, cfg: SpecializeConfig, stopped_after: str | None = None) -> dict:
    """The run's data card; without the encoder (a broken install) it lacks the on-domain rate
    rather than failing a finished run."""
    from specialize.quality import load_default_encoder

    try:
        encoder = load_default_encoder()
    except Exception as e:  # noqa: BLE001 - the card is a report: it must not undo the run
        log.warning("data card without the on-domain rate: encoder not loaded (%s)", e)
        encoder = None
    return build_data_card(run.domain, run.workdir, encoder, cfg.engine.seed, stopped_after)


def _preview(runs: list[DomainRun], cfg: SpecializeConfig, stage: str) -> list[dict]:
    """`--stop-after`: the work dirs stay for `--resume`; each gets its data card."""
    out = []
    for run in runs:
        card = _data_card(run, cfg, stage)
        path = write_data_card(card, run.workdir)
        out.append({"domain": run.domain.name, "stopped_after": stage,
                    "workdir": str(run.workdir), "data_card": str(path),
                    "on_domain_rate": card["on_domain_rate"],
                    "fragment_rate": card["fragment_rate"], "stages": card["stages"]})
    return out


def already_published(experts_dir: Path, name: str, publish_id: str) -> ExpertEntry | None:
    """The registry's current version of `name` if this run published it (its summary.json
    carries the run's publish id), else None."""
    entry = load_registry(experts_dir).experts.get(name)
    if entry is None:
        return None
    try:
        summary = json.loads((experts_dir / entry.path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(summary, dict) and summary.get("publish_id") == publish_id \
        else None


def prepare_run(domain: Domain, workdir: Path, cfg: SpecializeConfig, resume: bool,
                restart: bool) -> DomainRun:
    run = DomainRun(domain, workdir)
    state_path = workdir / "state.json"
    if workdir.exists() and restart:
        shutil.rmtree(workdir)
    elif workdir.exists() and not resume:
        raise ConfigError(f"an interrupted run of {domain.name!r} is in {workdir}: pass --resume "
                          "to continue it, or --restart to discard it and start over")
    if resume and state_path.exists():
        run.state = json.loads(state_path.read_text())
        if run.state.get("base_model") != cfg.base_model:
            raise ConfigError(f"--resume: {workdir} was started with base model "
                              f"{run.state.get('base_model')!r}, not {cfg.base_model!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    run.state.setdefault("base_model", cfg.base_model)
    write_json(workdir / "config.json", cfg.model_dump(mode="json", by_alias=True))
    write_json(state_path, run.state)
    return run


def _generate_data(run: DomainRun, cfg: SpecializeConfig, generator: Generator,
                   last: str = "filter_responses", make_encoder=None) -> None:
    write_instructions(run, cfg, generator, through=last)
    if last in ("generate", "filter"):
        return
    write_queries(run, cfg, generator)
    if not run.done("respond"):
        t = time.time()
        res = generate_responses(run.domain, cfg.respond, generator, run.workdir,
                                 retriever_for(run.domain, cfg, make_encoder))
        run.finish("respond", res, time.time() - t)
    if last != "respond":
        filter_answers(run, cfg)


def write_instructions(run: DomainRun, cfg: SpecializeConfig,
                       generator: Generator | None, through: str = "filter") -> None:
    """Stages 1-2: generate, then filter (unless `through` is "generate"). `generator` may be
    None only when both are done or the filter's perplexity check is off."""
    d, wd = run.domain, run.workdir
    if not run.done("generate"):
        t = time.time()
        res = generate_instructions(d, cfg.generate, build_filter(d, cfg.filter, generator),
                                    generator, wd, cfg.engine.seed)
        run.finish("generate", res, time.time() - t)
    if through == "generate":
        return
    if not run.done("filter"):
        t = time.time()
        res = filter_instructions(d, cfg.filter, cfg.generate.num_instructions, wd, generator)
        if res["kept"] == 0:
            raise ConfigError(f"{d.name}: the base model wrote no usable instruction in "
                              f"{res['candidates']} candidates; see {wd}/filter/rejected.jsonl")
        run.finish("filter", res, time.time() - t)


def write_queries(run: DomainRun, cfg: SpecializeConfig, generator: Generator | None) -> None:
    """Stage 2b: user-style routing queries for the router's exemplars (off when
    `router_queries` is 0). `generator` may be None only when the stage is done or off."""
    if cfg.router_queries and not run.done("queries"):
        t = time.time()
        res = generate_queries(run.domain, cfg.queries, generator, run.workdir, cfg.engine.seed)
        run.finish("queries", res, time.time() - t)


def filter_answers(run: DomainRun, cfg: SpecializeConfig) -> None:
    """Stage 4 over the respond stage's answers."""
    if not run.done("respond_filter"):
        t = time.time()
        res = filter_responses(cfg.responses, run.workdir, "respond")
        if res["kept"] == 0:
            raise ConfigError(f"{run.domain.name}: every generated response was rejected; see "
                              f"{run.workdir}/respond_filter/rejected.jsonl")
        run.finish("respond_filter", res, time.time() - t)


def check_encoder(cfg: SpecializeConfig, make_encoder) -> None:
    """Dense retrieval without an encoder fails now, not after the instructions are written."""
    if cfg.respond.retrieval == "dense" and make_encoder is None:
        raise ConfigError("--retrieval dense needs a sentence encoder, and none was passed: "
                          "the caller builds it (the selfspec CLI passes the router's "
                          "embedded one)")


def retriever_for(domain: Domain, cfg: SpecializeConfig, make_encoder=None):
    corpus = cfg.respond.corpus or domain.corpus_dir
    if cfg.respond.retrieval == "none" or corpus is None:
        return None
    encoder = make_encoder() if cfg.respond.retrieval == "dense" and make_encoder else None
    return build_retriever(Path(corpus), cfg.respond.retrieval, cfg.respond.passage_words,
                           encoder)


def _train(run: DomainRun, cfg: SpecializeConfig, base_path: Path, data_stage: str,
           stage: str, gain_items: list | None = None) -> None:
    """gain_items: the validation split, for the adapter that will be published."""
    if not run.done(stage):
        t = time.time()
        train = train_adapter if cfg.train.workers == 1 else train_adapter_on_workers
        res = train(base_path, cfg.train, run.workdir / data_stage / "train.jsonl",
                    run.workdir / stage, gain_items, cfg.gain)
        run.finish(stage, res, time.time() - t)
    if not run.done(f"validate_{stage}"):
        t = time.time()
        res = validate_adapter(run.workdir / stage / "adapter", base_path,
                               cfg.validate_.max_lora_rank)
        run.finish(f"validate_{stage}", res, time.time() - t)


def _respond_round2(run: DomainRun, cfg: SpecializeConfig, generator: Generator,
                    int_id: int, make_encoder=None) -> None:
    adapter = Adapter(f"{run.domain.name}-round1", int_id, run.workdir / "train" / "adapter")
    if not run.done("respond2"):
        t = time.time()
        res = generate_responses(run.domain, cfg.respond, generator, run.workdir,
                                 retriever_for(run.domain, cfg, make_encoder), adapter=adapter,
                                 stage="respond2")
        run.finish("respond2", res, time.time() - t)
    if not run.done("respond2_filter"):
        t = time.time()
        res = filter_responses(cfg.responses, run.workdir, "respond2")
        run.finish("respond2_filter", res, time.time() - t)


def _summary(run: DomainRun, final: str) -> dict:
    done = run.state["done"]
    return {"domain": run.domain.name,
            "candidates": done["filter"]["candidates"],
            "kept_instructions": done["filter"]["kept"],
            "rejected_instructions": done["filter"]["rejected"],
            "train_examples": done[final]["examples"],
            "rejected_responses": done["respond_filter"]["rejected"],
            "loss_first": done[final]["loss_first"], "loss_last": done[final]["loss_last"],
            "gain": done[final].get("gain"), "gain_seconds": done[final].get("gain_seconds"),
            "seconds": dict(run.state["seconds"])}


def format_summary(results: list[dict]) -> str:
    """The table printed at the end of a run: what was generated, kept, rejected and why."""
    lines = []
    head = (f"{'expert':<12} {'ver':>3} {'generated':>9} {'kept':>5} {'train':>5} "
            f"{'loss first→last':>16}  rejected (by reason)")
    lines += [head, "-" * len(head)]
    for r in results:
        rej = {**{f"instr:{k}": v for k, v in r["rejected_instructions"].items()},
               **{f"resp:{k}": v for k, v in r["rejected_responses"].items()}}
        rej_s = ", ".join(f"{k}={v}" for k, v in sorted(rej.items(), key=lambda kv: -kv[1]))
        lines.append(f"{r['domain']:<12} {r.get('version', '-'):>3} {r['candidates']:>9} "
                     f"{r['kept_instructions']:>5} {r['train_examples']:>5} "
                     f"{r['loss_first']:>7.3f}→{r['loss_last']:<7.3f}  {rej_s or '-'}")
    gains = [(r["domain"], r.get("gain")) for r in results]
    if any(g for _, g in gains):  # what `router.require_gain` will decide on
        lines += ["", "expert - base on the validation split (auto routes only to gains > 0):"]
        lines += [f"  {d:<12} " + (GainInfo(**g).describe() if g else "not measured")
                  for d, g in gains]
    lines += ["", "wall time per stage (s):"]
    for r in results:
        lines.append(f"  {r['domain']:<12} " + "  ".join(f"{k}={v}" for k, v in
                                                       r["seconds"].items()))
    return "\n".join(lines)
