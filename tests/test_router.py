"""Router unit tests: a fake encoder with fixed vectors, real FAISS (no model is loaded)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import router.index as index_mod
from bench.router_baseline import TfidfCentroid
from core.registry import (
    ExpertEntry,
    LoraInfo,
    Registry,
    TrainInfo,
    load_registry,
    utcnow,
    write_registry,
)
from router.evaluate import evaluate, format_report, summarize, sweep
from router.index import ensure_index, load_router, read_meta
from router.offtopic import OFF_TOPIC
from router.route import Router
from router.scoring import decide, expert_scores
from router.types import RouteChoice, RouterError, ScoringConfig
from router.vectors import choose_kind, index_kind
from selfspec.cli import main

AXES = {"law": 0, "math": 1, "cook": 2}


class FakeEncoder:
    """A text's vector is its table entry; otherwise each keyword in AXES adds 1 on its axis,
    plus a small jitter fixed by the text's hash. Records every call."""

    def __init__(self, name="fake", dim=8, table=None):
        self.name, self.dim, self.table, self.calls = name, dim, table or {}, []

    def encode(self, texts):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            if t in self.table:
                v = np.array(self.table[t], dtype=np.float64)
            else:
                seed = int(hashlib.md5(t.encode()).hexdigest()[:8], 16)
                v = np.random.default_rng(seed).normal(0, 0.05, self.dim)
                for word, axis in AXES.items():
                    v[axis] += 1.0 if word in t.lower() else 0.0
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32).reshape(len(texts), self.dim)


def two_experts(n=12):
    return {"law": [f"law question {i}" for i in range(n)],
            "math": [f"math question {i}" for i in range(n)]}


def write_reg(experts_dir, exemplars, revision=1):
    reg = Registry(revision=revision, updated=utcnow())
    for name, ex in exemplars.items():
        reg.experts[name] = ExpertEntry(
            name=name, version=1, description=f"all about {name} for everyone", base_model="b",
            base_model_path="b", path=f".versions/{name}/v1",
            lora=LoraInfo(rank=8, alpha=16, target_modules=["q_proj"]),
            train=TrainInfo(examples=1, epochs=1), exemplars=list(ex), created=utcnow())
    experts_dir.mkdir(parents=True, exist_ok=True)
    write_registry(experts_dir, reg)
    return reg


# ------------------------------------------------------------------------- scoring
def test_score_is_top2_mean_plus_centroid_cosine():
    c30, s30 = math.cos(math.pi / 6), math.sin(math.pi / 6)
    table = {"l1": [1, 0, 0], "l2": [c30, s30, 0], "l3": [s30, c30, 0], "m1": [0, 0, 1],
             "m2": [0, s30, c30], "q": [1, 0, 0]}
    r = Router.from_exemplars({"law": ["l1", "l2", "l3"], "math": ["m1", "m2"]},
                              FakeEncoder(dim=3, table=table), thresholds={"law": 0.5, "math": 0.5},
                              offtopic=())  # thresholds alone: the bar is law's threshold
    law_centroid = np.array([1 + c30 + s30, s30 + c30, 0])
    law_cos = law_centroid[0] / np.linalg.norm(law_centroid)
    math_centroid = np.array([0, s30, 1 + c30])
    choice = r.route("q")
    assert choice.expert == "law"
    assert choice.scores_by_expert["law"] == pytest.approx(0.5 * (1 + c30) / 2 + 0.5 * law_cos,
                                                           abs=1e-5)
    assert choice.scores_by_expert["math"] == pytest.approx(0.0, abs=1e-6)  # orthogonal to q
    assert math_centroid[0] == 0
    assert choice.score == choice.scores_by_expert["law"] and choice.threshold == 0.5


def test_padding_when_search_is_not_exhaustive():
    cfg = ScoringConfig(top_k=2, centroid_weight=0.0)
    sims, ids = np.array([[0.9, 0.8, 0.5]]), np.array([[0, 0, 1]])
    zero = np.zeros((1, 2))
    # Not every vector returned: expert 1's unseen neighbour is bounded by the last sim (0.5).
    assert expert_scores(sims, ids, zero, np.array([5, 5]), cfg, exhaustive=False)[0] == \
        pytest.approx([0.85, 0.5])
    # Every vector returned and expert 1 has one: its mean is over that one.
    assert expert_scores(sims, ids, zero, np.array([2, 1]), cfg, exhaustive=True)[0] == \
        pytest.approx([0.85, 0.5])


