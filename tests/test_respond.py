"""Stage 3's prompts share their demonstrations in groups, so vLLM's prefix cache can serve the
long persona + demos prefix; each prompt still has 5 seed demos, and resumes draw the same ones."""

from __future__ import annotations

import os

import pytest

from core.engine import Completion
from core.jsonl import append_jsonl, read_jsonl
from core.seeds import load_domain
from specialize.config import RespondConfig
from specialize.respond import generate_responses
from tests.conftest import write_domain


class Recorder:
    """Keeps every prompt; reports the longest prefix shared with an earlier prompt as cached,
    the way a prefix cache would."""

    def __init__(self):
        self.prompts: list[str] = []

    def complete(self, prompts, sampling, adapter=None):
        out = []
        for p in prompts:
            cached = max((len(os.path.commonprefix([p, q])) for q in self.prompts), default=0)
            self.prompts.append(p)
            out.append(Completion("An answer with enough words.", "stop", len(p), cached))
        return out


@pytest.fixture
def workdir(tmp_path):
    write_domain(tmp_path / "seeds")
    domain = load_domain("demo", tmp_path / "seeds")
    kept = [{"id": f"demo-{i:03d}", "instruction": f"Explain topic number {i} in detail",
             "input": ""} for i in range(12)]
    append_jsonl(tmp_path / "filter" / "kept.jsonl", kept)
    return domain, tmp_path


def _prefix(prompt: str) -> str:  # everything before the new instruction
    return prompt[:prompt.rindex("Explain topic number")]


def test_a_group_shares_its_demos_and_the_next_group_draws_again(workdir):
    domain, tmp = workdir
    gen = Recorder()
    res = generate_responses(domain, RespondConfig(batch_size=4, shared_demos=6, demos=2,
                                                   retrieval="none"), gen, tmp)
    prefixes = [_prefix(p) for p in gen.prompts]
    assert len(set(prefixes[:6])) == 1 and len(set(prefixes[6:])) == 1
    assert prefixes[0] != prefixes[6]  # two draws (the demo seeds differ)
    assert prefixes[0].count("### Response:") == 2  # every prompt keeps its 2 demos
    assert res["prompt_tokens"] > 0 and 0.5 < res["prefix_cache_hit_rate"] < 1


def test_one_per_group_is_the_per_instruction_draw(workdir):
    domain, tmp = workdir
    gen = Recorder()
    generate_responses(domain, RespondConfig(batch_size=4, shared_demos=1, demos=2,
                                             retrieval="none"), gen, tmp)
    assert len({_prefix(p) for p in gen.prompts}) > 6


def test_a_resumed_run_draws_the_same_demos(workdir):
    domain, tmp = workdir
    cfg = RespondConfig(batch_size=4, shared_demos=6, demos=2, retrieval="none")
    full = Recorder()
    generate_responses(domain, cfg, full, tmp)
    rows = read_jsonl(tmp / "respond" / "responses.jsonl")
    (tmp / "respond" / "responses.jsonl").unlink()
    append_jsonl(tmp / "respond" / "responses.jsonl", rows[:5])  # killed after 5 answers
    resumed = Recorder()
    generate_responses(domain, cfg, resumed, tmp)
    assert resumed.prompts == full.prompts[5:]
