"""Router tests for the index on disk, the routing evaluation and `selfspec route`: a fake
encoder with fixed vectors (tests/test_router.py), real FAISS, no model loaded."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

import router.index as index_mod
from bench.router_baseline import TfidfCentroid
from core.registry import (
    load_registry,
)
from router.evaluate import evaluate, format_report, summarize, sweep
from router.index import ensure_index, load_router, read_meta
from router.offtopic import OFF_TOPIC
from router.types import RouterError, ScoringConfig
from selfspec.cli import main

AXES = {"law": 0, "math": 1, "cook": 2}
from tests.test_router import FakeEncoder, two_experts, write_reg


# ------------------------------------------------------------------------- index on disk
@pytest.fixture
def fake_st(monkeypatch):
    """Encoders built by name come out as fakes with that name (no model load)."""
    made = []

    def fake_load(spec):
        if spec is not None and not isinstance(spec, str):
            return spec
        enc = FakeEncoder(name=spec or "all-MiniLM-L6-v2")
        made.append(enc)
        return enc
    monkeypatch.setattr(index_mod, "load_encoder", fake_load)
    return made


def test_index_is_built_once_and_reused(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    folder = ensure_index(tmp_path)
    meta = read_meta(tmp_path)
    assert meta.encoder.model_dump() == {"name": "all-MiniLM-L6-v2", "dim": 8}
    assert meta.registry_revision == 1 and meta.experts == ["law", "math"]
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock", meta.index_file, "meta.json", meta.offtopic_file]
    assert meta.offtopic_file.startswith("offtopic-r1-")
    assert meta.offtopic["kept"] + len(meta.offtopic["dropped"]) == len(OFF_TOPIC)
    assert len(fake_st) == 1
    assert ensure_index(tmp_path) == folder and len(fake_st) == 1  # fresh: no encoder built
    assert read_meta(tmp_path).index_file == meta.index_file


def test_new_revision_or_hand_edit_rebuilds(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    ensure_index(tmp_path)
    first = read_meta(tmp_path).index_file
    write_reg(tmp_path, {"law": two_experts()["law"]}, revision=2)  # a publish
    r = load_router(tmp_path)
    meta = read_meta(tmp_path)
    assert meta.registry_revision == 2 and r.names == ["law"]
    assert not (tmp_path / "router" / first).exists()  # old build cleaned up
    assert len(list((tmp_path / "router").glob("offtopic-*.npy"))) == 1
    write_reg(tmp_path, two_experts(), revision=2)  # edited by hand, revision unchanged
    assert load_router(tmp_path).names == ["law", "math"]


def test_stale_router_knows_it(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    r = load_router(tmp_path)
    assert not r.is_stale()
    write_reg(tmp_path, two_experts(), revision=5)
    assert r.is_stale()


def test_index_of_another_encoder_is_refused_unless_rebuilt(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    ensure_index(tmp_path, encoder=FakeEncoder(name="enc-a"))
    with pytest.raises(RouterError, match="built with encoder 'enc-a' .*--rebuild-index"):
        ensure_index(tmp_path, encoder=FakeEncoder(name="enc-b"))
    with pytest.raises(RouterError, match="built with encoder 'enc-a'"):
        load_router(tmp_path, encoder=FakeEncoder(name="enc-a", dim=16))  # same name, other dim
    assert load_router(tmp_path).encoder.name == "enc-a"  # no encoder given: the index's own
    ensure_index(tmp_path, encoder=FakeEncoder(name="enc-b"), rebuild=True)
    assert read_meta(tmp_path).encoder.name == "enc-b"


def test_reloaded_router_routes_like_the_built_one(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    built = load_router(tmp_path)
    loaded = load_router(tmp_path)
    qs = ["law x", "math y", "cook z"]
    assert loaded.route_batch(qs) == built.route_batch(qs)
    assert list(loaded.thresholds) == pytest.approx(list(built.thresholds), abs=1e-6)
    assert np.array_equal(loaded.offtopic, built.offtopic)  # saved beside the index
    assert loaded.route("law x").offtopic_score is not None


def test_corrupt_meta_is_rebuilt_and_no_experts_is_refused(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    ensure_index(tmp_path)
    (tmp_path / "router" / "meta.json").write_text("{not json")
    assert load_router(tmp_path).names == ["law", "math"]
    empty = tmp_path / "empty"
    with pytest.raises(RouterError, match="no experts .*selfspec specialize --all"):
        ensure_index(empty)
    assert load_registry(empty).experts == {}


def test_unwritable_index_folder_is_a_clear_error(tmp_path, fake_st, monkeypatch):
    write_reg(tmp_path, two_experts())

    def refuse(index, path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(index_mod, "write_index", refuse)
    with pytest.raises(RouterError, match="cannot write the router index .*writable"):
        load_router(tmp_path)
    assert read_meta(tmp_path) is None


# ------------------------------------------------------------------------- evaluation
def test_summary_numbers():
    m = summarize(["law", "math"], ["law", "law", "math", "none", "none"],
                  ["law", "none", "law", "none", "math"], ["law", "law", "law", "math", "math"])
    assert m["top1_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["routed_accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["none_recall"] == 0.5 and m["overall_accuracy"] == 0.4
    assert m["per_class"]["law"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert m["confusion"] == [[1, 0, 1], [1, 0, 0], [0, 1, 1]]


def test_per_style_numbers_and_report():
    scores = np.array([[0.9, 0.1], [0.2, 0.1], [0.1, 0.8], [0.3, 0.1]])
    ev = evaluate(["law", "math"], np.array([0.5, 0.5]), scores,
                  ["law", "law", "math", "none"], ["lay", "story", "lay", "story"])
    assert ev.predicted == ["law", "none", "math", "none"]
    assert ev.metrics["per_style"] == {
        "lay": {"accuracy": 1.0, "n": 2, "routed": 1.0, "none_recall": None},
        "story": {"accuracy": 0.5, "n": 2, "routed": 0.0, "none_recall": 1.0}}
    text = format_report(ev.metrics)
    assert "story            50.0%    0.0%  100.0%     2" in text
    # decided as the router decides: the off-topic contrast lets the 0.2 story query through
    ev = evaluate(["law", "math"], np.array([0.3, 0.3]), scores, ["law", "law", "math", "none"],
                  offtopic=np.array([0.1, 0.1, 0.1, 0.5]), cfg=ScoringConfig())
    assert ev.predicted == ["law", "law", "math", "none"] and "per_style" not in ev.metrics
    rows = sweep(ev, ["law", "math"], np.array([0.3, 0.3]), np.array([0.0, 0.2]))
    assert [r["routed_accuracy"] for r in rows] == [1.0, pytest.approx(2 / 3, abs=1e-4)]


def test_domains_without_an_expert_count_as_none():
    ev = evaluate(["law"], np.array([0.5]), np.array([[0.9], [0.1]]), ["law", "finance"])
    assert ev.truth == ["law", "none"] and ev.metrics["overall_accuracy"] == 1.0
    assert ev.metrics["domains_without_expert"] == ["finance"]


def test_tfidf_baseline_routes_on_words():
    base = TfidfCentroid({"law": [f"contract breach tort case {i}" for i in range(10)],
                          "math": [f"integral equation prime number {i}" for i in range(10)]})
    s = base.scores(["is this contract breach a tort", "solve the equation", "bake bread"])
    assert list(np.argmax(s[:2], axis=1)) == [0, 1]
    assert s[2].max() == 0.0 and (base.thresholds > 0).all()


# ------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_dir(tmp_path, fake_st):
    write_reg(tmp_path, two_experts())
    return tmp_path


def test_cli_route_prints_choice_and_scores(cli_dir, capsys):
    assert main(["route", "--experts-dir", str(cli_dir), "a", "law", "question"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("expert: law\n") and "<- chosen" in out and "math" in out
    assert main(["route", "--experts-dir", str(cli_dir), "  "]) == 0
    assert "empty query" in capsys.readouterr().out


def test_cli_json_stdin_one_object_per_line_and_bad_utf8(cli_dir, capsys, monkeypatch):
    data = b"law thing\n\nmath thing\n\xff\xfe broken\ncook thing\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["route", "--json", "--experts-dir", str(cli_dir)]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [x["expert"] for x in lines] == ["law", None, "math", None, None]
    assert set(lines[0]) >= {"expert", "score", "scores"} and set(lines[0]["scores"]) == \
        {"law", "math"}
    assert lines[1]["score"] == 0.0 and lines[1]["reason"].startswith("empty query")
    assert "not valid UTF-8" in lines[3]["error"] and "line 4" in captured.err


def test_cli_without_experts_says_what_to_run(tmp_path, capsys):
    assert main(["route", "--experts-dir", str(tmp_path), "hello"]) == 2
    assert "selfspec specialize --all" in capsys.readouterr().err


def test_cli_eval_prints_numbers_and_writes_plots(cli_dir, tmp_path, capsys):
    f = tmp_path / "eval.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "law a", "domain": "law"}, {"query": "math b", "domain": "math"},
        {"query": "cook c", "domain": "none"}]))
    out = tmp_path / "reports"
    assert main(["route", "--experts-dir", str(cli_dir), "--eval", str(f), "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-1 accuracy (in-domain, best-scoring expert): 100.0% of 2" in text
    assert "no-expert queries sent to the base model: 100.0% of 1" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "route_confusion.png", "route_eval.json", "route_threshold_sweep.png"]
    assert (out / "route_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_parser_imports_nothing_heavy():
    code = ("import sys, selfspec.cli as c; c.build_parser().parse_args(['bench', 'router']); "
            "print(sorted(m for m in ('torch', 'faiss', 'sentence_transformers', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
