"""`selfspec bench scale`: stages 1-2 (generate + filter) and the data card at the paper's data
scale, with a fake generator, so what is measured is the pipeline's own cost per instruction.

The paper kept ~5,000 instructions per domain. Every kept instruction joins the ROUGE-L pool
that later candidates are compared to, and every candidate goes through the encoder-based checks,
so a cost that grows with the pool shows here as time per instruction rising with N. Each size
runs in a fresh process (spawn), so its peak RSS is its own. The fake generator writes numbered
lists of varied instructions built from the domain's own words (with a share of near-repeats
that the ROUGE filter must catch); the fake encoder hashes words into a fixed-size unit vector,
so the relevance and input checks do their real matrix work without the ~10 ms per text of the
router's encoder (`--encoder real` uses that one). Numbers go to `<out>/bench_scale.json` (`--out docs/results` for the committed ones).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.engine import Completion
from core.precision import cpu_model
from specialize.config import FilterConfig, GenerateConfig

DIM = 384  # the router encoder's width, so the reference matrices have their real shape
TEMPLATES = (
    "Explain how {a} affects {b} when {c} and {d} change.",
    "What is the difference between {a} and {b} in {c} {d}?",
    "Describe the role of {a} in {b} for a {c} {d} team.",
    "Summarize why {a} matters for {b}, {c} and {d}.",
    "List three ways {a} can reduce {b} without {c} or {d}.",
    "Compare {a} with {b} and give one {c} {d} example.",
    "How does {a} {b} relate to {c} during {d}?",
    "Write a short note on {a}, {b}, {c} and {d}.",
)
REPEAT_SHARE = 0.1  # share of items that reword an earlier one (the ROUGE filter's work)


class ScaleGenerator:
    """Writes `items` numbered instructions per prompt from the domain's vocabulary."""

    def __init__(self, vocabulary: list[str], items: int = 4, seed: int = 0):
        self.vocabulary, self.items = vocabulary, items
        self.rng = random.Random(seed)
        self.written: list[str] = []

    def _instruction(self) -> str:
        if self.written and self.rng.random() < REPEAT_SHARE:
            words = self.rng.choice(self.written).split()
            words[self.rng.randrange(len(words))] = self.rng.choice(self.vocabulary)
            return " ".join(words)
        w = self.rng.sample(self.vocabulary, 4)
        text = self.rng.choice(TEMPLATES).format(a=w[0], b=w[1], c=w[2], d=w[3])
        self.written.append(text)
        return text

    def complete(self, prompts, sampling, adapter=None):
        out = []
        for p in prompts:
            first = int(re.findall(r"(\d+)\. Instruction:$", p.rstrip())[0])
            lines = []
            for k in range(self.items):
                text = self._instruction()
                lines.append(f" {text}" if k == 0 else f"{first + k}. Instruction: {text}")
                lines.append(f"{first + k}. Input: <noinput>")
            out.append(Completion("\n".join(lines) + "\n", "stop"))
        return out

    def chat_prompt(self, user: str) -> str:
        return user

    def close(self) -> None:
        pass


class HashEncoder:
    """Bag of hashed words -> unit vector: texts sharing words are close, as with a real one."""

    name, dim = "hash-bow", DIM

    def encode(self, texts):
        out = np.zeros((len(texts), DIM), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
                out[i, h % DIM] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-6)


def domain_vocabulary(domain) -> list[str]:
    """Content words (5+ letters) of the domain's seeds, description and corpus."""
    texts = [s.instruction + " " + s.input for s in domain.seeds] + [domain.description]
    if domain.corpus_dir is not None:
        texts += [p.read_text(encoding="utf-8", errors="ignore")
                  for p in sorted(domain.corpus_dir.glob("*"))[:50] if p.is_file()]
    return sorted({w for t in texts for w in re.findall(r"[a-z]{5,}", t.lower())})


