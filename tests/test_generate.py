"""Stage 1 and 3 with a fake generator: stopping rule, files, resume without duplicates."""

from __future__ import annotations

import pytest

from core.jsonl import append_jsonl, read_jsonl
from core.seeds import load_domain
from specialize.config import FilterConfig, GenerateConfig, RespondConfig
from specialize.filter import build_filter, filter_instructions
from specialize.generate import generate_instructions
from specialize.respond import generate_responses
from tests.conftest import FakeGenerator, write_domain

# The rule filters only: the fake's "Explain t1w0 ... clearly" is no real task, and it has no
# engine for the perplexity check (those filters have their own tests in test_quality.py).
RULES = FilterConfig(wellformed=False, relevance=False, max_perplexity_ratio=None)


@pytest.fixture
def domain(tmp_path):
    write_domain(tmp_path / "seeds")
    return load_domain("demo", tmp_path / "seeds")


def test_generates_until_target_kept(tmp_path, domain):
    cfg = GenerateConfig(num_instructions=10, prompts_per_batch=2)
    gen = FakeGenerator()
    res = generate_instructions(domain, cfg, build_filter(domain, RULES), gen, tmp_path)
    assert res["stopped"] == "target" and res["kept"] >= 10
    sampling = gen.calls[0][1]
    assert (sampling.temperature, sampling.top_p) == (0.7, 0.98)
    assert sampling.regex and sampling.regex.startswith(" ")  # guided list format
    summary = filter_instructions(domain, RULES, 10, tmp_path)
    assert summary["kept"] == 10
    assert len(read_jsonl(tmp_path / "filter" / "kept.jsonl")) == 10


def test_patience_stops_a_model_that_only_repeats(tmp_path, domain):
    class Repeater(FakeGenerator):
        def complete(self, prompts, sampling, adapter=None):
            self.counter = 0  # the same items every call: all near-duplicates after the first
            return super().complete(prompts, sampling, adapter)

    cfg = GenerateConfig(num_instructions=100, prompts_per_batch=1, patience=2)
    res = generate_instructions(domain, cfg, build_filter(domain, RULES), Repeater(),
                                tmp_path)
    assert res["stopped"] == "patience" and res["kept"] == 3 and res["batches"] == 3


def test_resume_after_torn_write_continues_without_duplicates(tmp_path, domain):
    cfg = GenerateConfig(num_instructions=6, prompts_per_batch=1)
    gen = FakeGenerator()
    generate_instructions(domain, cfg, build_filter(domain, RULES), gen, tmp_path)
    path = tmp_path / "generate" / "instructions.jsonl"
    first = read_jsonl(path)
    with open(path, "a") as f:
        f.write('{"id": "torn", "instr')  # a kill in the middle of a write
    cfg2 = GenerateConfig(num_instructions=12, prompts_per_batch=1)
    generate_instructions(domain, cfg2, build_filter(domain, RULES), gen, tmp_path)
    rows = read_jsonl(path)
    assert rows[:len(first)] == first
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and "torn" not in ids
    assert filter_instructions(domain, RULES, 12, tmp_path)["kept"] == 12


