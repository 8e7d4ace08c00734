"""Stage 1: the base model writes new domain instructions.

Each prompt shows `seeds_per_prompt` sampled seeds (optionally plus a few already-kept generated
ones, as Self-Instruct did) and lets the model continue the numbered list at temperature 0.7
(Self-MoE used 1.0; docs/quality.md measured both), top-p 0.98. A prompt may be focused on one
subtopic of the description or one passage of the domain's corpus, and sent as plain text or as
a chat turn (`GenerateConfig.focus`, `prompt_format`; `selfspec ablate` measures each). Batches of
prompts go through vLLM together; every candidate is appended to `generate/instructions.jsonl`
and fsynced per batch, so an interrupted run resumes where it stopped. Generation ends once the
filter has kept `num_instructions`, or when `patience` batches in a row add nothing (a small model
stuck on duplicates), or after `max_batches`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tqdm import tqdm

from core.engine import Generator, Sampling
from core.jsonl import append_jsonl, resume_jsonl, write_json
from core.seeds import Domain
from specialize.config import GenerateConfig
from specialize.filter import InstructionFilter
from specialize.prompts import (
    Focus,
    Task,
    build_instruction_chat_turn,
    build_instruction_prompt,
    instruction_list_regex,
    open_item,
    parse_instruction_list,
    subtopics,
)
from specialize.retrieve import load_passages


def generate_instructions(domain: Domain, cfg: GenerateConfig, filt: InstructionFilter,
                          generator: Generator, workdir: Path, seed: int = 0) -> dict:
    out = workdir / "generate"
    path = out / "instructions.jsonl"
    write_json(out / "config.json", cfg.model_dump(mode="json"))
    seeds = [Task(s.instruction, s.input) for s in domain.seeds]
    focus_pool, focus_used = focus_choices(domain, cfg)

    # Resume: replay what earlier runs wrote through the filter, so its pool is the same.
    rows = resume_jsonl(path)
    replay = [Task(r["instruction"], r.get("input", "")) for r in rows if not r.get("marker")]
    filt.warm(replay)
    kept = [task for task in replay if filt.check(task).reason is None]
    batch = 1 + max((r["batch"] for r in rows), default=-1)
    stale, started = 0, time.time()

    bar = tqdm(total=cfg.num_instructions, initial=min(len(kept), cfg.num_instructions),
               desc=f"{domain.name}: instructions", unit="kept")
    while len(kept) < cfg.num_instructions and stale < cfg.patience and batch < cfg.max_batches:
        # Seeded per batch, so a resumed run draws the same demos it would have drawn.
        rng = random.Random(f"{seed}:{domain.name}:{batch}")
        prompts = []
        for _ in range(cfg.prompts_per_batch):
            demos = rng.sample(seeds, min(cfg.seeds_per_prompt, len(seeds)))
            if kept and cfg.generated_per_prompt:
                demos += rng.sample(kept, min(cfg.generated_per_prompt, len(kept)))
            focus = rng.choice(focus_pool) if focus_pool else None
            prompts.append((len(demos) + 1, instruction_prompt(domain, demos, focus, cfg,
                                                               generator), focus))
        first = prompts[0][0]  # every prompt of a batch shows the same number of demos
        # No per-request seed: vLLM's CPU worker rewinds a seeded request's torch generator when
        # chunked prefill splits its prompt, which CPU generators cannot do ("CPU Generator does
        # not use offset" kills the engine). Passage-focused prompts (~800 tokens x 16) are split;
        # sampling stays reproducible through the engine's seed, the demos through `rng`.
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_tokens,
                            stop=("\n\n\n",), regex=instruction_list_regex(
                                first, cfg.guided_items) if cfg.guided_items else None)
        completions = generator.complete([p for _, p, _ in prompts], sampling)

        parsed = [(task, focus) for (first, _, focus), comp in zip(prompts, completions)
                  for task in parse_instruction_list(comp.text, first,
                                                     comp.finish_reason == "length")]
        filt.warm([task for task, _ in parsed])  # the batch's embeddings in one encoder call
        new_rows, gained = [], 0
        for task, focus in parsed:
            # The passage a task was written from travels with it, so stage 3 can answer from
            # that very passage (`respond.grounding: source`).
            new_rows.append({"id": f"{domain.name}-g{batch:04d}-{len(new_rows):03d}",
                             "instruction": task.instruction, "input": task.input,
                             "batch": batch,
                             **({"source_passage": focus.passage} if focus and focus.passage
                                else {})})
            if filt.check(task).reason is None:
                kept.append(task)
                gained += 1
        # A batch that parsed to nothing still records that it ran (resume skips it).
        append_jsonl(path, new_rows or [{"id": f"{domain.name}-g{batch:04d}-empty",
                                         "instruction": "", "input": "", "batch": batch,
                                         "marker": True}])
        bar.update(min(gained, max(0, cfg.num_instructions - bar.n)))
        bar.set_postfix(batch=batch, candidates=len(rows) + len(new_rows))
        rows += new_rows
        stale = 0 if gained else stale + 1
        batch += 1
    bar.close()
    return {"candidates": len(rows), "kept": len(kept), "batches": batch,
            "stopped": "target" if len(kept) >= cfg.num_instructions else
            ("patience" if stale >= cfg.patience else "max_batches"),
            "focus": focus_used, "seconds": round(time.time() - started, 1)}


def focus_choices(domain: Domain, cfg: GenerateConfig) -> tuple[list[Focus], str]:
    """The focuses prompts draw from, and which kind was used: a domain without a corpus/
    asked for passages gets its description's subtopics instead."""
    if cfg.focus == "passage" and domain.corpus_dir is not None:
        return [Focus(passage=p) for p in load_passages(domain.corpus_dir, cfg.focus_words)], \
            "passage"
    if cfg.focus in ("passage", "subtopic"):
        return [Focus(subtopic=t) for t in subtopics(domain.description)], "subtopic"
    return [], "none"


def instruction_prompt(domain: Domain, demos: list[Task], focus: Focus | None,
                       cfg: GenerateConfig, generator: Generator) -> str:
    if cfg.prompt_format == "chat":
        turn = build_instruction_chat_turn(domain.name, domain.description, demos, focus)
        # The assistant turn opens at the next item, so the reply parses like a list completion.
        return generator.chat_prompt(turn) + open_item(len(demos) + 1)
    return build_instruction_prompt(domain.name, domain.description, demos, focus)
