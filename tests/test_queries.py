"""Stage 2b, user-style routing queries: the prompts show seeds rewritten into each style (never
the routing evaluation sets), and the filter keeps on-domain, well-formed, new queries of the
right length. The engine is the unit tests' fake; the encoder is the router's real one."""

from __future__ import annotations

import json
import re

import pytest

from core.engine import Completion
from core.jsonl import read_jsonl
from core.seeds import load_domain, seeds_root
from specialize.config import QueriesConfig, resolve_config
from specialize.queries import (
    STYLE_LINES,
    generate_queries,
    kept_queries,
    parse_query_list,
    query_list_regex,
    style_demo,
)
from tests.conftest import FakeGenerator

# What the fake "base model" writes for biomedicine, per style: good ones, and one each that a
# check must catch (its expected reason after the text).
WRITES = {
    "story": [("My mother was told at her checkup that her blood sugar is high. The doctor "
               "mentioned tablets, but she is scared of side effects. What does metformin "
               "actually do in the body?", None),
              ("We are planning a family trip to Italy next spring with two small kids, and "
               "the flights look expensive. When is the cheapest time to book flights?",
               "off_domain")],
    "lay": [("why do I get a fever when I have the flu?", None),
            ("The role of the kidney in", "fragment")],
    "keywords": [("statin liver side effects", None),
                 ("what is the best way to learn how vaccines work in the body", "too_long")],
    "exam": [("Which enzyme do statins inhibit, and how does that lower LDL cholesterol in "
              "the blood?", "near_duplicate"),  # a seed, copied
             ("Which white blood cells produce antibodies after vaccination?", None)],
    "task": [("Write a short leaflet explaining how vaccines train the immune system.", None),
             ("Write a short leaflet explaining how vaccines train the immune system.",
              "near_duplicate")],
}


class QueryWriter(FakeGenerator):
    """The shared fake, taught to continue a numbered query list in the prompt's style."""

    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    def complete(self, prompts, sampling, adapter=None):
        if not re.search(r"\d+\.$", prompts[0]):  # instructions or answers: the shared fake's
            return super().complete(prompts, sampling, adapter)
        self.calls.append((len(prompts), sampling, adapter))
        out = []
        for p in prompts:
            self.prompts.append(p)
            first = int(re.search(r"(\d+)\.$", p).group(1))
            style = next(s for s, line in STYLE_LINES.items() if line in p)
            texts = [t for t, _ in WRITES[style]]
            body = "".join(f"{first + k}. {t}\n" for k, t in enumerate(texts))
            out.append(Completion(" " + body[len(f"{first}. "):], "stop"))
        return out


@pytest.fixture(scope="module")
def biomedicine():
    return load_domain("biomedicine")


def test_queries_are_written_per_style_and_filtered(tmp_path, biomedicine):
    cfg = QueriesConfig(candidates=10, items_per_prompt=2)
    gen = QueryWriter()
    res = generate_queries(biomedicine, cfg, gen, tmp_path)

    assert res["candidates"] == 10
    assert {s: c["candidates"] for s, c in res["by_style"].items()} == dict.fromkeys(
        STYLE_LINES, 2)
    rows = {r["query"]: r for r in read_jsonl(tmp_path / "queries" / "rejected.jsonl")}
    kept = [r["query"] for r in read_jsonl(tmp_path / "queries" / "kept.jsonl")]
    for style, items in WRITES.items():
        for text, reason in items:
            if reason is None:
                assert text in kept, (style, text, rows.get(text))
            elif reason != "near_duplicate" or style != "task":
                assert rows[text]["reason"] == reason, (style, text, rows[text])
    assert kept.count(WRITES["task"][0][0]) == 1  # its copy is the duplicate
    assert res["kept"] == 5 and sum(res["rejected"].values()) == 5

    # Each style is one engine call, guided to one line per item, sampled as stage 1 samples.
    assert len(gen.calls) == 5
    assert all(c[1].regex and c[1].temperature == 0.7 for c in gen.calls)


def test_demos_are_seeds_rewritten_never_the_routing_eval_sets(tmp_path, biomedicine):
    gen = QueryWriter()
    generate_queries(biomedicine, QueriesConfig(candidates=20), gen, tmp_path)
    held_out = [json.loads(line)["query"] for split in ("dev", "test")
                for line in (seeds_root() / f"routing_user_{split}.jsonl").read_text()
                .splitlines() if line.strip()]
    seeds = [s.instruction for s in biomedicine.seeds]
    for prompt in gen.prompts:
        # (a 3-word keyword query such as "number needed to treat" may occur in a passage)
        assert not any(q in prompt for q in held_out if len(q.split()) >= 6)
        demos = re.findall(r"^\d+\. (.+)$", prompt, re.MULTILINE)
        assert not set(demos) & set(held_out)
        assert len(demos) == 3
        for demo in demos:
            # a demo is a seed, or a seed behind a template opener, or a seed's keywords
            words = set(demo.lower().split())
            assert any(demo.endswith((s, s[1:])) or
                       words <= set(re.findall(r"[a-z][a-z'\-]*", s.lower()))
                       for s in seeds), demo
    story = next(p for p in gen.prompts if STYLE_LINES["story"] in p)
    assert "passage:" in story  # the domain has a corpus: each prompt is about one passage