def run_size(domain_name: str, n: int, encoder_kind: str, seed: int) -> dict:
    """One size, in this process: generate until `n` are kept, filter, build the data card."""
    from core.seeds import load_domain
    from specialize.datacard import build_data_card
    from specialize.filter import build_filter, filter_instructions
    from specialize.generate import generate_instructions
    from specialize.quality import load_default_encoder

    domain = load_domain(domain_name)
    encoder = load_default_encoder() if encoder_kind == "real" else HashEncoder()
    # No perplexity judge: it needs vLLM's prompt logprobs (one engine batch, linear in N).
    fcfg = FilterConfig(max_perplexity_ratio=None)
    gcfg = GenerateConfig(num_instructions=n, max_batches=100_000, patience=20)
    gen = ScaleGenerator(domain_vocabulary(domain), items=gcfg.guided_items, seed=seed)
    times = {}
    cpu0 = _cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        t = time.perf_counter()
        g = generate_instructions(domain, gcfg, build_filter(domain, fcfg, gen, encoder), gen, wd,
                                  seed)
        times["generate_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        f = filter_instructions(domain, fcfg, n, wd, gen, encoder)
        times["filter_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        card = build_data_card(domain, wd, encoder, seed)
        times["data_card_s"] = round(time.perf_counter() - t, 2)
    total = sum(times.values())
    return {"num_instructions": n, "candidates": g["candidates"], "kept": f["kept"],
            "rejected": f["rejected"], "on_domain_rate": card["on_domain_rate"], **times,
            "total_s": round(total, 2),
            # CPU seconds of this process: less at the mercy of other jobs on a shared machine
            "cpu_s": round(_cpu_seconds() - cpu0, 2),
            "ms_per_candidate": round(1000 * total / max(1, g["candidates"]), 3),
            # Linux reports ru_maxrss in KiB
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _child(args, queue) -> None:
    os.environ["TQDM_DISABLE"] = "1"  # the bench prints one line per size instead
    queue.put(run_size(*args))


def bench_scale(domain: str, sizes: list[int], encoder: str = "fake", seed: int = 0) -> dict:
    from core.precision import cpu_isa

    ctx = mp.get_context("spawn")  # a fresh interpreter per size: peak RSS is that size's own
    rows, load = [], [round(x, 1) for x in os.getloadavg()]
    for n in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=((domain, n, encoder, seed), queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"  {n:>6} instructions: {rows[-1]['total_s']:.1f} s, "
              f"{rows[-1]['peak_rss_mib']:.0f} MiB peak RSS", file=sys.stderr)
    return {"domain": domain, "encoder": encoder, "seed": seed, "cpu": cpu_model(),
            "cpu_isa": cpu_isa().summary, "cores": os.cpu_count(),
            # other jobs on the machine: wall times are upper bounds when these exceed the cores
            "load_avg_before": load, "load_avg_after": [round(x, 1) for x in os.getloadavg()],
            "sizes": rows}


def format_scale(result: dict) -> str:
    lines = [f"stages 1-2 + data card, fake generator, {result['encoder']} encoder, "
             f"{result['domain']} ({result['cpu']}, {result['cores']} cores)",
             "     N  candidates   kept  generate s  filter s  card s  CPU s  ms/candidate  "
             "peak MiB"]
    for r in result["sizes"]:
        lines.append(f"{r['num_instructions']:>6}  {r['candidates']:>10}  {r['kept']:>5}  "
                     f"{r['generate_s']:>10}  {r['filter_s']:>8}  {r['data_card_s']:>6}  "
                     f"{r['cpu_s']:>5}  "
                     f"{r['ms_per_candidate']:>12}  {r['peak_rss_mib']:>8}")
    return "\n".join(lines)


def run_scale_bench(args) -> int:
    sizes = [int(s) for s in args.scale_sizes.split(",") if s.strip()]
    result = bench_scale(args.domain, sizes, args.scale_encoder, getattr(args, "seed", 0))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_scale.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_scale(result))
    print(f"\nwrote {path}")
    return 0
