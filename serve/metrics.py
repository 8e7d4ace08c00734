"""Prometheus metrics per expert, kept by the ingress (where every decision is made) in its own
registry and served at GET /metrics in the text exposition format.

    selfspec_requests_total{endpoint, expert, selection, status}   selection: routed|forced|base
    selfspec_route_score{expert}                                   histogram of router scores
    selfspec_routing_seconds                                       time spent routing (auto only)
    selfspec_request_seconds{endpoint}                             end-to-end, to the last byte
    selfspec_tokens_total{expert, kind}                            kind: prompt|completion

With several ingress replicas, each has its own counters: scrape them all (or sum in PromQL).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the ingress
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

# Router scores are cosine-based, mostly 0.2-0.8; 0.05 steps resolve the thresholds.
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(-4, 21))
# Routing is a few ms (one batched encoder call); requests are 10 ms to minutes.
ROUTING_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("selfspec_requests", "requests answered, by expert and how it "
                                "was selected", ["endpoint", "expert", "selection", "status"],
                                registry=r)
        self.route_score = Histogram("selfspec_route_score", "router score of the chosen (or "
                                     "best) expert", ["expert"], buckets=SCORE_BUCKETS,
                                     registry=r)
        self.routing = Histogram("selfspec_routing_seconds", "time to route one request",
                                 buckets=ROUTING_BUCKETS, registry=r)
        self.latency = Histogram("selfspec_request_seconds", "request time to the last byte",
                                 ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.tokens = Counter("selfspec_tokens", "tokens processed", ["expert", "kind"],
                              registry=r)

    def observe_selection(self, sel) -> None:
        if sel.mode == "routed":
            self.routing.observe(sel.route_seconds)
            if sel.score is not None:
                self.route_score.labels(sel.name).observe(sel.score)

    def observe_request(self, endpoint: str, sel, status: int, seconds: float) -> None:
        expert = sel.name if sel is not None else "none"
        mode = sel.mode if sel is not None else "none"
        self.requests.labels(endpoint, expert, mode, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_tokens(self, sel, prompt: int, completion: int) -> None:
        self.tokens.labels(sel.name, "prompt").inc(prompt)
        self.tokens.labels(sel.name, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
