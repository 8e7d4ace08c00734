"""Expert − base on each expert's own domain, for commands that build throwaway registries
(`selfspec ablate --train-eval`): the same evaluation as `selfspec eval`, base and experts only."""

from __future__ import annotations

from pathlib import Path


def expert_gain(experts_dir: Path, domains: list[str], out: Path) -> dict[str, dict]:
    """-> {domain: {"diff", "ci", "p_not_better"}}; the full eval report is written to `out`."""
    from evaluation.config import build_eval_config
    from evaluation.report import write_outputs
    from evaluation.run import evaluate

    cfg = build_eval_config(experts_dir=experts_dir, domains=domains,
                            targets=["base", "experts"], out=out)
    report, rows = evaluate(cfg)
    write_outputs(report, rows, out)
    return {d: {k: c[k] for k in ("diff", "ci", "p_not_better")}
            for d, c in report["comparisons"]["expert_vs_base"].items()}
