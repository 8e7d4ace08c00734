"""`selfspec eval`. Parsing imports only the standard library; vLLM, torch and the router load
inside `run_eval`, after the arguments (domains, targets, registry or endpoint) are checked."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from core.precision import DTYPES


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "eval", help="score the base model, every expert and auto on the held-out eval sets",
        description="Scores each domain's eval.jsonl for the base model, every expert on every "
        "domain (cross-domain forgetting shows) and the routed `auto`, with 95%% bootstrap "
        "intervals. Writes eval.json, eval.md, eval_heatmap.png and eval_items.jsonl to --out.")
    p.add_argument("--experts-dir", type=Path, default=Path("experts"))
    p.add_argument("--domains", type=_csv, default=None, metavar="A,B",
                   help="comma-separated (default: every domain under seeds/ with an eval.jsonl)")
    p.add_argument("--targets", type=_csv, default=None, metavar="base,experts,auto",
                   help="base, experts (all), auto (routed) and/or expert names "
                   "(default: base,experts,auto)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="evaluate through a running server (selfspec serve) instead of a direct "
                   "vLLM engine, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None,
                   help="the server's API key (default: $SELFSPEC_API_KEY)")
    p.add_argument("--tokenizer", default=None,
                   help="with --endpoint: a local base model folder to tokenize prompts with "
                   "(default: the folder the server reports)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="N items per domain, spread over the item types (a quick look)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (1000)")
    p.add_argument("--concurrency", type=int, default=None, help="HTTP requests in flight (8)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="engine precision: auto = bf16 where the CPU has AMX/AVX512-BF16 (or on a GPU), "
                   "float32 on other CPUs (default: %(default)s)")
    p.set_defaults(func=run_eval)


def _command_line(argv: list[str]) -> str:
    """The command as typed, with the API key blanked out (eval.json gets committed)."""
    shown, hide = [], False
    for a in argv:
        if hide:
            shown.append("***")
        elif a.startswith("--api-key="):
            shown.append("--api-key=***")
        else:
            shown.append(a)
        hide = a == "--api-key"
    return shlex.join(["selfspec", *shown])


def run_eval(args) -> int:
    from evaluation.config import build_eval_config
    from evaluation.report import format_table, write_outputs
    from evaluation.run import evaluate

    cfg = build_eval_config(
        experts_dir=args.experts_dir, domains=args.domains, targets=args.targets, out=args.out,
        endpoint=args.endpoint, limit=args.limit, resamples=args.resamples,
        concurrency=args.concurrency, tokenizer=args.tokenizer, dtype=args.dtype,
        api_key=args.api_key or (os.environ.get("SELFSPEC_API_KEY") if args.endpoint else None))
    t0 = time.perf_counter()
    report, rows = evaluate(cfg)
    report["command"] = _command_line(sys.argv[1:])
    report["timing_s"]["total_s"] = round(time.perf_counter() - t0, 2)
    paths = write_outputs(report, rows, cfg.out)
    print()
    print(format_table(report))
    skipped = report["registry"]["skipped"]
    for name, why in skipped.items():
        print(f"\nleft out: expert {name}: {why}", file=sys.stderr)
    print(f"\n{len(rows)} scored items in {report['timing_s']['total_s']:.0f} s; wrote "
          + ", ".join(str(p) for p in paths))
    return 0
