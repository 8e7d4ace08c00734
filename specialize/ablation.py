"""`selfspec ablate`: generation settings measured against each other on the same budget.

A setting is a named change to `GenerateConfig` (`SETTINGS`); names join with "+" ("passage+chat")
and apply on top of the paper's prompt (Self-MoE: whole-domain list completion at temperature
1.0), or on top of today's defaults when the name starts with "default". For every setting and
domain the base model writes instructions until the filter (whatever filters the pipeline runs)
has kept `num_instructions`, as `specialize --stop-after filter` would; all settings share one
vLLM engine. Per setting the report gives:

- keep rate: kept / judged candidates (candidates past the target are not judged);
- on-domain rate: the share whose nearest reference, by the router's encoder, is their own
  domain's rather than another domain's or everyday tasks (`on_domain_rate`, as the data card),
  over the kept instructions and over every candidate (what generation itself achieved: the
  filter drops off-domain candidates, so the kept rate is high by construction);
- fragment rate: the share that is not a complete question or imperative (`fragment_rate`);
- with `--train-eval`, the eval gain: each setting's data is answered, trained and published
  into its own registry, and the expert is scored against the base on its domain's eval. With
  several `--train-seeds` the answers are written once and trained once per seed, and the gain
  is the experts' per-item mean score over the seeds against the base (`pool_seeds`).

A setting that changes only stage 3 (`RESPOND_SETTINGS`, e.g. "default+sc4") copies the
instructions of the earlier setting with the same generation config instead of writing new ones,
so that the two are compared on the very same instructions: another draw would differ by chance.

Numbers from runs go to docs/quality.md, never here.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.engine import build_vllm_generator
from core.errors import ConfigError
from core.jsonl import read_jsonl, write_json
from core.precision import cpu_model
from core.seeds import Domain, load_domain
from core.stats import paired_diff
from specialize.ablation_config import (  # noqa: F401 - SETTINGS re-exported for callers
    SETTINGS,
    AblationConfig,
    build_ablation_config,
    resolve_setting,
    respond_changes,
)
from specialize.config import SpecializeConfig, build_config
from specialize.quality import (
    build_reference,
    load_default_encoder,
    seed_verbs,
    task_text,
    wellformed_verdict,
)


def setting_config(acfg: AblationConfig, name: str) -> SpecializeConfig:
    return build_config(base_model=acfg.base_model, experts_dir=acfg.out / name / "experts",
                        engine={"seed": acfg.seed}, filter=acfg.filter.model_dump(),
                        train={"seed": acfg.train_seeds[0]},
                        generate={**resolve_setting(name),
                                  "num_instructions": acfg.num_instructions},
                        respond=respond_changes(name))


def copy_instructions(src, dst) -> None:
    """Stages 1-2 of `src`'s work dir into `dst`'s (both `pipeline.DomainRun`), as if run."""
    for stage in ("generate", "filter"):
        shutil.copytree(src.workdir / stage, dst.workdir / stage)
        dst.finish(stage, src.state["done"][stage], 0.0)


# ---- the measures -----------------------------------------------------------------------------
# The data card's definitions (specialize/datacard.py), so an ablation's rates and an expert's
# card agree: on-domain = the domain's own reference set scores above every other domain's and
# the generic everyday tasks (quality.DomainReference); fragment = not a complete question or
# imperative (quality.wellformed_verdict, either reason).

def on_domain_rate(texts: Sequence[str], reference) -> float | None:
    """The share of `texts` whose nearest reference set is their own domain's."""
    if not texts:
        return None
    return round(sum(o > r for _, o, _, r in reference.nearest(list(texts))) / len(texts), 4)


def fragment_rate(instructions: Sequence[str], verbs: frozenset[str]) -> float | None:
    if not instructions:
        return None
    bad = sum(1 for t in instructions if wellformed_verdict(t, verbs).reason is not None)
    return round(bad / len(instructions), 4)


