"""Expert − base on each expert's own domain, for commands that build throwaway registries
(`selfspec ablate --train-eval`): the same evaluation as `selfspec eval`, base and experts only.

Besides the paired comparison, each domain carries the per-item scores it compared, so that a
caller can pool several evaluations of the same items (`ablate --train-seeds` averages the
experts of several training runs item by item before comparing them with the base)."""

from __future__ import annotations

from pathlib import Path


def expert_gain(experts_dir: Path, domains: list[str], out: Path) -> dict[str, dict]:
    """-> {domain: {"diff", "ci", "p_not_better", "scores": {"ids", "base", "expert"}}}; the
    full eval report is written to `out`."""
    from evaluation.config import build_eval_config
    from evaluation.report import write_outputs
    from evaluation.run import evaluate

    cfg = build_eval_config(experts_dir=experts_dir, domains=domains,
                            targets=["base", "experts"], out=out)
    report, rows = evaluate(cfg)
    write_outputs(report, rows, out)
    return {d: {**{k: c[k] for k in ("diff", "ci", "p_not_better")},
                "scores": item_scores(rows, d)}
            for d, c in report["comparisons"]["expert_vs_base"].items()}


def item_scores(rows: list[dict], domain: str) -> dict[str, list]:
    """The headline scores of the base and of the domain's expert (named after the domain) on
    the domain's items, in item order: the pairs the comparison resampled."""
    from evaluation.backends import BASE

    base = {r["id"]: r["score"] for r in rows if r["target"] == BASE and r["domain"] == domain}
    expert = {r["id"]: r["score"] for r in rows if r["target"] == domain and r["domain"] == domain}
    ids = [i for i in base if i in expert]
    return {"ids": ids, "base": [base[i] for i in ids], "expert": [expert[i] for i in ids]}
