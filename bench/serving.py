"""`selfspec bench serving`: the serving numbers, all ratios measured in one run on one machine,
written to reports/bench_serving.json.

    mixed / single      the stack's throughput with requests spread over every expert vs all on
                        one expert (same prompts, same engine): what multi-LoRA batching costs
    stack / vllm        the whole stack (Ray Serve + router, model="auto") vs plain
                        `vllm serve --enable-lora --lora-modules ...` with the same engine flags,
                        asked for the same experts the router chose
    stack / naive       vs transformers + PEFT answering one request at a time, switching adapters
    routing overhead    sequential latency of model="auto" vs the same expert forced
    engine sweep        one vLLM engine: base only, one expert, the batch spread over 2/4/8/16
                        experts; weight memory of one engine with N experts vs N merged copies
                        (bench/serving_engine.py, in its own process)

Side by side: the stack and `vllm serve` are up at the same time and the setups run in
alternation, --rounds times (a pause between runs lets the idle server's busy-wait end), and each
ratio is of medians. A run of ~10 s on a shared 2-core machine varies by +-8%, so two numbers
taken minutes apart would mostly measure the machine. Every answer is exactly --max-tokens long
(ignore_eos), so throughputs compare like with like. Without two experts in --experts-dir, the
bench publishes two random-init LoRA adapters on the embedded base into a temporary registry
(marked "synthetic" in the report): the numbers are about serving, not answer quality.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.serving_latency import KEY, health, routing_latency
from bench.serving_load import (
    free_port,
    run_load,
    run_naive_peft,
    start_vllm_serve,
    stop,
    vllm_serve_command,
    wait_http,
)
from core.precision import cpu_model, precision_facts, resolve_dtype


def run_serving_bench(args) -> int:
    from core.registry import load_registry
    from serve.adapters import adapter_dir, plan_engine
    from serve.app import resolve_config

    out = Path(args.out) / "bench_serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="selfspec-bench-") as tmp:
        experts_dir, synthetic = Path(args.experts_dir), False
        if len(load_registry(experts_dir).experts) < 2:
            # A typo must not pass unnoticed: say the folder is missing, not just "fewer".
            have = "does not exist" if not experts_dir.is_dir() else "has fewer than 2 experts"
            print(f"{experts_dir} {have}: publishing 2 synthetic ones ...", file=sys.stderr)
            experts_dir, synthetic = synthetic_registry(Path(tmp)), True
        cfg = resolve_config({"experts_dir": experts_dir, "registry_poll_s": 0,
                              "api_key": KEY,
                              "engine": {"dtype": getattr(args, "dtype", "auto")}})
        registry = load_registry(experts_dir)
        plan = plan_engine(cfg, registry)
        names = sorted(registry.experts)
        adapters = {n: adapter_dir(registry.experts[n], experts_dir) for n in names}
        texts = workload(registry, args.requests)
        report = {"machine": machine(), "synthetic_adapters": synthetic,
                  "precision": precision_facts(cfg.engine.dtype, resolve_dtype(cfg.engine.dtype)),
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

        engine = phase("engine", lambda: bench_engine(plan, cfg, adapters, texts, args,
                                                      Path(tmp)))
        stack = phase("stack", lambda: bench_stack(cfg, plan, names, adapters, texts, args,
                                                    Path(tmp)))
        chosen = stack.pop("_routed_experts")
        vllm = report["vllm_serve"] = stack.pop("vllm_serve")
        jobs = list(zip(chosen, texts))  # the experts the router chose
        n_naive = min(len(jobs), max(8, args.requests // 4))  # sequential: keep it short
        naive = phase("naive_peft", lambda: run_naive_peft(
            plan.base_path, adapters, jobs[:n_naive], args.max_tokens).summary())

        report["ratios"] = {
            "mixed_over_single": _r(stack["mixed"]["tokens_per_s"],
                                    stack["single"]["tokens_per_s"]),
            "stack_over_vllm": _r(stack["routed"]["tokens_per_s"], vllm["tokens_per_s"]),
            "stack_over_naive": _r(stack["routed"]["tokens_per_s"], naive["tokens_per_s"]),
            "routing_latency_overhead": stack["latency"]["overhead"],
            "engine_mixed16_over_single": engine["mixed_over_single"]["16"],
        }
        report["targets"] = {"mixed_over_single": ">= 0.95", "stack_over_vllm": ">= 0.9",
                             "stack_over_naive": ">= 4", "routing_latency_overhead": "<= 0.02",
                             "engine_mixed16_over_single": ">= 0.95"}
        report["machine"]["load_after"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    plot = plot_report(report, out.with_suffix(".png"))
    print(f"\nwrote {out} and {plot}")
    return 0


QUIET_S = 2.0  # vLLM's processes busy-wait for 1 s after their last step


def bench_stack(cfg, plan, names: list[str], adapters: dict[str, Path], texts: list[str], args,
                tmp: Path) -> dict:
    """The stack and plain `vllm serve` up together; base, one expert, mixed, auto and vllm serve
    measured in alternation for --rounds rounds; then the sequential routing latency."""
    import ray
    from ray import serve

    from serve.app import build_app

    vport = free_port()
    cmd = vllm_serve_command(plan.base_path, adapters, vport, plan, cfg)
    proc = start_vllm_serve(cmd, tmp / "vllm_serve.log", cfg.engine.kv_cache_gib)
    port = free_port()
    url, vurl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vport}/v1"
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg.model_dump(mode="json")), name="bench", route_prefix="/")
        wait_http(f"{vurl}/models", 600, proc)
        stack_load = lambda jobs: run_load(f"{url}/v1", KEY, jobs, args.max_tokens,
                                           args.concurrency)
        vllm_load = lambda jobs: run_load(vurl, "none", jobs, args.max_tokens, args.concurrency)
        warm = [(n, t) for n in names for t in texts[:4]]  # every adapter, shapes compiled
        stack_load(warm)
        vllm_load(warm)
        facts = health(url)  # after warm-up: every replica is up
        pinning, precision = facts.get("cpu_pinning"), facts.get("precision")
        setups = {"routed": [("auto", t) for t in texts],
                  "single": [(names[0], t) for t in texts],
                  "mixed": [(names[i % len(names)], t) for i, t in enumerate(texts)],
                  "base": [("base", t) for t in texts]}
        runs: dict[str, list] = {name: [] for name in ("routed", "vllm_serve", *list(setups)[1:])}
        chosen = None
        for _ in range(max(1, args.rounds)):
            for name, done in runs.items():
                time.sleep(QUIET_S)
                if name == "vllm_serve":  # the experts the router chose, asked for by name
                    done.append(vllm_load([(str(plan.base_path) if e == "base" else e, t)
                                           for e, t in zip(chosen, texts)]))
                    continue
                done.append(stack_load(setups[name]))
                chosen = chosen or runs["routed"][0].experts
        out = {name: median_run(rs) for name, rs in runs.items()}
        out["cpu_pinning"] = pinning
        out["precision"] = precision
        out["vllm_serve"]["command"] = " ".join(cmd[1:])
        out["routed"]["experts"] = {e: chosen.count(e) for e in sorted(set(chosen))}
        out["routed"]["same_choices_every_round"] = all(r.experts == chosen
                                                        for r in runs["routed"])
        out["stack_over_vllm_per_round"] = [_r(a.tokens_per_s, b.tokens_per_s) for a, b in
                                            zip(runs["routed"], runs["vllm_serve"])]
        out["_routed_experts"] = chosen
        out["latency"] = routing_latency(url, texts, chosen, args.max_tokens,
                                         args.latency_pairs)
        return out
    finally:
        stop(proc)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def median_run(runs: list) -> dict:
    """The summary of the run with the median throughput, and every run's throughput."""
    ranked = sorted(runs, key=lambda r: r.tokens_per_s)
    out = ranked[(len(ranked) - 1) // 2].summary()
    out["runs_tokens_per_s"] = [round(r.tokens_per_s, 2) for r in runs]
    return out


def bench_engine(plan, cfg, adapters: dict[str, Path], texts: list[str], args,
                 tmp: Path) -> dict:
    import subprocess

    spec = {"base": str(plan.base_path), "adapters": [str(p) for p in adapters.values()],
            "tmp": str(tmp / "synthetic"), "texts": texts, "max_tokens": args.max_tokens,
            "max_lora_rank": plan.max_lora_rank, "max_model_len": cfg.engine.max_model_len,
            "max_num_seqs": cfg.engine.max_num_seqs, "rounds": args.rounds,
            "dtype": resolve_dtype(cfg.engine.dtype)}
    (tmp / "engine_spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(cfg.engine.kv_cache_gib),
           "VLLM_LOGGING_LEVEL": "WARNING"}
    with (tmp / "engine.log").open("w") as log:
        code = subprocess.call([sys.executable, "-m", "bench.serving_engine",
                                str(tmp / "engine_spec.json"), str(tmp / "engine.json")],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = (tmp / "engine.log").read_text()[-3000:]
        raise RuntimeError(f"the engine sweep failed ({code}):\n{tail}")
    return json.loads((tmp / "engine.json").read_text())


def workload(registry, n: int) -> list[str]:
    """n queries alternating over the experts' domains (their routing sets, else exemplars)."""
    from core.seeds import seeds_root

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

    from core.base_model import DEFAULT_BASE_MODEL, resolve_base_model
    from core.seeds import load_domain
    from serve.adapters import LINEAR_TARGETS
    from specialize.publish import PublishRequest, publish_expert

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
        publish_expert(PublishRequest(
            domain=domain, experts_dir=experts, workdir=work, train_dir=work / "train",
            train_file=work / "train.jsonl",
            lora={"rank": 8, "alpha": 16, "target_modules": list(LINEAR_TARGETS)},
            train_summary={"examples": 4, "epochs": 0.0, "loss_first": None,
                           "loss_last": None},
            base_model=DEFAULT_BASE_MODEL, base_model_path=base,
            resolved_config={"synthetic": True}, rounds=1, n_exemplars=4))
    return experts


def machine() -> dict:
    import platform
    from importlib.metadata import version

    mem = next((int(ln.split()[1]) // 2**20 for ln in _read("/proc/meminfo").splitlines()
                if ln.startswith("MemTotal")), None)
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "memory_gib": mem,
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("torch", "ray")} | {"vllm": _vllm_version()},
            "load_before": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "none"


def _r(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def format_report(r: dict) -> str:
    s, v, n = r["stack"], r["vllm_serve"], r["naive_peft"]
    rows = [("stack, base only", s["base"]), ("stack, one expert", s["single"]), ("stack, mixed experts", s["mixed"]),
            ("stack, model=auto", s["routed"]), ("plain vllm serve", v), ("naive PEFT", n)]
    lines = [(f"serving bench: {len(r['experts'])} experts"
              f"{' (synthetic adapters)' if r['synthetic_adapters'] else ''}, "
              f"{r['requests']} requests x {r['max_tokens']} tokens, "
              f"concurrency {r['concurrency']}, {r['machine']['cpus']} CPUs"),
             f"{'setup':<22} {'tok/s':>8} {'req/s':>7} {'p50 s':>7}"]
    for name, x in rows:
        lines.append(f"{name:<22} {x['tokens_per_s']:>8.1f} {x['requests_per_s']:>7.2f} "
                     f"{x['latency_p50_s']:>7.3f}")
    if r.get("precision"):  # reports from before it was recorded lack it
        p = r["precision"]
        lines.append(f"precision: {p['dtype']} (asked {p['dtype_requested']}) on "
                     f"{p['cpu']['model']}, {p['cpu']['isa']}")
    if "cpu_pinning" in s:  # reports from before it was recorded lack it
        lines.append(pinning_line(s["cpu_pinning"]))
    e = r["engine"]
    lines.append(f"\none engine, {e['requests']} requests x {e['max_tokens']} tokens "
                 f"({e['cpu_lora_ops']} LoRA ops)")
    lines.append(f"{'setup':<22} {'tok/s':>8} {'vs 1 expert':>12}")
    one = e["setups"]["experts_1"]["tokens_per_s"]
    for name, x in e["setups"].items():
        lines.append(f"{name:<22} {x['tokens_per_s']:>8.1f} {x['tokens_per_s'] / one:>12.3f}")
    lines.append(f"\n{'experts':>7} {'one engine MB':>14} {'merged copies MB':>17} {'ratio':>6}")
    for m in e["memory"]:
        lines.append(f"{m['experts']:>7} {m['one_engine_mb']:>14.1f} "
                     f"{m['merged_copies_mb']:>17.1f} {m['ratio_merged_over_engine']:>6.2f}")
    lines.append("")
    for k, v in r["ratios"].items():
        lines.append(f"{k:<26} {v:>7}   target {r['targets'][k]}")
    return "\n".join(lines)


def pinning_line(p: dict | None) -> str:
    """Where the stack's processes ran: a run whose pinning did not happen is not comparable."""
    if not p:
        return "stack CPU pinning: none (Serve's processes shared every core with vLLM's worker)"
    return (f"stack CPU pinning: vLLM's worker on cores {p['worker_cpus']}, "
            f"{p['processes']} Serve processes on {p['serve_cpus']}")


def plot_report(r: dict, path: Path) -> Path:
    """Throughput of every setup, and how one engine scales with the number of experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, e = r["stack"], r["engine"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    bars = {"base": s["base"], "1 expert": s["single"], "mixed": s["mixed"],
            "auto": s["routed"], "vllm serve": r["vllm_serve"], "naive PEFT": r["naive_peft"]}
    a.bar(list(bars), [x["tokens_per_s"] for x in bars.values()],
          color=["#999"] + ["#4477aa"] * 3 + ["#cc6677", "#ddcc77"])
    a.set_ylabel("completion tokens/s")
    a.set_title("HTTP throughput (same prompts)")
    a.tick_params(axis="x", rotation=30)
    ns = [1] + [int(k) for k in e["mixed_over_single"]]
    b.plot(ns, [e["setups"][f"experts_{n}"]["tokens_per_s"] for n in ns], "o-")
    b.axhline(e["setups"]["base"]["tokens_per_s"], color="#999", ls="--", label="base only")
    b.set_xscale("log", base=2)
    b.set_xlabel("distinct experts in the batch")
    b.set_ylabel("tokens/s")
    b.set_title("one engine, mixed experts")
    b.legend()
    m = e["memory"]
    c.plot([x["experts"] for x in m], [x["one_engine_mb"] for x in m], "o-", label="one engine")
    c.plot([x["experts"] for x in m], [x["merged_copies_mb"] for x in m], "s-",
           label="merged copies")
    c.set_xlabel("experts")
    c.set_ylabel("weight memory (MB)")
    c.set_title("memory")
    c.legend()
    fig.suptitle(f"selfspec bench serving: {r['base_model'].rsplit('/', 1)[-1]}, "
                 f"{r['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