def measure(workdir: Path, domain: Domain, reference) -> dict:
    """The generation measures of one (setting, domain) work dir after the filter stage."""
    candidates = [r for r in read_jsonl(workdir / "generate" / "instructions.jsonl")
                  if not r.get("marker")]
    kept = read_jsonl(workdir / "filter" / "kept.jsonl")
    rejected = read_jsonl(workdir / "filter" / "rejected.jsonl")
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    judged = len(candidates) - reasons.get("surplus", 0)
    verbs = seed_verbs(domain)
    return {
        "candidates": len(candidates), "judged": judged, "kept": len(kept),
        "keep_rate": round(len(kept) / judged, 4) if judged else None,
        "on_domain_kept": on_domain_rate([_text(r) for r in kept], reference),
        "on_domain_candidates": on_domain_rate([_text(r) for r in candidates], reference),
        "fragment_kept": fragment_rate([r["instruction"] for r in kept], verbs),
        "fragment_candidates": fragment_rate([r["instruction"] for r in candidates], verbs),
        "rejected": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "examples_kept": [r["instruction"] for r in kept[:5]],
    }


def _text(row: dict) -> str:
    return task_text(row["instruction"], row.get("input", ""))


def _pooled(per_domain: dict[str, dict]) -> dict:
    """Rates over every domain's items together (each weighted by its item count)."""
    def pool(key: str, weight: str) -> float | None:
        rows = [(m[key], m[weight]) for m in per_domain.values() if m[key] is not None]
        n = sum(w for _, w in rows)
        return round(sum(v * w for v, w in rows) / n, 4) if n else None

    def ci(key: str, weight: str) -> list[float] | None:
        rows = [(m[key], m[weight]) for m in per_domain.values() if m[key] is not None]
        return wilson(round(sum(v * w for v, w in rows)), sum(w for _, w in rows))

    judged = sum(m["judged"] for m in per_domain.values())
    kept = sum(m["kept"] for m in per_domain.values())
    cis = {"keep_rate": wilson(kept, judged),
           **{k: ci(k, w) for k, w in (("on_domain_kept", "kept"),
                                       ("on_domain_candidates", "candidates"),
                                       ("fragment_kept", "kept"),
                                       ("fragment_candidates", "candidates"))}}
    gains = [m["eval_gain"]["diff"] for m in per_domain.values()
             if m.get("eval_gain", {}).get("diff") is not None]
    return {"candidates": sum(m["candidates"] for m in per_domain.values()), "kept": kept,
            "keep_rate": round(kept / judged, 4) if judged else None,
            "on_domain_kept": pool("on_domain_kept", "kept"),
            "on_domain_candidates": pool("on_domain_candidates", "candidates"),
            "fragment_kept": pool("fragment_kept", "kept"),
            "fragment_candidates": pool("fragment_candidates", "candidates"),
            "seconds": round(sum(m["seconds"] for m in per_domain.values()), 1),
            "eval_gain": round(float(np.mean(gains)), 4) if gains else None, "ci95": cis}


