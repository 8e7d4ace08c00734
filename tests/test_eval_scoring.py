"""Scoring without models: normalization, reply parsing, per-format scores, macro-F1, intervals."""

from __future__ import annotations

import pytest

from core.eval_formats import (
    first_line,
    letter_text,
    normalize,
    parse_label,
    parse_letter,
    parse_yes_no,
    score_generation,
    score_multiple_choice,
    user_text,
)
from core.seeds import EvalItem, load_domain
from core.stats import macro_f1, macro_f1_ci, mean_ci, paired_diff


def item(**kw) -> EvalItem:
    return EvalItem.model_validate({"id": "x", "question": "Q?", **kw})


# ---------------------------------------------------------------- normalization
@pytest.mark.parametrize("text,want", [
    ("The Liver.", "liver"),
    ("7.4", "7.4"),
    ("about 7.40!", "about 7.40"),
    ("$1,000", "1000"),
    ("33.3%", "33.3"),
    ("\u22124", "-4"),
    ("vitamin B-12", "vitamin b 12"),
    ("T. pallidum", "t pallidum"),
    ("an IgM", "igm"),
])
def test_normalize(text, want):
    assert normalize(text) == want


def test_first_line_drops_labels_and_blank_lines():
    assert first_line("\n\n**Answer:** liver\nIt makes bile.") == "liver"
    assert first_line("Final answer - 46") == "46"
    assert first_line("The answer is 2000.") == "2000."
    assert first_line("Answers vary.") == "Answers vary."
    assert first_line("") == ""


def test_parse_yes_no():
    assert parse_yes_no("Yes, it does.") == "yes"
    assert parse_yes_no(" no") == "no"
    assert parse_yes_no("Aspirin does.") is None
    assert parse_yes_no("") is None


def test_parse_label_earliest_then_longest():
    labels = ["cohort study", "case-control study", "cross-sectional study"]
    assert parse_label("This is a case-control study, not a cohort study.", labels) == \
        "case-control study"
    assert parse_label("Cohort study.", labels) == "cohort study"
    assert parse_label("A trial.", labels) is None
    # "bond" and "bond fund" both start at the same place: the longer label wins
    assert parse_label("bond fund", ["bond", "bond fund"]) == "bond fund"


def test_multiple_choice_acc_and_acc_norm_differ_on_length():
    it = item(type="multiple_choice", options=["IgM", "Immunoglobulin G antibodies"], answer="B")
    s = score_multiple_choice(it, [-3.0, -10.0])  # per char: -1.0 vs -0.37
    assert (s.acc, s.score, s.pred, s.gold) == (0.0, 1.0, "B", "B")
    assert s.generative is None and "generative" not in s.to_json()  # no reply, no score


@pytest.mark.parametrize("reply,want", [
    ("B", "B"),
    ("B.", "B"),
    (" (C) Tricuspid valve", "C"),
    ("D) Pulmonary valve", "D"),
    ("A. Aortic valve\nBecause ...", "A"),
    ("**B**", "B"),
    ("Answer: C", "C"),
    ("The answer is (D).", "D"),
    ("Option A", "A"),
    ("b", "B"),
    ("c)", "C"),
    ("\n\nB: Mitral valve", "B"),
    ("A mitral valve separates them.", None),  # an article, not a choice
    ("I think it is B.", None),  # a pronoun; the letter must open the reply
    ("E", None),  # not one of the four options
    ("Based on anatomy, B.", None),
    ("Mitral valve", None),
    ("a good question", None),
    ("", None),
])
def test_parse_letter(reply, want):
    assert parse_letter(reply, 4) == want


def test_letter_text_lists_the_options():
    it = item(type="multiple_choice", options=["IgM", "IgG"], answer="A", input="ctx")
    assert letter_text(it) == "Q?\n\nctx\n\nA. IgM\nB. IgG\n\nAnswer with the letter."


