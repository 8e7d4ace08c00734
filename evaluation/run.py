"""`evaluate(cfg)`: validate -> open a backend -> route (auto) -> one batch of requests -> per-item
scores -> metrics with bootstrap intervals. The report's layout is documented in report.py.

Targets form a matrix: the base model and every expert on every domain, so an expert's score off
its own domain shows what it forgot. `auto` is the routed system: each item's user turn is routed
as the server routes a chat request, and the item is scored with the chosen expert (the base
model when the router says none). Those scores are the matrix cells of the chosen target, because
greedy decoding of the same tokens with the same adapter is what the server would run.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.engine import EngineConfig
from core.errors import ConfigError
from core.eval_formats import (
    FORMATS,
    MAX_TOKENS,
    ItemScore,
    letter_text,
    score_generation,
    score_multiple_choice,
    user_text,
)
from core.seeds import EvalItem, available_domains, load_domain
from evaluation.backends import BASE, Request, Served
from evaluation.config import TARGET_GROUPS, EvalConfig
from evaluation.report import build_report

log = logging.getLogger(__name__)

AUTO, MIXED = "auto", "mixed"


@dataclass
class EvalPlan:
    cfg: EvalConfig
    domains: dict[str, list[EvalItem]]
    served: Served
    matrix: list[str]  # "base" and expert names, scored on every item
    auto: bool
    direct: tuple | None = None  # (engine plan, registry) for the direct backend
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return self.matrix + ([AUTO] if self.auto else [])


def limit_items(items: list[EvalItem], n: int | None) -> list[EvalItem]:
    """The first n items, taken round-robin over the item types (file order within a type), so
    a quick --limit run still sees every format."""
    if n is None or n >= len(items):
        return items
    by_type: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        by_type[it.type].append(it)
    queues = [by_type[t] for t in FORMATS if by_type[t]]
    picked: list[EvalItem] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked, key=items.index)


def _load_domains(cfg: EvalConfig) -> dict[str, list[EvalItem]]:
    names = cfg.domains or [d for d in available_domains()
                            if load_domain(d).eval_path.is_file()]
    if not names:
        raise ConfigError("no domain has an eval.jsonl: add seeds/<domain>/eval.jsonl")
    out = {}
    for name in names:
        domain = load_domain(name)  # unknown domain: UnknownDomainError listing the known ones
        if not domain.eval_items:
            raise ConfigError(f"domain {domain.name!r} has no eval items ({domain.eval_path}): "
                              "write some (see seeds/README.md) or leave it out of --domains")
        out[domain.name] = limit_items(domain.eval_items, cfg.limit)
    return out


def prepare(cfg: EvalConfig) -> EvalPlan:
    """Everything that can be wrong with the arguments, found before any model is loaded."""
    from evaluation.backends import plan_direct, probe_endpoint

    t0 = time.perf_counter()
    domains = _load_domains(cfg)
    groups = [t for t in cfg.targets if t in TARGET_GROUPS]
    named = [t for t in cfg.targets if t not in TARGET_GROUPS]
    want_experts = bool(named) or "experts" in groups or AUTO in groups
    direct = None
    if cfg.endpoint:
        served = probe_endpoint(cfg.endpoint, cfg.api_key)
        where = f"the endpoint {cfg.endpoint}"
    else:
        if want_experts and not (cfg.experts_dir / "registry.json").is_file():
            raise ConfigError(f"no expert registry at {cfg.experts_dir / 'registry.json'}: run "
                              "`selfspec specialize --all` first, pass --experts-dir, or "
                              "evaluate only --targets base")
        served, engine_plan, registry = plan_direct(cfg.experts_dir, want_experts)
        direct = (engine_plan, registry)
        where = f"the registry in {cfg.experts_dir}"
    for name in named:
        if name not in served.experts:
            why = served.skipped.get(name)
            raise ConfigError(
                f"expert {name!r} cannot be evaluated: {why}" if why else
                f"unknown target {name!r}: use base, experts, auto or an expert of {where} "
                f"({', '.join(served.experts) or 'none'})")
    if want_experts and not served.experts:
        skipped = "; ".join(f"{n}: {w}" for n, w in served.skipped.items())
        raise ConfigError(f"{where} has no servable experts{f' ({skipped})' if skipped else ''}:"
                          " run `selfspec specialize --all` first, or evaluate --targets base")
    matrix = ([BASE] if BASE in groups else []) + \
        (list(served.experts) if "experts" in groups else named)
    plan = EvalPlan(cfg, domains, served, list(dict.fromkeys(matrix)), AUTO in groups, direct)
    plan.timing["prepare_s"] = round(time.perf_counter() - t0, 2)
    return plan


def open_backend(plan: EvalPlan):
    from evaluation.backends import DirectBackend, HttpBackend

    cfg = plan.cfg
    if cfg.endpoint:
        return HttpBackend(plan.served, cfg.api_key, _tokenizer_path(plan), cfg.concurrency)
    engine_plan, registry = plan.direct
    return DirectBackend(cfg.experts_dir, plan.served, engine_plan, registry,
                         EngineConfig(max_model_len=cfg.max_model_len,
                                      kv_cache_gib=cfg.kv_cache_gib, dtype=cfg.dtype),
                         need_router=plan.auto)


def _tokenizer_path(plan: EvalPlan) -> str:
    """HTTP: the prompts are tokenized here; the server's base model folder when it is local."""
    if plan.cfg.tokenizer:
        return plan.cfg.tokenizer
    path = plan.served.base_model.get("path")
    if path and (Path(path) / "tokenizer_config.json").is_file():
        return path
    raise ConfigError(f"the server's base model folder {path!r} is not on this machine: pass "
                      "--tokenizer with a local copy of the base model (or its tokenizer)")