def pool_seeds(per_seed: dict[int, dict]) -> dict:
    """One domain's eval gain over several training seeds: {seed: eval_gain's entry, with its
    "scores"} -> the paired comparison of the experts' per-item mean score with the base, plus
    each seed's own comparison.

    Why pool: one run's paired bootstrap resamples the eval items only, so its interval and p
    leave out training variance; retraining on the same data with another seed moves an
    expert's eval score as much as a generation setting does (docs/quality.md, "Run-to-run
    spread"). Averaging each item's score over the seeds before comparing puts that variance
    into the numbers, and the per-seed rows show how far the runs disagree."""
    seeds = list(per_seed)
    entry: dict = {"train_seeds": seeds,
                   "per_seed": [{"seed": s, **{k: per_seed[s].get(k)
                                               for k in ("diff", "ci", "p_not_better")}}
                                for s in seeds]}
    scores = [per_seed[s].get("scores") for s in seeds]
    if any(sc is None or not sc["ids"] for sc in scores):
        missing = [s for s, sc in zip(seeds, scores) if sc is None or not sc["ids"]]
        return {"diff": None, "ci": [None, None], "p_not_better": None, **entry,
                "note": f"no per-item scores from training seed(s) {missing}: not pooled"}
    ids = scores[0]["ids"]
    if any(sc["ids"] != ids for sc in scores):
        raise ValueError(f"the evals of training seeds {seeds} scored different items: the "
                         "eval items changed between them")
    expert = np.mean([sc["expert"] for sc in scores], axis=0)
    same_base = all(sc["base"] == scores[0]["base"] for sc in scores)
    # The base is one model, scored again in every seed's eval: greedy decoding gives the same
    # scores unless the engine's batching changed a near tie. Then it is averaged as well.
    base = scores[0]["base"] if same_base else np.mean([sc["base"] for sc in scores], axis=0)
    return {**paired_diff(expert, base), **entry, "base_averaged": not same_base}


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval of k successes in n (95%): sound near 0% and 100%, where the
    rates that matter here (fragments, off-domain) live."""
    if n == 0:
        return None
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(max(0.0, mid - half)), 4), round(float(min(1.0, mid + half)), 4)]


# ---- the run ----------------------------------------------------------------------------------

def run_ablation(acfg: AblationConfig, make_generator=build_vllm_generator, encoder=None,
                 eval_gain: Callable[[Path, list[str], Path], dict] | None = None) -> dict:
    """Every setting on every domain; returns the report (also written to `out/report.json`).
    `eval_gain(experts_dir, domains, out) -> {domain: {diff, ci, p_not_better, scores}}` scores
    the published experts against the base (the CLI passes evaluation's; required with
    train_eval); "scores" ({ids, base, expert}: per-item) is needed to pool several train_seeds."""
    from core.base_model import resolve_base_model
    from specialize.pipeline import prepare_run, specialize, write_instructions

    if acfg.train_eval and eval_gain is None:
        raise ConfigError("--train-eval needs an evaluator: run it from `selfspec ablate`")
    domains = [load_domain(d) for d in acfg.domains]
    configs = {name: setting_config(acfg, name) for name in acfg.settings}
    base_path = resolve_base_model(acfg.base_model)
    encoder = encoder or load_default_encoder()
    references = {d.name: build_reference(d, encoder) for d in domains}

    report = {"created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
              "cpu": cpu_model(), "base_model": acfg.base_model,
              "budget": {"num_instructions": acfg.num_instructions, "domains": acfg.domains,
                         "stage": "train+eval" if acfg.train_eval else "filter",
                         **({"train_seeds": acfg.train_seeds} if acfg.train_eval else {})},
              "config": acfg.model_dump(mode="json"), "settings": {}}
    generator = make_generator(base_path, configs[acfg.settings[0]].engine)
    written: dict[tuple[str, str], tuple[str, object]] = {}  # (generate config, domain) -> run
    try:
        for name, cfg in configs.items():
            per_domain = {}
            same = json.dumps(cfg.generate.model_dump(mode="json"), sort_keys=True)
            for d in domains:
                t = time.time()
                run = prepare_run(d, cfg.experts_dir / ".work" / d.name, cfg, resume=False,
                                  restart=True)
                source = written.get((same, d.name))
                if source:
                    copy_instructions(source[1], run)
                else:
                    write_instructions(run, cfg, generator)
                    written[(same, d.name)] = (name, run)
                per_domain[d.name] = {**measure(run.workdir, d, references[d.name]),
                                      "seconds": round(time.time() - t, 1),
                                      "instructions_of": source[0] if source else name}
            report["settings"][name] = {"changes": resolve_setting(name),
                                        "respond_changes": respond_changes(name),
                                        "generate": cfg.generate.model_dump(mode="json"),
                                        "filter": cfg.filter.model_dump(mode="json"),
                                        "domains": per_domain}
            write_json(acfg.out / "report.json", report)  # a partial report survives a crash
    finally:
        generator.close()

    if acfg.train_eval:
        for name, cfg in configs.items():
            gains = train_and_score(acfg, name, cfg, [d.name for d in domains], specialize,
                                    eval_gain)
            for d in domains:
                report["settings"][name]["domains"][d.name]["eval_gain"] = gains[d.name]
            write_json(acfg.out / "report.json", report)
    for entry in report["settings"].values():
        entry["total"] = _pooled(entry["domains"])
    write_json(acfg.out / "report.json", report)
    return report


def train_and_score(acfg: AblationConfig, name: str, cfg: SpecializeConfig, domains: list[str],
                    specialize, eval_gain) -> dict[str, dict]:
    """One setting's experts trained and scored: {domain name: its report entry's eval_gain}. Its
    work dirs hold finished generate+filter stages, so `resume` answers and trains from there."""
    seeds = acfg.train_seeds
    if len(seeds) == 1:  # cfg already has train.seed = seeds[0]
        specialize(acfg.domains, cfg, resume=True)
        gains = eval_gain(cfg.experts_dir, domains, acfg.out / name / "eval")
        return {d: {**{k: v for k, v in gains.get(d, {}).items() if k != "scores"},
                    "train_seeds": seeds} for d in domains}
    # The answers do not depend on the training seed (greedy, or sampled with the engine's
    # seed): written once and copied, so that the seeds' experts differ only in training.
    specialize(acfg.domains, cfg, resume=True, stop_after="filter_responses")
    per_seed = {}
    for s in seeds:
        cfg_s = cfg.model_copy(update={"experts_dir": acfg.out / name / f"seed{s}" / "experts",
                                       "train": cfg.train.model_copy(update={"seed": s})})
        for d in domains:
            dst = cfg_s.experts_dir / ".work" / d
            shutil.rmtree(dst, ignore_errors=True)  # an earlier ablation's: this one restarts
            shutil.copytree(cfg.experts_dir / ".work" / d, dst)
        specialize(acfg.domains, cfg_s, resume=True)
        per_seed[s] = eval_gain(cfg_s.experts_dir, domains, acfg.out / name / f"eval-seed{s}")
    return {d: pool_seeds({s: g.get(d, {}) for s, g in per_seed.items()}) for d in domains}


def format_report(report: dict) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    head = (f"{'setting':<18} {'domain':<12} {'cands':>5} {'kept':>4} {'keep':>5} "
            f"{'on-dom kept':>11} {'on-dom all':>10} {'frag kept':>9} {'frag all':>8} "
            f"{'secs':>6} {'eval gain':>9}")
    seeds = report["budget"].get("train_seeds", [])
    pooled = (f", eval gain pooled over {len(seeds)} training seeds ({','.join(map(str, seeds))})"
              if len(seeds) > 1 else "")
    lines = [f"{report['base_model']} on {report['cpu']}, "
             f"{report['budget']['num_instructions']} kept instructions per domain{pooled}", head,
             "-" * len(head)]
    for name, entry in report["settings"].items():
        rows = [*entry["domains"].items(), ("all", entry["total"])]
        for dom, m in rows:
            gain = m.get("eval_gain")
            gain = gain.get("diff") if isinstance(gain, dict) else gain
            lines.append(f"{name:<18} {dom:<12} {m['candidates']:>5} {m['kept']:>4} "
                         f"{pct(m['keep_rate']):>5} {pct(m['on_domain_kept']):>11} "
                         f"{pct(m['on_domain_candidates']):>10} {pct(m['fragment_kept']):>9} "
                         f"{pct(m['fragment_candidates']):>8} {m['seconds']:>6.0f} "
                         f"{'-' if gain is None else f'{gain:+.3f}':>9}")
    return "\n".join(lines)
