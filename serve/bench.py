"""`selfspec bench serving`: the serving numbers, all ratios measured in one run on one machine,
written to reports/bench_serving.json.

    mixed / single      the stack's throughput with requests spread over every expert vs all on
                        one expert (same prompts, same engine): what multi-LoRA batching costs
    stack / vllm        the whole stack (Ray Serve + router, model="auto") vs plain
                        `vllm serve --enable-lora --lora-modules ...` with the same engine flags,
                        asked for the same experts the router chose
    stack / naive       vs transformers + PEFT answering one request at a time, switching adapters
    routing overhead    sequential latency of model="auto" vs the same expert forced

Every answer is exactly --max-tokens long (ignore_eos), so throughputs compare like with like.
Without two experts in --experts-dir, the bench publishes two random-init LoRA adapters on the
embedded base into a temporary registry (marked "synthetic" in the report): the numbers are
about serving, not answer quality.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from serve.bench_load import (
    free_port,
    run_load,
    run_naive_peft,
    start_vllm_serve,
    stop,
    vllm_serve_command,
    wait_http,
)

KEY = "bench"


def run_serving_bench(args) -> int:
    from serve.adapters import adapter_dir, plan_engine
    from serve.app import resolve_config
    from specialize.registry import load_registry

    out = Path(args.out) / "bench_serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="selfspec-bench-") as tmp:
        experts_dir, synthetic = Path(args.experts_dir), False
        if len(load_registry(experts_dir).experts) < 2:
            print(f"{experts_dir} has fewer than 2 experts: publishing 2 synthetic ones ...",
                  file=sys.stderr)
            experts_dir, synthetic = synthetic_registry(Path(tmp)), True
        cfg = resolve_config({"experts_dir": experts_dir, "registry_poll_s": 0,
                              "api_key": KEY})
        registry = load_registry(experts_dir)
        plan = plan_engine(cfg, registry)
        names = sorted(registry.experts)
        adapters = {n: adapter_dir(registry.experts[n], experts_dir) for n in names}
        texts = workload(registry, args.requests)
        report = {"machine": machine(), "synthetic_adapters": synthetic,
                  "experts": names, "base_model": str(plan.base_path),
                  "requests": args.requests, "max_tokens": args.max_tokens,
                  "concurrency": args.concurrency}

        def phase(name: str, fn):
            # Each phase alone on the machine; the report is rewritten after each one, so a
            # failure late in the run keeps what was measured.
            print(f"[bench] {name} ...", file=sys.stderr)
            t0 = time.perf_counter()
            report[name] = fn()
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            out.write_text(json.dumps(report, indent=2) + "\n")
            return report[name]

        stack = phase("stack", lambda: bench_stack(cfg, names, texts, args))
        chosen = stack.pop("_routed_experts")
        base_id = str(plan.base_path)
        jobs = list(zip(chosen, texts))  # the experts the router chose, for both baselines
        vllm_jobs = [(base_id if e == "base" else e, t) for e, t in jobs]
        vllm = phase("vllm_serve", lambda: bench_vllm(plan, cfg, adapters, vllm_jobs, args,
                                                      Path(tmp)))
        n_naive = min(len(jobs), max(8, args.requests // 4))  # sequential: keep it short
        naive = phase("naive_peft", lambda: run_naive_peft(
            plan.base_path, adapters, jobs[:n_naive], args.max_tokens).summary())

        report["ratios"] = {
            "mixed_over_single": _r(stack["mixed"]["tokens_per_s"],
                                    stack["single"]["tokens_per_s"]),
            "stack_over_vllm": _r(stack["routed"]["tokens_per_s"], vllm["tokens_per_s"]),
            "stack_over_naive": _r(stack["routed"]["tokens_per_s"], naive["tokens_per_s"]),
            "routing_latency_overhead": stack["latency"]["overhead"],
        }
        report["targets"] = {"mixed_over_single": ">= 0.95", "stack_over_vllm": ">= 0.9",
                             "stack_over_naive": ">= 4", "routing_latency_overhead": "<= 0.02"}
        report["machine"]["load_after"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nwrote {out}")
    return 0


def bench_stack(cfg, names: list[str], texts: list[str], args) -> dict:
    import ray
    from ray import serve

    from serve.app import build_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg.model_dump(mode="json")), name="bench", route_prefix="/")
        load = lambda jobs: run_load(f"{url}/v1", KEY, jobs, args.max_tokens,
                                     args.concurrency)
        load([(n, t) for n in names for t in texts[:4]])  # warm-up: every adapter, compiled
        out = {"single": load([(names[0], t) for t in texts]).summary(),
               "mixed": load([(names[i % len(names)], t) for i, t in enumerate(texts)])
               .summary()}
        routed = load([("auto", t) for t in texts])
        out["routed"] = routed.summary()
        out["routed"]["experts"] = {e: routed.experts.count(e) for e in set(routed.experts)}
        out["_routed_experts"] = routed.experts
        out["latency"] = routing_latency(url, texts, routed.experts, args.max_tokens)
        return out
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def routing_latency(url: str, texts: list[str], chosen: list[str], max_tokens: int) -> dict:
    """One request at a time, auto and the same expert forced, interleaved against drift."""
    auto, forced = [], []
    pairs = list(zip(texts, chosen))[:16]
    for i, (text, expert) in enumerate(pairs):
        order = [("auto", auto), (expert, forced)]
        for model, into in (order if i % 2 == 0 else order[::-1]):
            into.append(run_load(f"{url}/v1", KEY, [(model, text)], max_tokens, 1).seconds)
    med_auto, med_forced = statistics.median(auto), statistics.median(forced)
    return {"pairs": len(pairs), "auto_p50_s": round(med_auto, 4),
            "forced_p50_s": round(med_forced, 4),
            "overhead": round((med_auto - med_forced) / med_forced, 4),
            "routing_share_from_metrics": _routing_share(url, med_auto)}


def _routing_share(url: str, e2e_s: float) -> float | None:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics") as r:
        lines = r.read().decode().splitlines()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in lines
            if ln.startswith("selfspec_routing_seconds_")}
    n = vals.get("selfspec_routing_seconds_count", 0)
    return round(vals["selfspec_routing_seconds_sum"] / n / e2e_s, 4) if n else None


def bench_vllm(plan, cfg, adapters, jobs, args, tmp: Path) -> dict:
    port = free_port()
    cmd = vllm_serve_command(plan.base_path, adapters, port, plan, cfg)
    proc = start_vllm_serve(cmd, tmp / "vllm_serve.log", cfg.engine.kv_cache_gib)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 600, proc)
        url = f"http://127.0.0.1:{port}/v1"
        run_load(url, "none", [(n, jobs[0][1]) for n in adapters], args.max_tokens,
                 args.concurrency)  # warm-up
        result = run_load(url, "none", jobs, args.max_tokens, args.concurrency).summary()
        result["command"] = " ".join(cmd[1:])
        return result
    finally:
        stop(proc)


def workload(registry, n: int) -> list[str]:
    """n queries alternating over the experts' domains (their routing sets, else exemplars)."""
    from specialize.seeds import seeds_root

    per = []
    for name in sorted(registry.experts):
        path = seeds_root() / name / "routing.jsonl"
        qs = [json.loads(x)["query"] for x in path.read_text().splitlines() if x.strip()] \
            if path.is_file() else list(registry.experts[name].exemplars)
        per.append(qs)
    return [per[i % len(per)][(i // len(per)) % len(per[i % len(per)])] for i in range(n)]


def synthetic_registry(root: Path, domains=("finance", "law")) -> Path:
    """Two random-init r=8 LoRA adapters on the embedded base, published the real way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from serve.adapters import LINEAR_TARGETS
    from specialize.base_model import DEFAULT_BASE_MODEL, resolve_base_model
    from specialize.publish import publish_expert
    from specialize.seeds import load_domain

    base = resolve_base_model(DEFAULT_BASE_MODEL)
    experts = root / "experts"
    for i, name in enumerate(domains):
        torch.manual_seed(i)
        work = root / "work" / name
        (work / "filter").mkdir(parents=True)
        (work / "train").mkdir()
        domain = load_domain(name)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=list(LINEAR_TARGETS), init_lora_weights=False))
        model.save_pretrained(work / "train" / "adapter")
        rows = "".join(json.dumps({"instruction": s.instruction, "output": s.output}) + "\n"
                       for s in domain.seeds[:4])
        (work / "filter" / "kept.jsonl").write_text(rows)
        (work / "train.jsonl").write_text(rows)
        (work / "train" / "loss.json").write_text("[]")
        (work / "train" / "loss.png").write_bytes(b"")
        publish_expert(domain, experts, work, work / "train", work / "train.jsonl",
                       {"rank": 8, "alpha": 16, "target_modules": list(LINEAR_TARGETS)},
                       {"examples": 4, "epochs": 0.0, "loss_first": None, "loss_last": None},
                       DEFAULT_BASE_MODEL, base, {"synthetic": True}, 1, n_exemplars=4)
    return experts


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_before": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _r(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def format_report(r: dict) -> str:
    s, v, n = r["stack"], r["vllm_serve"], r["naive_peft"]
    rows = [("stack, one expert", s["single"]), ("stack, mixed experts", s["mixed"]),
            ("stack, model=auto", s["routed"]), ("plain vllm serve", v), ("naive PEFT", n)]
    lines = [(f"serving bench: {len(r['experts'])} experts"
              f"{' (synthetic adapters)' if r['synthetic_adapters'] else ''}, "
              f"{r['requests']} requests x {r['max_tokens']} tokens, "
              f"concurrency {r['concurrency']}, {r['machine']['cpus']} CPUs"),
             f"{'setup':<22} {'tok/s':>8} {'req/s':>7} {'p50 s':>7}"]
    for name, x in rows:
        lines.append(f"{name:<22} {x['tokens_per_s']:>8.1f} {x['requests_per_s']:>7.2f} "
                     f"{x['latency_p50_s']:>7.3f}")
    lines.append("")
    for k, v in r["ratios"].items():
        lines.append(f"{k:<26} {v:>7}   target {r['targets'][k]}")
    return "\n".join(lines)