# ---------------------------------------------------------------- scoring
def _requests(backend, item: EvalItem, target: str) -> tuple[list[Request], int]:
    """The item's requests for one target, and the length of their shared context. Multiple
    choice: one per option (cloze), then the generative request with the options listed."""
    ctx = backend.tokens.chat(user_text(item))
    if item.type == "multiple_choice":
        cloze = [Request(target, ctx + backend.tokens.text(opt), 1, True)
                 for opt in item.options or []]
        letter = Request(target, backend.tokens.chat(letter_text(item)), MAX_TOKENS["generative"])
        return [*cloze, letter], len(ctx)
    return [Request(target, ctx, MAX_TOKENS[item.type])], len(ctx)


def _score(item: EvalItem, n_ctx: int, results) -> tuple[ItemScore, dict]:
    if item.type == "multiple_choice":
        # An option's log-likelihood: the sum over its own tokens, after the shared context.
        *cloze, letter = results
        logliks = [round(sum(r.prompt_logprobs[n_ctx:]), 6) for r in cloze]
        return (score_multiple_choice(item, logliks, letter.text),
                {"logliks": logliks, "generative_reply": letter.text})
    return score_generation(item, results[0].text), {"reply": results[0].text}


def _auto_score(main: tuple[ItemScore, dict], letter: tuple[ItemScore, dict]) -> tuple:
    """auto on a multiple-choice item: the cloze part from the target its cloze turn was routed
    to, the generative part from the target its options-listed turn was routed to."""
    (s, extra), (g, g_extra) = main, letter
    if s is g:
        return main
    s = replace(s, generative=g.generative, generative_pred=g.generative_pred,
                generative_valid=g.generative_valid)
    return s, {**extra, "generative_reply": g_extra.get("generative_reply")}


def evaluate(cfg: EvalConfig, backend_factory=open_backend, progress=None) -> tuple[dict, list]:
    """-> (report, per-item rows). `backend_factory(plan)` is injectable (unit tests)."""
    from tqdm.auto import tqdm

    plan = prepare(cfg)
    items = [(d, it) for d, its in plan.domains.items() for it in its]
    t0 = time.perf_counter()
    backend = backend_factory(plan)
    plan.timing["backend_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        # The engine can still refuse an adapter that passed the file checks (corrupt weights):
        # it is left out, as the server leaves it out; one named on purpose is an error.
        lost = [t for t in plan.matrix if t != BASE and t not in plan.served.experts]
        named = [t for t in lost if t in cfg.targets]
        if named or (lost and not plan.served.experts):
            raise ConfigError(f"expert {(named or lost)[0]!r} cannot be evaluated: "
                              f"{plan.served.skipped.get((named or lost)[0], 'not loaded')}")
        plan.matrix = [t for t in plan.matrix if t not in lost]
        t0 = time.perf_counter()
        routed: list[str | None] = []
        mc = [i for i, (_, it) in enumerate(items) if it.type == "multiple_choice"]
        if plan.auto:
            # The generative multiple-choice turn lists the options: the server routes that
            # text, which may pick another expert than the question alone.
            routed = backend.route([user_text(it) for _, it in items]
                                   + [letter_text(items[i][1]) for i in mc])
        plan.timing["route_s"] = round(time.perf_counter() - t0, 2)
        routed_to = [r or BASE for r in routed[:len(items)]]
        routed_letter = dict(zip(mc, [r or BASE for r in routed[len(items):]]))
        # Every (target, item) cell needed: the matrix, plus the routed target's cells that the
        # matrix lacks (an `auto`-only run scores just the chosen expert per item).
        cells = {(t, i) for t in plan.matrix for i in range(len(items))}
        cells |= {(t, i) for i, t in enumerate(routed_to)}
        cells |= {(t, i) for i, t in routed_letter.items()}
        order = sorted(cells, key=lambda c: (items[c[1]][1].type != "multiple_choice", c))
        reqs = {c: _requests(backend, items[c[1]][1], c[0]) for c in order}
        flat = [r for c in order for r in reqs[c][0]]
        t0 = time.perf_counter()
        bar = progress or tqdm(total=len(flat), desc="eval", unit="req", dynamic_ncols=True)
        results = backend.complete(flat, bar.update)
        bar.close()
        plan.timing["score_s"] = round(time.perf_counter() - t0, 2)
    finally:
        backend.close()
    scored: dict[tuple[str, int], tuple[ItemScore, dict]] = {}
    at = 0
    for c in order:
        n = len(reqs[c][0])
        scored[c] = _score(items[c[1]][1], reqs[c][1], results[at:at + n])
        at += n
    per_target = {t: [scored[(t, i)] for i in range(len(items))] for t in plan.matrix}
    if plan.auto:
        per_target[AUTO] = [_auto_score(scored[(t, i)], scored[(routed_letter.get(i, t), i)])
                            for i, t in enumerate(routed_to)]
    rows = []
    for t, cells_t in per_target.items():
        for i, (s, extra) in enumerate(cells_t):
            domain, it = items[i]
            row = {"target": t, "domain": domain, "id": it.id, "type": it.type, **s.to_json(),
                   **extra}
            if t == AUTO:
                row["routed_to"] = routed_to[i]
                if i in routed_letter:
                    row["generative_routed_to"] = routed_letter[i]
            rows.append(row)
    report = build_report(plan, items, {t: [s for s, _ in v] for t, v in per_target.items()},
                          routed_to)
    return report, rows

