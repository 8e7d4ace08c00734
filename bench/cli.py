"""`selfspec bench` and `selfspec cluster-demo`: the benchmarks and the two-node demo, kept out of
the library (they import from every half; nothing in the library imports them). Parsing only
imports the standard library: each target loads its engine, Ray or encoder inside its run
function, so `selfspec --help` stays fast."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="benchmark a component and write reports/bench_*.json")
    b.add_argument("target", choices=["router", "serving", "respond", "scale", "train", "all"],
                   help="respond: stage 3 with per-instruction vs shared demos on one engine; "
                   "scale: stages 1-2 at the paper's data scale with a fake generator; "
                   "train: stage 5's SFTTrainer against the former hand-written loop")
    b.add_argument("--out", type=Path, default=Path("reports"))
    b.add_argument("--experts-dir", type=Path, default=Path("experts"),
                   help="registry to bench (default experts/; the shipped seeds if it is empty)")
    b.add_argument("--encoder", default=None)
    b.add_argument("--sizes", default="1000,2000,4000,8000,16000,32000",
                   help="exemplar counts for the exact-vs-HNSW crossover (comma-separated)")
    b.add_argument("--requests", type=_at_least_1, default=96, help="serving: requests per run")
    b.add_argument("--max-tokens", type=_at_least_1, default=16, help="serving: tokens per answer")
    b.add_argument("--concurrency", type=_at_least_1, default=32, help="serving: in flight")
    b.add_argument("--dtype", choices=("auto", "bfloat16", "float32", "float16"), default="auto",
                   help="serving: engine precision for the stack and its baselines (auto: bf16 "
                   "only where the CPU has AMX/AVX512-BF16; default %(default)s)")
    b.add_argument("--domain", default="biomedicine", help="respond: the domain (%(default)s)")
    b.add_argument("--instructions", type=_at_least_1, default=64,
                   help="respond: instructions answered per run (%(default)s)")
    b.add_argument("--base-model", default="smollm2-135m-instruct", help="respond: base model")
    b.add_argument("--rounds", type=_at_least_1, default=5,
                   help="serving: alternating rounds over the setups, medians reported (5)")
    b.add_argument("--latency-pairs", type=_at_least_1, default=24,
                   help="serving: sequential auto/forced request pairs for the routing overhead")
    b.add_argument("--scale-sizes", default="5000,20000",
                   help="scale: kept-instruction targets, each in a fresh process (%(default)s)")
    b.add_argument("--scale-encoder", choices=["fake", "real"], default="fake",
                   help="scale: hashed bag of words, or the router's embedded encoder")
    b.add_argument("--train-data", type=Path, default=None,
                   help="train: a train.jsonl (default: seed pairs of --train-domain)")
    b.add_argument("--train-domain", default="finance", help="train: seeds used as data")
    b.add_argument("--train-rows", type=_at_least_1, default=64, help="train: examples (64)")
    b.add_argument("--train-rounds", type=_at_least_1, default=2,
                   help="train: alternating runs of each trainer, medians reported (2)")
    b.add_argument("--train-epochs", type=float, default=1.0,
                   help="train: epochs per run (1: 8 steps of 8 on 64 rows)")
    b.set_defaults(func=run_bench)

    c = sub.add_parser("cluster-demo", help="two Ray nodes on this machine: deploy with Ray's "
                       "CLI, lose one mid-stream, watch Serve recover",
                       description="Starts a head and a worker node (separate `ray start` "
                       "processes, own ports and temp dir), deploys the app with `serve "
                       "deploy`, streams requests, kills the worker node mid-stream and checks "
                       "that every request after Serve's recovery succeeds. Prints "
                       "'cluster-demo: nodes=2 requests=N ok=M failed_during_failover=K "
                       "recovered=yes|no' and exits 1 unless recovered. With an empty "
                       "registry it publishes 2 synthetic experts (random LoRA on the "
                       "embedded base).")
    c.add_argument("--experts-dir", type=Path, default=None, help="the registry (default: "
                   "experts/)")
    c.add_argument("--base-model", default=None, help="default: the registry's base model")
    c.add_argument("--requests", type=int, default=None,
                   help="requests to send: a third before the node is lost, the rest after "
                   "recovery (plus those sent during failover)")
    c.add_argument("--concurrency", type=int, default=None, help="requests in flight")
    c.add_argument("--port", type=int, default=None, help="HTTP port of the head's proxy "
                   "(default: 8100)")
    c.add_argument("--ray-port", type=int, default=None, help="GCS port; the dashboard and "
                   "the other Ray ports follow it (default: 26300)")
    c.add_argument("--out", type=Path, default=None, help="JSON report (default: "
                   "reports/cluster_demo.json)")
    c.set_defaults(func=run_cluster_demo)


def _at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def run_bench(args) -> int:
    """`bench router|serving|all`: each writes its own reports/bench_<target>.json."""
    code = 0
    if args.target in ("router", "all"):
        code = _bench_router(args)
    if args.target in ("serving", "all") and code == 0:
        code = run_bench_serving(args)
    if args.target == "respond":  # not in `all`: it measures the offline pipeline, not serving
        from bench.respond import run_respond_bench

        code = run_respond_bench(args)
    if args.target == "scale":  # not in `all` either
        from bench.scale import run_scale_bench

        code = run_scale_bench(args)
    if args.target == "train":  # not in `all` either
        from bench.train import run_train_bench

        code = run_train_bench(args)
    return code


def _bench_router(args) -> int:
    from bench.router import bench_router, format_bench

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    result = bench_router(args.experts_dir, encoder=args.encoder, sizes=sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_router.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_bench(result))
    print(f"\nwrote {path}")
    return 0


def run_cluster_demo(args) -> int:
    from bench.cluster_demo import build_demo_config
    from bench.cluster_demo import run_cluster_demo as run

    return run(build_demo_config(
        experts_dir=args.experts_dir, base_model=args.base_model, requests=args.requests,
        concurrency=args.concurrency, port=args.port, ray_port=args.ray_port, out=args.out))


def run_bench_serving(args) -> int:
    from bench.serving import run_serving_bench

    return run_serving_bench(args)
