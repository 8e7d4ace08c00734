"""The user-style routing set (seeds/routing_user_{dev,test}.jsonl) is what issue 17 asks for:
big enough, in five styles, long enough, held out from everything the router indexes."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from core.rouge import RougeIndex
from router.offtopic import OFF_TOPIC
from router.seedset import (
    STYLES,
    USER_SPLITS,
    load_routing,
    routing_files,
    seed_exemplars,
    user_routing_files,
)

CLASSES = {"biomedicine", "finance", "law", "math", "none"}
NEAR_COPY = 0.7  # ROUGE-L F1, the bound seeds/README.md sets for eval and routing items


@pytest.fixture(scope="module")
def splits():
    return {s: load_routing(user_routing_files(s)) for s in USER_SPLITS}


def test_both_splits_ship_with_every_class_in_every_style(splits):
    for split, items in splits.items():
        assert {it.domain for it in items} == CLASSES, split
        assert {it.style for it in items} == set(STYLES), split
        cells = Counter((it.domain, it.style) for it in items)
        assert min(cells[(d, s)] for d in CLASSES for s in STYLES) >= 6, (split, cells)
    both = splits["dev"] + splits["test"]
    per_class = Counter(it.domain for it in both)
    assert min(per_class.values()) >= 60, per_class


def test_queries_are_long_enough_and_keywords_are_bare(splits):
    both = splits["dev"] + splits["test"]
    assert statistics.median(len(it.query.split()) for it in both) >= 14
    stories = [len(it.query.split()) for it in both if it.style == "story"]
    assert min(stories) >= 30  # a story, then the question
    for it in both:
        if it.style == "keywords":
            assert len(it.query.split()) <= 4 and not it.query.endswith("?"), it.query


def test_dev_and_test_do_not_overlap_and_nothing_is_a_near_copy(splits):
    dev, test = ([it.query for it in splits[s]] for s in ("dev", "test"))
    assert not set(dev) & set(test)
    pool = RougeIndex()
    for q in dev + test:  # within the set: no query is a reworded copy of another
        assert pool.max_score(q, NEAR_COPY)[0] <= NEAR_COPY, q
        pool.add(q)
    exemplars, descriptions = seed_exemplars()
    indexed = [t for texts in exemplars.values() for t in texts] + list(descriptions.values())
    shipped = [it.query for it in load_routing(routing_files())]
    for name, others in (("seeds", indexed), ("off-topic text", list(OFF_TOPIC)),
                         ("shipped routing sets", shipped)):
        index = RougeIndex(others)
        worst = max((index.max_score(q, NEAR_COPY)[0], q) for q in dev + test)
        assert worst[0] <= NEAR_COPY, (name, worst)


def test_the_set_is_never_indexed(splits):
    queries = {it.query for s in USER_SPLITS for it in splits[s]}
    exemplars, descriptions = seed_exemplars()
    assert not queries & {t for texts in exemplars.values() for t in texts}
    assert not queries & set(descriptions.values())
    assert not queries & set(OFF_TOPIC)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="dev, test"):
        user_routing_files("train")
