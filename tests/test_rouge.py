import random

import pytest

from core.rouge import RougeIndex, rouge_l, tokenize


def test_tokenize_matches_rouge_score_default():
    assert tokenize("The NPV's value: 3.5%!") == ["the", "npv", "s", "value", "3", "5"]


def test_rouge_l_equals_reference_implementation():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    words = ["what", "is", "the", "rate", "of", "a", "bond", "loan", "yield", "compute", "explain", "risk"]
    rnd = random.Random(1)
    for _ in range(300):
        a = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 20)))
        b = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 20)))
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure)


def test_index_max_score_is_exact_above_threshold():
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    rnd = random.Random(2)
    pool = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(400)]
    index = RougeIndex(pool)
    for _ in range(50):
        q = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
        brute = max(rouge_l(q, p) for p in pool)
        score, idx = index.max_score(q, threshold=0.5)
        if brute > 0.5:
            assert score == pytest.approx(brute)
            assert rouge_l(q, pool[idx]) == pytest.approx(brute)
        else:
            assert score <= 0.5


def test_index_grows_and_finds_exact_duplicate():
    index = RougeIndex()
    assert index.max_score("anything at all") == (0.0, None)
    index.add("Explain compound interest to a teenager.")
    assert index.max_score("explain compound interest to a teenager", 0.7)[0] == 1.0