def test_style_templates():
    import random

    rng = random.Random(0)
    seed = "Which enzyme do statins inhibit, and how does that lower LDL cholesterol?"
    assert style_demo("exam", seed, "pharmacology", rng) == seed
    assert style_demo("keywords", seed, "pharmacology", rng) == "enzyme statins inhibit"
    assert style_demo("keywords", "What is it?", "x", rng) is None
    story = style_demo("story", seed, "pharmacology", rng)
    assert "pharmacology" in story and story.endswith(seed) and len(story.split()) >= 15
    assert style_demo("task", "Explain how insulin works.", "x", rng) == \
        "Explain how insulin works."
    task = style_demo("task", seed, "x", rng)
    assert task.split()[0] in ("Write", "Draft", "Prepare") and task.endswith(seed[1:])
    assert style_demo("lay", seed, "x", rng).endswith(seed[1:])


def test_parse_and_guided_format():
    text = " eigenvalues rotation matrix\n5. Question: **integral x sine**\n6. cut off"
    assert parse_query_list(Completion(text, "length"), 4) == [
        "eigenvalues rotation matrix", "integral x sine"]
    assert parse_query_list(Completion(" a\n1. copied demo\n", "stop"), 4) == ["a"]
    regex = query_list_regex(4, 2, 60)
    assert re.fullmatch(regex, " statin side effects\n5. ldl cholesterol\n")
    assert not re.fullmatch(regex, " a\n5. b\n6. c\n")  # at most 2 items
    assert not re.fullmatch(regex, " " + "x" * 61 + "\n")


def test_kept_queries_take_styles_in_turn(tmp_path):
    (tmp_path / "queries").mkdir()
    rows = [{"query": f"{s} {i}", "style": s} for s in ("story", "keywords") for i in range(3)]
    (tmp_path / "queries" / "kept.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    assert kept_queries(tmp_path, 3) == ["story 0", "keywords 0", "story 1"]
    assert kept_queries(tmp_path, 0) == [] and kept_queries(tmp_path / "none", 5) == []


def test_router_queries_is_a_setting_and_zero_is_off():
    assert resolve_config(settings=["router_queries=0"]).router_queries == 0
    cfg = resolve_config(settings=["queries.candidates=80", "queries.relevance_margin=0.05"])
    assert (cfg.queries.candidates, cfg.queries.relevance_margin) == (80, 0.05)


def test_pipeline_publishes_kept_queries_as_router_exemplars(tmp_path, monkeypatch, fake_base):
    from core.registry import load_registry
    from specialize import pipeline
    from specialize.config import build_config
    from specialize.pipeline import specialize

    def train(base_path, cfg, train_file, out, gain_items, gain_cfg):  # no PEFT: seconds
        (out / "adapter").mkdir(parents=True)
        (out / "adapter" / "adapter_config.json").write_text("{}")
        for f in ("loss.json", "loss.png"):
            (out / f).write_text("[]")
        return {"examples": 3, "epochs": 1, "loss_first": 2.0, "loss_last": 1.0}

    monkeypatch.setattr(pipeline, "train_adapter", train)
    monkeypatch.setattr(pipeline, "validate_adapter", lambda *a: {
        "rank": 8, "alpha": 16, "target_modules": ["q_proj"]})
    base = {"base_model": str(fake_base), "respond": {"retrieval": "none"},
            "gain": {"enabled": False}, "router_exemplars": 2,
            "generate": {"num_instructions": 3, "prompts_per_batch": 1},
            # the fake's "Explain t1w0 ... clearly" is no real task: rule filters only
            "filter": {"wellformed": False, "relevance": False, "max_perplexity_ratio": None},
            "queries": {"candidates": 10, "items_per_prompt": 2}}
    off = specialize(["biomedicine"], build_config(**base, experts_dir=tmp_path / "off"),
                     make_generator=lambda *a, **k: QueryWriter())
    on = specialize(["biomedicine"], build_config(**base, experts_dir=tmp_path / "on",
                                                  router_queries=3),
                    make_generator=lambda *a, **k: QueryWriter())
    seeds = len(load_domain("biomedicine").seeds)
    ex_off = load_registry(tmp_path / "off").experts["biomedicine"].exemplars
    ex_on = load_registry(tmp_path / "on").experts["biomedicine"].exemplars
    assert "queries" not in off[0]["seconds"] and len(ex_off) == seeds + 2
    assert "queries" in on[0]["seconds"] and ex_on[:-3] == ex_off
    good = [t for items in WRITES.values() for t, reason in items if reason is None]
    assert ex_on[-3:] == good[:3]  # one per style in turn: story, lay, keywords
    data = tmp_path / "on" / "biomedicine" / "data"
    assert len(read_jsonl(data / "kept_queries.jsonl")) == 5
    assert len(read_jsonl(data / "rejected_queries.jsonl")) == 5