def test_multiple_choice_generative_beside_cloze():
    it = item(type="multiple_choice", options=["IgM", "IgG", "IgA"], answer="C")
    right = score_multiple_choice(it, [-1.0, -2.0, -3.0], "C. IgA")
    assert (right.score, right.generative, right.generative_pred, right.generative_valid) == \
        (0.0, 1.0, "C", True)  # cloze wrong, letter right: scored apart
    wrong = score_multiple_choice(it, [-3.0, -2.0, -1.0], "A")
    assert (wrong.score, wrong.generative, wrong.generative_pred) == (1.0, 0.0, "A")
    none = score_multiple_choice(it, [-3.0, -2.0, -1.0], "It is IgA.")
    assert (none.generative, none.generative_pred, none.generative_valid) == (0.0, None, False)
    assert none.to_json()["generative_valid"] is False


def test_generation_scores():
    yn = item(type="yes_no", answer="yes")
    assert score_generation(yn, "Yes.").score == 1.0
    bad = score_generation(yn, "Maybe")
    assert (bad.score, bad.valid) == (0.0, False)
    cls = item(type="classification", labels=["bullish", "bearish"], answer="bearish")
    assert score_generation(cls, "Bearish, because ...").score == 1.0
    sa = item(type="short_answer", answer="sinoatrial node", aliases=["SA node"])
    s = score_generation(sa, "The SA node.\nIt sets the pace.")
    assert (s.score, s.pred, s.rouge_l) == (1.0, "The SA node.", 0.8)  # rouge_score keeps "the"
    near = score_generation(sa, "the sinoatrial node of the heart")
    assert (near.score, near.rouge_l) == (0.0, 0.5)  # LCS 2 of 6 and 2 tokens


def test_user_text_per_format():
    assert user_text(item(type="multiple_choice", options=["a", "b"], answer="A")) == "Q?"
    assert user_text(item(type="yes_no", answer="no", input="ctx")).endswith(
        "Q?\n\nctx\n\nAnswer yes or no.")
    assert "Answer with one of: up, down." in user_text(
        item(type="classification", labels=["up", "down"], answer="up"))


# ---------------------------------------------------------------- statistics
def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    gold = ["yes", "no", "yes", "yes", "no", "no", "yes"]
    pred = ["yes", "yes", None, "yes", "no", None, "no"]
    classes = sorted(set(gold) | {p for p in pred if p})
    want = f1_score(gold, [p or "<invalid>" for p in pred], labels=classes, average="macro")
    assert macro_f1(gold, pred) == pytest.approx(want)
    ci = macro_f1_ci(gold, pred, resamples=200)
    assert ci["mean"] == pytest.approx(want, abs=1e-4) and ci["ci"][0] <= ci["ci"][1]


def test_bootstrap_intervals_are_fixed_and_sane():
    v = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    a, b = mean_ci(v), mean_ci(v)
    assert a == b and a["mean"] == 0.7 and a["ci"][0] < 0.7 < a["ci"][1]
    assert mean_ci([1, 1, 1])["ci"] == [1.0, 1.0]
    same = paired_diff(v, v)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["p_not_better"] == 1.0
    better = paired_diff([1] * 10, v)
    assert better["diff"] == pytest.approx(0.3) and better["ci"][0] >= 0
    with pytest.raises(ValueError):
        paired_diff([1, 0], [1])


# ---------------------------------------------------------------- the shipped lm-eval task
def test_lm_eval_task_yaml_loads_and_matches_the_eval_set(monkeypatch):
    """lm-eval itself loads the shipped task: finance's multiple-choice items, right answers."""
    from lm_eval.tasks import TaskManager

    from tests.conftest import REPO

    monkeypatch.chdir(REPO)  # the task's data path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(REPO / "evaluation" / "lm_eval_tasks"))
    task = tm.load("selfspec_finance_mc")["tasks"]["selfspec_finance_mc"]
    docs = list(task.test_docs())
    mc = [it for it in load_domain("finance").eval_items if it.type == "multiple_choice"]
    assert len(docs) == len(mc) > 0
    for doc, it in zip(docs, mc):
        assert task.doc_to_text(doc) == user_text(it)
        assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == \
            it.options[ord(it.answer) - 65]
