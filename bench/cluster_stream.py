"""The client side of `selfspec cluster-demo`: threads streaming chat requests through the head's
proxy while a node is lost, and how their outcomes are counted (before / failover / after)."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.cluster_demo import ClusterDemoConfig


@dataclass
class Result:
    i: int
    model: str
    t0: float
    t1: float
    ok: bool
    status: int
    expert: str | None
    error: str | None


class RequestStream:
    """Client threads sending chat requests until told how many more to send."""

    def __init__(self, url: str, prompts: list[tuple[str, str]], cfg: ClusterDemoConfig):
        self.url, self.prompts, self.cfg = url, prompts, cfg
        self.results: list[Result] = []
        self.lock = threading.Lock()
        self.next_i, self.limit = 0, None  # limit: stop starting requests at this index
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True)
                        for _ in range(cfg.concurrency)]

    def start(self) -> RequestStream:
        for t in self.threads:
            t.start()
        return self

    def finish_after(self, n: int) -> int:
        """Send n more requests, then stop. Returns the index of the first of them."""
        with self.lock:
            first = self.next_i
            self.limit = first + n
            return first

    def stop(self) -> None:
        self.stopped.set()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def snapshot(self) -> list[Result]:
        with self.lock:
            return list(self.results)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                if self.limit is not None and self.next_i >= self.limit:
                    return
                i = self.next_i
                self.next_i += 1
            model, text = self.prompts[i % len(self.prompts)]
            result = self._send(i, model, text)
            with self.lock:
                self.results.append(result)
            if not result.ok:
                print(f"  request {i} ({model}) failed after {result.t1 - result.t0:.1f} s: "
                      f"{result.error}", file=sys.stderr)
            self.stopped.wait(max(0.0, self.cfg.interval_s - (result.t1 - result.t0)))

    def _send(self, i: int, model: str, text: str) -> Result:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                           "max_tokens": self.cfg.max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.time()
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.request_timeout_s) as r:
                data = json.loads(r.read())
                ok = bool(data.get("choices"))
                return Result(i, model, t0, time.time(), ok, r.status,
                              r.headers.get("x-selfspec-expert"), None if ok else "no choices")
        except urllib.error.HTTPError as e:
            detail = e.read()[:160].decode(errors="replace")
            return Result(i, model, t0, time.time(), False, e.code, None, f"HTTP {e.code} {detail}")
        except (OSError, ValueError) as e:
            return Result(i, model, t0, time.time(), False, 0, None, f"{type(e).__name__}: {e}")


def prompts_for(registry) -> list[tuple[str, str]]:
    """(model, question) pairs: model="auto" and each expert forced, over each expert's
    exemplars, interleaved so that both kinds are in flight when the node goes."""
    names = sorted(registry.experts)
    pairs = []
    for k in range(max(len(registry.experts[n].exemplars) for n in names)):
        for name in names:
            ex = registry.experts[name].exemplars
            pairs += [("auto", ex[k % len(ex)]), (name, ex[(k + 1) % len(ex)])]
    return pairs


def phases(results: list[Result], t_kill: float | None, first_after: int | None) -> dict:
    """before: done before the loss; failover: in flight or sent until recovery; after: sent
    once Serve had recovered (these must all succeed)."""
    out = {name: {"sent": 0, "ok": 0, "failed": 0} for name in ("before", "failover", "after")}
    for r in results:
        if first_after is not None and r.i >= first_after:
            name = "after"
        elif t_kill is None or r.t1 <= t_kill:
            name = "before"
        else:
            name = "failover"
        out[name]["sent"] += 1
        out[name]["ok" if r.ok else "failed"] += 1
    return out


def summary_line(nodes: int, results: list[Result], ph: dict, recovered: bool) -> str:
    return (f"cluster-demo: nodes={nodes} requests={len(results)} "
            f"ok={sum(r.ok for r in results)} failed_during_failover={ph['failover']['failed']} "
            f"recovered={'yes' if recovered else 'no'}")
