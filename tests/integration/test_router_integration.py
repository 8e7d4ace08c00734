"""The router with the real embedded encoder and FAISS on the shipped seeds.

One encoder for the module (loading it takes ~1 s, embedding the seeds ~3 s on one core)."""

from __future__ import annotations

import io
import json
import logging
import sys

import numpy as np
import pytest

from core.encoder import DEFAULT_ENCODER, MemoEncoder, SentenceTransformerEncoder
from core.errors import EncoderError
from core.registry import load_registry
from router.evaluate import evaluate
from router.index import ensure_index, load_router, read_meta
from router.seedset import load_routing, routing_files, write_seed_registry
from router.types import RouterError
from selfspec.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def encoder():
    return MemoEncoder(SentenceTransformerEncoder())


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    write_seed_registry(d)
    return d


@pytest.fixture(scope="module")
def router(experts, encoder):
    return load_router(experts, encoder=encoder)


def test_shipped_routing_sets_reach_the_targets(router):
    items = load_routing(routing_files())
    choices = router.route_batch([it.query for it in items])
    scores = np.array([[c.scores_by_expert[n] for n in router.names] for c in choices])
    m = evaluate(router.names, router.thresholds, scores, [it.domain for it in items]).metrics
    assert m["n_in_domain"] == 279 and m["n_none"] == 91
    assert m["top1_accuracy"] >= 0.95
    assert m["none_recall"] >= 0.90
    assert m["routed_accuracy"] >= 0.90


@pytest.mark.parametrize("query, expert", [
    ("What is the difference between a tort and a crime?", "law"),
    ("how do beta blockers lower blood pressure", "biomedicine"),
    ("Is a Roth IRA better than a 401k for a 25 year old?", "finance"),
    ("solve 3x + 7 = 22", "math"),
    ("what's a good recipe for banana bread", None),
    ("who won the champions league last year", None),
])
def test_each_domain_goes_to_its_expert_and_off_topic_to_base(router, query, expert):
    choice = router.route(query)
    assert choice.expert == expert, choice.reason
    assert set(choice.scores_by_expert) == {"biomedicine", "finance", "law", "math"}


def test_index_meta_records_encoder_and_revision(experts, router):
    meta = read_meta(experts)
    assert meta.encoder.model_dump() == {"name": DEFAULT_ENCODER, "dim": 384}
    assert meta.registry_revision == 1 and meta.index_kind == "flat"
    reg = load_registry(experts)
    unique = sum(len(set(e.exemplars)) for e in reg.experts.values())
    assert meta.n_vectors == router.index.ntotal == unique + 4  # + one description each
    assert all(meta.calibration[n]["rule"] == "negatives p75" for n in router.names)
    assert 0.15 < min(meta.thresholds.values()) <= max(meta.thresholds.values()) < 0.35


def test_other_encoder_is_refused_with_a_clear_message(experts, router):
    with pytest.raises(RouterError, match="built with encoder 'all-MiniLM-L6-v2'"):
        ensure_index(experts, encoder="sentence-transformers/all-mpnet-base-v2")


def test_unloadable_encoder_is_a_clear_error():
    with pytest.raises(EncoderError, match="cannot load encoder .* offline"):
        SentenceTransformerEncoder("no-such-org/no-such-model")


def test_traced_encoder_embeds_like_sentence_transformers(encoder):
    traced = encoder.inner
    assert traced.traced is not None  # the embedded model qualifies for the traced path
    eager = SentenceTransformerEncoder(trace=False)
    assert eager.traced is None
    items = load_routing(routing_files())
    texts = [it.query for it in items][:120] + ["x", "word " * 300]  # one word, past the window
    a, b = eager.encode(texts), traced.encode(texts)
    assert a.shape == b.shape == (len(texts), traced.dim)
    assert float((a * b).sum(1).min()) > 1 - 1e-4
    # order kept: batches are formed longest-first inside encode
    assert np.allclose(traced.encode(texts[:3]), traced.encode(texts[:3][::-1])[::-1], atol=1e-6)


def test_only_mean_pooling_models_are_traced(encoder):
    from core.encoder import _trace_mean_pooling

    model = encoder.inner.model
    cls = type(model)(modules=[model[0], type(model[1])(model[1].embedding_dimension,
                                                           pooling_mode="cls")])
    assert _trace_mean_pooling(cls) is None  # CLS pooling: sentence-transformers' path
    assert _trace_mean_pooling(model) is not None


def test_long_query_is_truncated_and_logged(router, caplog):
    assert isinstance(router.encoder.inner, SentenceTransformerEncoder)
    text = ("A tenant moved out and the landlord kept the whole deposit for normal wear and "
            "tear; can the tenant sue to get it back? ") * 40  # ~1000 tokens
    with caplog.at_level(logging.DEBUG, logger="core.encoder"):
        choice = router.route(text)
    assert choice.expert == "law"
    assert any("truncated to the encoder window of 256 tokens" in r.message
               for r in caplog.records)
    assert not any("indexing errors" in r.message for r in caplog.records)


def test_publishing_rebuilds_the_index(tmp_path, encoder):
    write_seed_registry(tmp_path, domains=["law", "math"])
    assert load_router(tmp_path, encoder=encoder).names == ["law", "math"]
    write_seed_registry(tmp_path, revision=2)  # what a publish of two more experts leaves
    ensure_index(tmp_path, encoder=encoder)  # the publish hook
    meta = read_meta(tmp_path)
    assert meta.registry_revision == 2 and len(meta.experts) == 4


def test_cli_json_stdin_and_text(experts, router, capsys, monkeypatch):
    queries = "What does mens rea mean in criminal law?\nhow to fold a fitted sheet\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(queries.encode())))
    assert main(["route", "--json", "--experts-dir", str(experts)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["expert"] for x in lines] == ["law", None]
    assert main(["route", "--experts-dir", str(experts), "derivative of x^3"]) == 0
    assert capsys.readouterr().out.startswith("expert: math\n")
