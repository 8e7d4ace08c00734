"""Router unit tests: a fake encoder with fixed vectors, real FAISS (no model is loaded)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from core.registry import (
    ExpertEntry,
    LoraInfo,
    Registry,
    TrainInfo,
    utcnow,
    write_registry,
)
from router.offtopic import OFF_TOPIC
from router.route import Router
from router.scoring import decide, expert_scores
from router.types import RouteChoice, RouterError, ScoringConfig
from router.vectors import choose_kind, index_kind

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
