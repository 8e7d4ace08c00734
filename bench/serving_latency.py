"""Sequential routing latency for `selfspec bench serving`: `model="auto"` against the same
expert forced, one request at a time, with the ingress's and the router's own timers saying how
much of the difference is the router call and how much of that is routing work."""

from __future__ import annotations

import json
import statistics

from bench.serving_load import run_load

KEY = "bench"  # the API key bench/serving.py starts the stack with


def routing_latency(url: str, texts: list[str], chosen: list[str], max_tokens: int,
                    pairs: int = 24) -> dict:
    """One request at a time, auto and the same expert forced, order alternating against
    drift. The overhead is the median of the per-pair differences over the forced median:
    pairing cancels what the machine did between pairs. The ingress's own routing timer over
    the same requests says how much of the difference is the router call itself."""
    auto, forced = [], []
    jobs = [(texts[i % len(texts)], chosen[i % len(chosen)]) for i in range(pairs)]
    before, inside_before = _routing_timer(url), _router_time(url)
    for i, (text, expert) in enumerate(jobs):
        order = [("auto", auto), (expert, forced)]
        for model, into in (order if i % 2 == 0 else order[::-1]):
            into.append(run_load(f"{url}/v1", KEY, [(model, text)], max_tokens, 1).seconds)
    after, inside_after = _routing_timer(url), _router_time(url)
    calls, batches = after[1] - before[1], inside_after[1] - inside_before[1]
    return latency_summary(auto, forced) | {
        "routing_call_mean_s": round((after[0] - before[0]) / calls, 4) if calls else None,
        # of which inside the router (encode + search); the rest is the Ray call itself
        "router_compute_mean_s": round((inside_after[0] - inside_before[0]) / batches, 4)
        if batches else None}


def latency_summary(auto: list[float], forced: list[float]) -> dict:
    med_forced = statistics.median(forced)
    diff = statistics.median(a - f for a, f in zip(auto, forced))
    return {"pairs": len(auto), "auto_p50_s": round(statistics.median(auto), 4),
            "forced_p50_s": round(med_forced, 4), "paired_diff_p50_s": round(diff, 4),
            "overhead": round(diff / med_forced, 4)}


def health(url: str) -> dict:
    """The stack's /health."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/health") as r:
        return json.loads(r.read())


def _router_time(url: str) -> tuple[float, float]:
    """(seconds, batches) the router deployment spent routing, from /health."""
    router = health(url)["router"]
    return router.get("batch_seconds", 0.0), router.get("batches", 0)


def _routing_timer(url: str) -> tuple[float, float]:
    """(seconds, calls) of selfspec_routing_seconds on the ingress's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics") as r:
        lines = r.read().decode().splitlines()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in lines
            if ln.startswith("selfspec_routing_seconds_")}
    return vals.get("selfspec_routing_seconds_sum", 0.0), vals.get(
        "selfspec_routing_seconds_count", 0.0)
