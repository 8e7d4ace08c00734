"""Passage retrieval: BM25, and dense retrieval through the encoder its caller hands it (the
`selfspec` CLI passes the router's; a fake with a fixed vector table here)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from core.errors import ConfigError
from core.jsonl import read_jsonl
from specialize.config import build_config
from specialize.pipeline import specialize
from specialize.retrieve import Retriever, build_retriever, load_passages
from tests.conftest import FakeGenerator, seeds_dir

PASSAGES = ["Rivers: water runs downhill to the sea.",
            "Banks: a bank lends money at interest.",
            "Stars: a star burns hydrogen into helium."]


class TableEncoder:
    """Unit vectors from a fixed table: a text is on the axis of the first topic word it
    contains (rivers 0, money 1, stars 2, else 3); the fake engine's instruction number n
    ("Explain tNw0 ...") is on axis n % 3. `encode` takes only the texts, as the router's
    encoders do."""

    name, dim = "table", 4
    TOPICS = (("water", "river", "sea", "flood"), ("money", "bank", "loan", "interest"),
              ("star", "sun", "helium"))

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i, topic_axis(t)] = 1.0
        return out


def topic_axis(text: str) -> int:
    if number := re.search(r"\bt(\d+)w0\b", text):
        return int(number[1]) % 3
    hit = [j for j, words in enumerate(TableEncoder.TOPICS)
           if any(w in text.lower() for w in words)]
    return hit[0] if hit else 3


def test_dense_retrieval_ranks_passages_by_the_encoder_s_cosine():
    r = Retriever(PASSAGES, "dense", TableEncoder())
    # No word is shared with the passage it should find: only the embedding links them.
    assert r.search(["When does a flood happen?", "How is a loan priced?", "What is the sun?"],
                    k=1) == [[0], [1], [2]]
    assert r.search(["a loan"], k=5)[0][0] == 1 and len(r.search(["a loan"], k=5)[0]) == 3


def test_bm25_retrieval_needs_no_encoder():
    r = Retriever(PASSAGES, "bm25")
    assert r.search(["which bank lends money"], k=1) == [[1]]


def test_dense_retrieval_without_an_encoder_is_a_config_error(tmp_path):
    (tmp_path / "a.md").write_text("# Rivers\n\nWater runs downhill.\n")
    with pytest.raises(ConfigError, match="--retrieval dense needs a sentence encoder"):
        build_retriever(tmp_path, "dense", 50)
    with pytest.raises(ConfigError, match="unknown retrieval method 'sparse'"):
        build_retriever(tmp_path, "sparse", 50)


def test_passages_are_cut_on_paragraphs_under_their_title(tmp_path):
    (tmp_path / "a.md").write_text("# Rivers\n\none two three\n\nfour five six seven\n")
    assert load_passages(tmp_path, 4) == ["Rivers: one two three", "Rivers: four five six seven"]


# ---- through the pipeline, with a fake engine --------------------------------------------------

@pytest.fixture
def dense_run(tmp_path, monkeypatch, fake_base):
    from specialize import quality

    seeds_dir(tmp_path, monkeypatch)
    # The data card's on-domain rate from the table, not a 10-second model load.
    monkeypatch.setattr(quality, "load_default_encoder", TableEncoder)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(PASSAGES):
        title, body = text.split(": ")
        (corpus / f"{i}.md").write_text(f"# {title}\n\n{body}\n")
    return build_config(base_model=str(fake_base), experts_dir=tmp_path / "experts",
                        respond={"retrieval": "dense", "corpus": corpus, "top_k": 1,
                                 "batch_size": 3},
                        generate={"num_instructions": 3, "prompts_per_batch": 2},
                        filter={"wellformed": False, "relevance": False,
                                "max_perplexity_ratio": None})


def test_dense_run_without_an_encoder_stops_before_any_work(dense_run):
    with pytest.raises(ConfigError, match="--retrieval dense needs a sentence encoder"):
        specialize(["alpha"], dense_run, make_generator=lambda *a, **k: FakeGenerator(),
                   stop_after="respond")
    assert not (dense_run.experts_dir / ".work").exists()


def test_the_respond_stage_retrieves_with_the_injected_encoder_built_once(dense_run):
    built = []

    def make_encoder():
        built.append(TableEncoder())
        return built[-1]

    specialize(["alpha", "beta"], dense_run, make_generator=lambda *a, **k: FakeGenerator(),
               stop_after="respond", make_encoder=make_encoder)
    assert len(built) == 1 and built[0].calls > 2  # the passages once per domain, then queries
    for name in ("alpha", "beta"):
        respond = dense_run.experts_dir / ".work" / name / "respond"
        rows = read_jsonl(respond / "responses.jsonl")
        assert rows and all(len(r["passages"]) == 1 for r in rows)
        # Each answer's passage is the one nearest its instruction by the encoder's cosine
        # (the fake engine's words share nothing with the passages: BM25 could not match them).
        assert [r["passages"] for r in rows] == [[topic_axis(r["instruction"])] for r in rows]
        assert {topic_axis(r["instruction"]) for r in rows} != {0}
        assert '"retrieval_used": "dense"' in (respond / "config.json").read_text()


def test_the_cli_hands_dense_runs_the_router_s_encoder_as_a_factory(tmp_path):
    from core.encoder import load_encoder
    from specialize.cli import dense_encoder

    dense = build_config(experts_dir=tmp_path, respond={"retrieval": "dense"})
    factory = dense_encoder(dense)
    assert factory.func is load_encoder and factory.args == (None,)
    assert dense_encoder(build_config(experts_dir=tmp_path)) is None