def test_argmax_is_taken_before_thresholds():
    # Closest to law but under law's threshold: base model, not math whose threshold it clears.
    [c] = decide(np.array([[0.5, 0.4]]), ["law", "math"], np.array([0.6, 0.3]))
    assert c.expert is None and c.score == 0.5 and c.threshold == 0.6
    assert "law scored 0.500 < its threshold 0.600" in c.reason
    [c] = decide(np.array([[0.5, 0.4]]), ["law", "math"], np.array([0.6, 0.3]), offset=-0.2)
    assert c.expert == "law"


def test_off_topic_contrast_sets_the_bar():
    names, thr, cfg = ["law", "math"], np.array([0.5, 0.5]), ScoringConfig()
    # bar = max(off-topic 0.20 - 0.05, 0.5 x threshold 0.5) = 0.25: law's 0.30 clears it,
    # where law's threshold alone (0.5) would have sent the query to the base model.
    [c] = decide(np.array([[0.30, 0.10]]), names, thr, offtopic=np.array([0.20]), cfg=cfg)
    assert c.expert == "law" and c.threshold == pytest.approx(0.25)
    assert c.offtopic_score == pytest.approx(0.20) and "off-topic 0.200" in c.reason
    # nearer the off-topic text than the margin allows: base, with the bar in the reason
    [c] = decide(np.array([[0.30, 0.10]]), names, thr, offtopic=np.array([0.40]), cfg=cfg)
    assert c.expert is None and c.threshold == pytest.approx(0.35)
    assert c.reason.endswith("base model") and "bar 0.350" in c.reason
    # far from everything: the floor (half the threshold) keeps it on the base model
    [c] = decide(np.array([[0.20, 0.10]]), names, thr, offtopic=np.array([0.0]), cfg=cfg)
    assert c.expert is None and c.threshold == pytest.approx(0.25)
    # no off-topic scores, or the contrast turned off: the threshold alone
    for off, margin in ((None, 0.05), (np.array([0.2]), None)):
        [c] = decide(np.array([[0.30, 0.10]]), names, thr, offtopic=off,
                     cfg=ScoringConfig(offtopic_margin=margin))
        assert c.expert is None and c.threshold == 0.5 and c.offtopic_score is None
    # the sweep's offset moves the whole bar
    [c] = decide(np.array([[0.30, 0.10]]), names, thr, offset=0.06, offtopic=np.array([0.2]),
                 cfg=cfg)
    assert c.expert is None and c.threshold == pytest.approx(0.31)


def test_query_nearer_off_topic_text_than_its_expert_goes_to_base():
    table = {"l1": [1, 0, 0], "l2": [0.95, 0.31, 0], "o1": [0, 0, 1], "o2": [0.1, 0, 0.99],
             "q": [0.6, 0, 0.8]}
    enc = FakeEncoder(dim=3, table=table)
    contrasted = Router.from_exemplars({"law": ["l1", "l2"]}, enc, thresholds={"law": 0.3},
                                       offtopic=["o1", "o2"])
    choice = contrasted.route("q")
    assert choice.score > 0.3 and choice.expert is None  # clears the threshold, still base
    assert choice.offtopic_score > choice.score
    alone = Router.from_exemplars({"law": ["l1", "l2"]}, enc, thresholds={"law": 0.3},
                                  offtopic=())
    assert alone.route("q").expert == "law" and alone.offtopic is None
    assert "no off-topic contrast" in alone.describe()
    assert "2 off-topic vectors" in contrasted.describe()
    with pytest.raises(RouterError, match="off-topic vectors are .* rebuild the index"):
        Router(enc, contrasted.index, ["law"], [0.3], offtopic=np.zeros((2, 5)))


def test_off_topic_lines_on_an_experts_topic_are_dropped():
    experts = {"cook": [f"cook question {i}" for i in range(12)],
               "math": [f"math question {i}" for i in range(12)]}
    elsewhere = {"garden fence paint": [0, 0, 0, 0, 0, 1, 0, 0],
                 "tent pegs": [0, 0, 0, 0, 0, 0, 1, 0]}  # axes no exemplar is on
    r = Router.from_exemplars(experts, FakeEncoder(table=elsewhere),
                              thresholds={"cook": 0.5, "math": 0.5},
                              offtopic=["cook rice tonight", "garden fence paint", "tent pegs"])
    assert r.info["offtopic"] == {"kept": 2, "dropped": ["cook rice tonight"]}
    assert r.route("cook a stew").expert == "cook"  # not contrasted with its own topic
    everyday = Router.from_exemplars(experts, FakeEncoder(), thresholds={"cook": .5, "math": .5},
                                     offtopic=["cook rice tonight"])
    assert everyday.offtopic is None and everyday.info["offtopic"]["kept"] == 0
    assert everyday.route("cook a stew").threshold == 0.5  # thresholds alone


