"""Stage 3: the base model answers each kept instruction.

Prompt: a one-line domain persona, 5 seed (instruction, response) demonstrations, optionally the
top-k passages retrieved from the domain corpus (the paper's knowledge-infused variant) or the one
passage stage 1 wrote the task from (`grounding: source`), then the new instruction; greedy
decoding. Round 2 instead asks the round-1 expert (through vLLM LoRA),
in the chat format it was trained on. Responses are appended per batch; a resumed run skips
instructions that already have one. With `self_consistency` k > 0, each closed-form task's
prompt is also sampled k times and the samples' labels are stored with the answer, for stage 4's
vote (specialize/consistency.py).
"""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path

from tqdm import tqdm

from core.engine import Adapter, Generator, Sampling
from core.jsonl import append_jsonl, read_jsonl, resume_jsonl, write_json
from core.seeds import Domain
from specialize.config import RespondConfig
from specialize.consistency import sample_votes
from specialize.prompts import (
    RESPONSE_STOP,
    Task,
    build_response_prompt,
    clean_response,
    user_message,
)
from specialize.retrieve import Retriever


def generate_responses(domain: Domain, cfg: RespondConfig, generator: Generator, workdir: Path,
                       retriever: Retriever | None = None, adapter: Adapter | None = None,
                       stage: str = "respond") -> dict:
    out = workdir / stage
    path = out / "responses.jsonl"
    write_json(out / "config.json", {**cfg.model_dump(mode="json"),
                                     "retrieval_used": retriever.method if retriever else "none",
                                     "adapter": adapter.name if adapter else None})
    todo_all = read_jsonl(workdir / "filter" / "kept.jsonl")
    done = {r["id"] for r in resume_jsonl(path)}
    todo = [r for r in todo_all if r["id"] not in done]
    seed_pairs = [(Task(s.instruction, s.input), s.output) for s in domain.seeds]
    # Demos are drawn per group of `shared_demos` consecutive instructions (by position in
    # kept.jsonl, so a resumed run draws the same ones): a group's prompts share their prefix.
    group_of = {r["id"]: i // cfg.shared_demos for i, r in enumerate(todo_all)}
    prompt_tokens = cached_tokens = 0

    started = time.time()
    bar = tqdm(total=len(todo_all), initial=len(done), desc=f"{domain.name}: responses{' (r2)' if adapter else ''}",
               unit="resp")
    for start in range(0, len(todo), cfg.batch_size):
        rows = todo[start:start + cfg.batch_size]
        tasks = [Task(r["instruction"], r.get("input", "")) for r in rows]
        hits = _grounding(rows, tasks, cfg, retriever)
        prompts = []
        for row, task, ids in zip(rows, tasks, hits):
            passages = ([row["source_passage"]] if ids == "source"
                        else [retriever.passages[i] for i in ids] if retriever else [])
            if adapter:
                # The expert was trained on the chat template: ask it the way users will.
                user = user_message(task)
                if passages:
                    user = "Background:\n" + "\n".join(passages) + "\n\n" + user
                prompts.append(generator.chat_prompt(user))
            else:
                group = group_of[row["id"]]
                key = row["id"] if cfg.shared_demos == 1 else f"{domain.name}:{group}"
                demos = random.Random(key).sample(seed_pairs, min(cfg.demos, len(seed_pairs)))
                prompts.append(build_response_prompt(domain.name, domain.description, demos,
                                                     task, passages))
        completions = generator.complete(
            prompts, Sampling(temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                              repetition_penalty=cfg.repetition_penalty,
                              stop=RESPONSE_STOP, seed=zlib.crc32(f"{stage}:{start}".encode())),
            adapter=adapter)
        votes = sample_votes(generator, prompts, tasks, cfg, adapter)
        append_jsonl(path, [
            {**row, "response": clean_response(c.text), "finish_reason": c.finish_reason,
             "passages": ids, **({"consistency": v} if v else {})}
            for row, c, ids, v in zip(rows, completions, hits, votes)])
        prompt_tokens += sum(c.prompt_tokens for c in completions)
        cached_tokens += sum(c.cached_tokens for c in completions)
        bar.update(len(rows))
        if prompt_tokens:
            bar.set_postfix_str(f"prefix cache {cached_tokens / prompt_tokens:.0%}")
    bar.close()
    return {"responses": len(todo_all), "new": len(todo),
            "seconds": round(time.time() - started, 1), "prompt_tokens": prompt_tokens,
            "prefix_cache_hit_rate": round(cached_tokens / prompt_tokens, 3)
            if prompt_tokens else None}


def _grounding(rows: list[dict], tasks: list[Task], cfg: RespondConfig,
               retriever: Retriever | None) -> list:
    """Per task: "source" (answered from the passage stage 1 wrote it from) or the ids of the
    top_k retrieved passages ([] without a retriever). Only the tasks that need it are searched."""
    # The passage a task was written from holds what the answer should say; retrieved ones may
    # be about a neighbouring topic.
    own = [cfg.grounding == "source" and bool(r.get("source_passage")) for r in rows]
    asked = [f"{t.instruction} {t.input}" for t, o in zip(tasks, own) if not o]
    found = iter(retriever.search(asked, cfg.top_k) if retriever and asked else [])
    return ["source" if o else (next(found) if retriever else []) for o in own]