def test_responses_resume_skips_answered(tmp_path, domain):
    gen = FakeGenerator()
    generate_instructions(domain, GenerateConfig(num_instructions=6, prompts_per_batch=1),
                          build_filter(domain, RULES), gen, tmp_path)
    filter_instructions(domain, RULES, 6, tmp_path)
    kept = read_jsonl(tmp_path / "filter" / "kept.jsonl")
    append_jsonl(tmp_path / "respond" / "responses.jsonl",
                 [{**kept[0], "response": "done before", "finish_reason": "stop", "passages": []}])
    res = generate_responses(domain, RespondConfig(batch_size=2), gen, tmp_path)
    assert (res["responses"], res["new"]) == (6, 5)
    rows = read_jsonl(tmp_path / "respond" / "responses.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in kept]
    assert rows[0]["response"] == "done before"
    assert gen.calls[-1][1].temperature == 0.0  # greedy, as the paper


class PromptRecorder(FakeGenerator):
    def __init__(self):
        super().__init__()
        self.prompts = []

    def complete(self, prompts, sampling, adapter=None):
        self.prompts += prompts
        return super().complete(prompts, sampling, adapter)


def _demo_with_corpus(tmp_path):
    folder = write_domain(tmp_path / "cseeds")
    corpus = folder / "corpus"
    corpus.mkdir()
    (corpus / "01-ideas.md").write_text("# Core ideas\n\nThe zebra principle says every demo "
                                        "idea has one owner.\n\nThe walrus rule orders ideas.\n")
    return load_domain("demo", tmp_path / "cseeds")


def test_passage_focus_puts_a_corpus_passage_in_every_prompt(tmp_path):
    domain = _demo_with_corpus(tmp_path)
    gen = PromptRecorder()
    cfg = GenerateConfig(num_instructions=4, prompts_per_batch=3, focus="passage")
    res = generate_instructions(domain, cfg, build_filter(domain, RULES), gen, tmp_path)
    assert res["focus"] == "passage"
    prompts = gen.prompts
    assert prompts and all("Core ideas: The zebra principle" in p for p in prompts)
    assert all("Cover many subtopics" not in p for p in prompts)


def test_passage_focus_without_a_corpus_uses_the_description_subtopics(tmp_path, domain):
    gen = PromptRecorder()
    cfg = GenerateConfig(num_instructions=4, prompts_per_batch=2, focus="passage")
    res = generate_instructions(domain, cfg, build_filter(domain, RULES), gen, tmp_path)
    assert res["focus"] == "subtopic"
    # write_domain's description "The demo domain: core ideas explained ..." lists one subtopic
    # after its colon, too few to split: the whole description is the one subtopic.
    assert all("about this subtopic of demo: The demo domain" in p for p in gen.prompts)


def test_chat_format_wraps_the_request_and_opens_the_next_item(tmp_path, domain):
    gen = PromptRecorder()
    cfg = GenerateConfig(num_instructions=6, prompts_per_batch=2, prompt_format="chat",
                         temperature=0.7, focus="none")
    res = generate_instructions(domain, cfg, build_filter(domain, RULES), gen, tmp_path)
    assert res["stopped"] == "target" and res["focus"] == "none"
    for p in gen.prompts:
        assert p.startswith("<user>You are asked to come up with")
        assert "same format.</user><assistant>4. Instruction:" in p
    assert gen.calls[0][1].temperature == 0.7
    # the reply parses exactly like a list completion
    rows = read_jsonl(tmp_path / "generate" / "instructions.jsonl")
    assert rows[0]["instruction"].startswith("Explain t1w0")


def test_instruction_requests_carry_no_per_request_seed(tmp_path, domain):
    # A seeded request that chunked prefill splits crashes vLLM's CPU worker (generate.py).
    gen = FakeGenerator()
    generate_instructions(domain, GenerateConfig(num_instructions=3, prompts_per_batch=1),
                          build_filter(domain, RULES), gen, tmp_path)
    assert all(call[1].seed is None for call in gen.calls)


def test_default_focus_is_a_corpus_passage(tmp_path):
    # docs/quality.md: at temperature 0.7 a passage per prompt cut fragments (29% -> 18% of
    # candidates) with the on-domain rate unchanged.
    domain = _demo_with_corpus(tmp_path)
    gen = PromptRecorder()
    res = generate_instructions(domain, GenerateConfig(num_instructions=3, prompts_per_batch=1),
                                build_filter(domain, RULES), gen, tmp_path)
    assert res["focus"] == "passage" and "The zebra principle" in gen.prompts[0]
    assert gen.calls[0][1].temperature == 0.7


def test_source_grounding_answers_from_the_passage_each_task_was_written_from(tmp_path):
    from specialize.retrieve import build_retriever

    folder = write_domain(tmp_path / "gseeds")
    (folder / "corpus").mkdir()
    (folder / "corpus" / "01-zebra.md").write_text("# Zebra\n\nThe zebra principle says every "
                                                   "demo idea has one owner.\n")
    (folder / "corpus" / "02-walrus.md").write_text("# Walrus\n\nThe walrus rule orders demo "
                                                    "ideas by their age.\n")
    domain = load_domain("demo", tmp_path / "gseeds")
    gen = PromptRecorder()
    generate_instructions(domain, GenerateConfig(num_instructions=8, prompts_per_batch=1),
                          build_filter(domain, RULES), gen, tmp_path)
    rows = read_jsonl(tmp_path / "generate" / "instructions.jsonl")
    # Each candidate carries the passage its own prompt showed (one prompt per batch here).
    assert all(r["source_passage"] in gen.prompts[r["batch"]] for r in rows)
    assert len({r["source_passage"] for r in rows}) == 2
    filter_instructions(domain, RULES, 8, tmp_path)
    retriever = build_retriever(domain.corpus_dir, "bm25", 160)

    gen.prompts.clear()
    generate_responses(domain, RespondConfig(grounding="source"), gen, tmp_path, retriever)
    answers = read_jsonl(tmp_path / "respond" / "responses.jsonl")
    assert len(answers) == len(gen.prompts) == 8
    for row, prompt in zip(answers, gen.prompts):
        background = prompt.split("### Background:\n")[1].split("\n\n### Instruction")[0]
        assert background == f"[1] {row['source_passage']}" and row["passages"] == "source"

    # The default grounds the same tasks on what BM25 retrieves for them: top_k ids.
    (tmp_path / "respond" / "responses.jsonl").unlink()
    gen.prompts.clear()
    generate_responses(domain, RespondConfig(), gen, tmp_path, retriever)
    answers = read_jsonl(tmp_path / "respond" / "responses.jsonl")
    assert all(r["passages"] == [0, 1] or r["passages"] == [1, 0] for r in answers)
    assert all(p.count("### Background:\n[1] ") == 1 and "\n\n[2] " in p for p in gen.prompts)