def test_default_off_topic_text_is_indexed_once():
    r = Router.from_exemplars(two_experts(), FakeEncoder(), thresholds={"law": .5, "math": .5})
    assert len(r.offtopic) + len(r.info["offtopic"]["dropped"]) == len(set(OFF_TOPIC))


def test_routes_by_domain_and_falls_back_below_threshold():
    r = Router.from_exemplars(two_experts(), FakeEncoder(), thresholds={"law": 0.6, "math": 0.6})
    assert r.route("a new law puzzle").expert == "law"
    assert r.route("some math homework").expert == "math"
    off = r.route("how to cook rice")
    assert off.expert is None and set(off.scores_by_expert) == {"law", "math"}
    assert off.score == max(off.scores_by_expert.values()) < 0.6


def test_empty_query_is_base_with_zero_score_and_no_encoding():
    enc = FakeEncoder()
    r = Router.from_exemplars(two_experts(), enc, thresholds={"law": 0.5, "math": 0.5})
    enc.calls.clear()
    for text in ("", "   \n\t"):
        assert r.route(text) == RouteChoice(expert=None, score=0.0,
                                            reason="empty query: base model")
    assert enc.calls == []


def test_route_batch_keeps_order_and_encodes_once():
    enc = FakeEncoder()
    r = Router.from_exemplars(two_experts(), enc, thresholds={"law": 0.5, "math": 0.5})
    enc.calls.clear()
    got = r.route_batch(["law case", " ", "math sum", "cook pasta"])
    assert [c.expert for c in got] == ["law", None, "math", None]
    assert enc.calls == [["law case", "math sum", "cook pasta"]]
    one = r.route("law case")  # float32 BLAS may differ in the last bits between batch sizes
    assert one.expert == got[0].expert and one.score == pytest.approx(got[0].score, abs=1e-6)


def test_bad_inputs_raise_router_errors():
    r = Router.from_exemplars(two_experts(), FakeEncoder(), thresholds={"law": 0.5, "math": 0.5})
    with pytest.raises(RouterError, match="not text"):
        r.route_batch(["ok", 3])
    with pytest.raises(RouterError, match="not valid Unicode"):
        r.route("bad \udcff bytes")
    with pytest.raises(RouterError, match="list of queries"):
        r.route_batch("law")
    with pytest.raises(RouterError, match="no experts"):
        Router.from_exemplars({}, FakeEncoder())
    with pytest.raises(RouterError, match="no exemplars"):
        Router.from_exemplars({"law": ["  "]}, FakeEncoder())


# ------------------------------------------------------------------------- calibration
def test_calibrated_thresholds_separate_domains_from_off_topic():
    r = Router.from_exemplars(two_experts(20), FakeEncoder())
    assert r.info["cv_top1"] == 1.0
    for name, thr in zip(r.names, r.thresholds):
        stats = r.info["calibration"][name]
        # Domains this far apart leave negatives at noise level: the floor decides.
        assert stats["rule"] == "0.5 x positives median" and stats["negatives"] == 20
        assert thr == pytest.approx(0.5 * stats["positives_median"], abs=1e-4)
        assert stats["negatives_p75"] < thr < stats["positives_p5"]
    assert r.route("law exam").expert == "law"
    assert r.route("cook dinner").expert is None


def test_single_expert_uses_its_own_held_out_percentile():
    r = Router.from_exemplars({"law": two_experts(20)["law"]}, FakeEncoder())
    assert r.info["calibration"]["law"]["rule"].startswith("positives p5")
    assert 0.5 < r.thresholds[0] < 1.0  # in-domain scores sit near 1; off-topic near 0
    assert r.route("law again").expert == "law" and r.route("cook").expert is None
    with pytest.raises(RouterError, match="fewer than 2 exemplars"):
        Router.from_exemplars({"law": ["law only"]}, FakeEncoder())


def test_descriptions_are_indexed_but_never_held_out():
    r = Router.from_exemplars(two_experts(10), FakeEncoder(),
                              descriptions={"law": "law description", "math": "math desc"})
    assert r.index.ntotal == 22
    assert r.info["calibration"]["law"]["positives"] == 10


def test_hnsw_index_routes_like_flat():
    assert choose_kind(100) == "flat" and choose_kind(10**6) == "hnsw"
    flat = Router.from_exemplars(two_experts(), FakeEncoder(), thresholds={"law": .5, "math": .5})
    hnsw = Router.from_exemplars(two_experts(), FakeEncoder(), thresholds={"law": .5, "math": .5},
                                 kind="hnsw")
    assert index_kind(hnsw.index) == "hnsw" and index_kind(flat.index) == "flat"
    qs = ["law one", "math two", "cook three", "law and math"]
    assert [c.expert for c in hnsw.route_batch(qs)] == [c.expert for c in flat.route_batch(qs)]


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
