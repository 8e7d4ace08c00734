"""`selfspec bench respond`: stage 3 with demonstrations drawn per instruction against shared per
group of instructions (`respond.shared_demos`), side by side on one engine.

Both setups answer the same instructions, grounded on the same BM25 passages, in alternating
rounds; vLLM's prefix cache is emptied before each run so neither inherits the other's blocks.
Reported per setup: stage seconds (median over rounds), prompt tokens, the prefix-cache hit rate,
and what stage 4's filter keeps (empty, looping and truncated answers dropped), so a speed-up that
makes the data worse shows. Numbers go to `<out>/bench_respond.json`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from core.engine import EngineConfig, RespondConfig, ResponseFilterConfig
from core.jsonl import read_jsonl, write_jsonl
from core.precision import cpu_isa
from core.seeds import load_domain, seeds_root
from specialize.filter_responses import filter_responses
from specialize.respond import generate_responses
from specialize.retrieve import build_retriever


def bench_instructions(domain: str, n: int) -> list[dict]:
    """Real domain requests the pipeline never trains on: the domain's routing set (held out
    from the seeds), as the instructions stage 3 answers."""
    rows = read_jsonl(seeds_root() / domain / "routing.jsonl")
    texts = [r.get("query") for r in rows]
    return [{"id": f"{domain}-bench-{i:04d}", "instruction": t, "input": ""}
            for i, t in enumerate(t for t in texts if t)][:n]


def run_respond_bench(args) -> int:
    from core.base_model import resolve_base_model
    from core.engine import VllmGenerator

    domain = load_domain(args.domain)
    rows = bench_instructions(domain.name, args.instructions)
    setups = {"per_instruction": RespondConfig(shared_demos=1),
              "shared_per_32": RespondConfig(shared_demos=32)}
    retriever = build_retriever(domain.root / "corpus", "bm25", RespondConfig().passage_words) \
        if (domain.root / "corpus").is_dir() else None
    engine = VllmGenerator(resolve_base_model(args.base_model),
                           EngineConfig(dtype=args.dtype, kv_cache_gib=2))
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    out = Path(args.out) / "bench_respond.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for r in range(args.rounds):
            for name, cfg in (setups.items() if r % 2 == 0 else reversed(setups.items())):
                engine.llm.reset_prefix_cache()
                with tempfile.TemporaryDirectory(prefix="selfspec-bench-respond-") as tmp:
                    work = Path(tmp)
                    write_jsonl(work / "filter" / "kept.jsonl", rows)
                    t0 = time.perf_counter()
                    res = generate_responses(domain, cfg, engine, work, retriever)
                    seconds = time.perf_counter() - t0
                    kept = filter_responses(ResponseFilterConfig(), work)
                runs[name].append({"seconds": round(seconds, 1),
                                   "prompt_tokens": res["prompt_tokens"],
                                   "prefix_cache_hit_rate": res["prefix_cache_hit_rate"],
                                   "kept": kept["kept"], "rejected": kept["rejected"]})
                print(f"[bench respond] round {r + 1} {name}: {seconds:.0f} s, prefix cache "
                      f"{res['prefix_cache_hit_rate']:.0%}, kept {kept['kept']}/{len(rows)}",
                      file=sys.stderr)
    finally:
        engine.close()
    summary = {name: {"seconds_median": statistics.median(x["seconds"] for x in rs),
                      "prefix_cache_hit_rate": rs[-1]["prefix_cache_hit_rate"],
                      "kept_share": round(sum(x["kept"] for x in rs) / (len(rs) * len(rows)), 3)}
               for name, rs in runs.items()}
    a, b = summary["per_instruction"], summary["shared_per_32"]
    report = {"domain": domain.name, "instructions": len(rows), "rounds": args.rounds,
              "dtype": engine.engine_dtype, "cpu": cpu_isa().as_dict(), "runs": runs,
              "summary": summary,
              "ratios": {"speedup_shared_over_per_instruction":
                         round(a["seconds_median"] / b["seconds_median"], 3)}}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"respond bench: {domain.name}, {len(rows)} instructions, {args.rounds} rounds, "
          f"{engine.engine_dtype} on {cpu_isa().model} ({cpu_isa().summary})")
    for name, s in summary.items():
        print(f"  {name:<16} {s['seconds_median']:>7.1f} s  prefix cache "
              f"{s['prefix_cache_hit_rate']:.0%}  kept {s['kept_share']:.0%}")
    print(f"  shared demos speed-up: {report['ratios']['speedup_shared_over_per_instruction']}x"
          f"\nwrote {out}")
    return 0
