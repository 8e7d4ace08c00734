"""Regenerate the README's "Results" section from the last `selfspec eval` and `selfspec bench`
outputs, so that no number in it is typed by hand:

    python -m bench.results [--reports reports] [--readme README.md] [--assets docs/results]

It reads reports/eval.json, reports/bench_serving.json and reports/bench_router.json (whichever
exist), copies their plots into --assets (reports/ is not in git, the README's images must be),
and replaces everything between the two `results` markers in the README. A report that is
missing is named as missing, never filled in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(c: dict) -> str:
    lo, hi = c["ci"]
    return f"{c['mean']:.3f} [{lo:.2f}, {hi:.2f}]"


def _comparisons(comp: dict) -> list[str]:
    out = ["", "| comparison (paired bootstrap) | difference | 95% interval | P(not better) |",
           "|---|---|---|---|"]
    for name, c in comp.get("expert_vs_base", {}).items():
        out.append(f"| {name} − base on {c['domain']} | {c['diff']:+.3f} | "
                   f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['p_not_better']:.2f} |")
    for col, c in comp.get("auto_vs_base", {}).items():
        out.append(f"| auto − base on {col} | {c['diff']:+.3f} | "
                   f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['p_not_better']:.2f} |")
    return out


def eval_section(r: dict, assets: str) -> list[str]:
    from evaluation.report import precision_note

    cols = r["columns"]
    m = r["machine"]
    out = [f"### Experts vs base (`selfspec eval`, {r['created'][:10]})", "",
           f"Base model `{r['base_model']['spec']}`{precision_note(r['base_model'])}, registry "
           f"revision {r['registry']['revision']}, {r['backend']['kind']} backend; "
           f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}). Headline "
           f"{r['settings']['headline'].removeprefix('score: ')}. Brackets: 95% bootstrap interval "
           f"({r['settings']['bootstrap']['resamples']} resamples).", "",
           "| target | " + " | ".join(f"{c} (n={r['results'][r['targets'][0]][c]['n']})"
                                      for c in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for t in r["targets"]:
        cells = r["results"][t]
        out.append(f"| {t} | " + " | ".join(_ci(cells[c]["score"]) if c in cells else "–"
                                            for c in cols) + " |")
    comp = r["comparisons"]
    out += _comparisons(comp)
    gen = comp.get("generative")
    if gen is not None:  # reports written before generative multiple choice have none
        out += ["", "The same, with multiple choice asked as users ask (the options listed, "
                "\"Answer with the letter.\", the generated letter scored) instead of cloze:", "",
                "| target | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for t in r["targets"]:
            cells = r["results"][t]
            out.append(f"| {t} | " + " | ".join(
                _ci(cells[c]["score_generative"]) if c in cells else "–" for c in cols) + " |")
        out += _comparisons(gen)
    out += ["", verdict(r), "", f"![eval heatmap]({assets}/eval_heatmap.png)", ""]
    return out


def verdict(r: dict, alpha: float = 0.05) -> str:
    """The summary line: a gain counts only at P(not better) <= alpha, as the targets say; a
    point estimate above zero is shown beside it, never as the verdict."""
    comp, s = r["comparisons"], r["summary"]
    sig = sorted(n for n, c in comp.get("expert_vs_base", {}).items()
                 if c["p_not_better"] <= alpha)
    line = (f"Experts beating the base on their own domain with P(not better) <= {alpha}: "
            f"{len(sig)} of {s['experts_compared']} ({', '.join(sig) or 'none'}); above it as a "
            f"point estimate: {len(s['experts_beat_base'])}.")
    mixed = comp.get("auto_vs_base", {}).get("mixed")
    if mixed is not None:
        line += (f" `auto` − base on the mixed set: {mixed['diff']:+.3f}, P(not better) "
                 f"{mixed['p_not_better']:.2f}: "
                 f"{'a gain' if mixed['p_not_better'] <= alpha else 'no significant gain'}.")
    return line


def serving_section(r: dict, assets: str) -> list[str]:
    s, e, m = r["stack"], r["engine"], r["machine"]
    rows = [("stack, model=base", s["base"]), ("stack, one expert", s["single"]),
            ("stack, mixed experts", s["mixed"]), ("stack, model=auto", s["routed"]),
            ("plain vLLM OpenAI server", r["vllm_serve"]), ("naive PEFT server", r["naive_peft"])]
    out = [f"### Serving (`selfspec bench serving`, {m['time'][:10]})", "",
           f"{len(r['experts'])} experts{' (synthetic adapters)' if r['synthetic_adapters'] else ''}"
           f" on `{Path(r['base_model']).name}`, {r['requests']} requests × {r['max_tokens']} "
           f"tokens, concurrency {r['concurrency']}; {m['cpus']} CPUs ({m.get('cpu_model', '?')}),"
           f" {m.get('versions', {}).get('vllm', '')}.", "",
           "| setup | tokens/s (median) | every run | p50 latency (s) |", "|---|---|---|---|"]
    out += [f"| {n} | {x['tokens_per_s']:.1f} | "
            f"{', '.join(f'{v:.0f}' for v in x.get('runs_tokens_per_s', [x['tokens_per_s']]))}"
            f" | {x['latency_p50_s']:.2f} |" for n, x in rows]
    out += ["", "| ratio | measured | target |", "|---|---|---|"]
    out += [f"| {k} | {v} | {r['targets'].get(k, '')} |" for k, v in r["ratios"].items()]
    lat = s.get("latency", {})
    if "stack_over_vllm_per_round" in s:
        out += ["", f"Stack over `vllm serve` round by round: "
                f"{', '.join(str(v) for v in s['stack_over_vllm_per_round'])}. Routing latency "
                f"over {lat.get('pairs')} sequential pairs: auto {lat.get('auto_p50_s')} s vs "
                f"forced {lat.get('forced_p50_s')} s (p50), median paired difference "
                f"{lat.get('paired_diff_p50_s')} s; the router call itself averaged "
                f"{lat.get('routing_call_mean_s')} s"
                + (f", of which {lat['router_compute_mean_s']} s inside the router"
                   if lat.get("router_compute_mean_s") is not None else "") + "."]
    if "cpu_pinning" in s:
        from bench.serving import pinning_line

        out += ["", pinning_line(s["cpu_pinning"]).replace("stack CPU pinning", "Stack CPU pinning")
                + "."]
    one = e["setups"]["experts_1"]["tokens_per_s"]
    out += ["", f"One engine ({e['cpu_lora_ops']} LoRA ops), tokens/s by distinct experts in "
            "the batch: " + ", ".join(f"{k.replace('experts_', '')}: {v['tokens_per_s']:.0f}"
                                     f" ({v['tokens_per_s'] / one:.2f}×)"
                                     for k, v in e["setups"].items()) + ".", "",
            "| experts | one engine (MB of weights) | merged copies (MB) |", "|---|---|---|"]
    out += [f"| {x['experts']} | {x['one_engine_mb']:.0f} | {x['merged_copies_mb']:.0f} |"
            for x in e["memory"]]
    out += ["", f"![serving bench]({assets}/bench_serving.png)", ""]
    return out


def router_section(r: dict) -> list[str]:
    acc, lat, tp = r["accuracy"], r["latency_ms"], r["throughput_qps"]
    ours, base = acc["router"], next((v for k, v in acc.items() if k != "router"), None)
    out = ["### Router (`selfspec bench router`)", "",
           f"Exemplars from the {r['router']['source']}, {len(r['router']['experts'])} experts, "
           f"{r['router']['n_vectors']} vectors, {r['queries']} queries, one thread.", "",
           "| | top-1 | off-topic → base | overall |", "|---|---|---|---|",
           f"| embedding router | {ours['top1_accuracy']:.3f} | {ours['none_recall']:.3f} | "
           f"{ours['overall_accuracy']:.3f} |"]
    if base:
        out.append(f"| TF-IDF baseline | {base['top1_accuracy']:.3f} | "
                   f"{base['none_recall']:.3f} | {base['overall_accuracy']:.3f} |")
    out += ["", f"Latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms; batched "
            f"{tp['batched']:.0f} queries/s (unbatched {tp['unbatched']:.0f}).", ""]
    return out


def render(reports: Path, assets: Path, readme: Path) -> str:
    rel = assets.resolve().relative_to(readme.resolve().parent).as_posix()
    assets.mkdir(parents=True, exist_ok=True)
    lines = [START, "", "_Generated by `python -m bench.results` from the last reports in "
             f"`{reports}/`; do not edit by hand._", ""]
    found = {name: _load(reports / f"{name}.json")
             for name in ("eval", "bench_serving", "bench_router")}
    for name, png in (("eval", "eval_heatmap.png"), ("bench_serving", "bench_serving.png")):
        if found[name] and (reports / png).is_file():
            shutil.copyfile(reports / png, assets / png)
    if found["eval"]:
        lines += eval_section(found["eval"], rel)
    if found["bench_serving"]:
        lines += serving_section(found["bench_serving"], rel)
    if found["bench_router"]:
        lines += router_section(found["bench_router"])
    missing = [f"{n}.json" for n, r in found.items() if r is None]
    if missing:
        lines += [f"Not yet measured here: {', '.join(missing)} (run `selfspec eval` / "
                  "`selfspec bench all`).", ""]
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--assets", type=Path, default=Path("docs/results"))
    a = p.parse_args(argv)
    text = a.readme.read_text()
    if START not in text or END not in text:
        print(f"{a.readme} has no {START} ... {END} block to fill", file=sys.stderr)
        return 2
    block = render(a.reports, a.assets, a.readme)
    head, rest = text.split(START, 1)
    a.readme.write_text(head + block + rest.split(END, 1)[1])
    print(f"updated {a.readme} from {a.reports}/ (plots in {a.assets}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
