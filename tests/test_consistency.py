"""Self-consistency on closed-form answers (specialize/consistency.py): which tasks are
closed-form, the label an answer gives, stage 3 sampling the votes in one `n` request per
closed-form prompt, and stage 4 keeping an answer only when the majority backs it."""

from __future__ import annotations

from collections import Counter

import pytest

from core.engine import Completion
from core.errors import ConfigError
from core.jsonl import append_jsonl, read_jsonl
from core.seeds import load_domain
from specialize.config import RespondConfig, ResponseFilterConfig, build_config, resolve_config
from specialize.consistency import answer_label, closed_form, consistency_verdict
from specialize.filter_responses import filter_responses
from specialize.respond import generate_responses
from tests.conftest import write_domain

MC_INPUT = "A) Reliance damages B) Expectation damages C) Restitution D) Rescission"


# ---- which tasks are closed-form -----------------------------------------------------------------

@pytest.mark.parametrize("instruction, task_input, form, labels", [
    ("Is hemophilia A inherited in an X-linked recessive pattern?", "", "yes_no", ("yes", "no")),
    ("When market interest rates rise, do prices of existing bonds tend to fall?", "", "yes_no",
     ("yes", "no")),
    ("Are antibiotics useful here? Answer yes or no with a brief justification.", "", "yes_no",
     ("yes", "no")),
    ("Which remedy protects the expectation interest?", MC_INPUT, "multiple_choice",
     ("A", "B", "C", "D")),
    ("Label the sentiment of this headline as positive, negative or neutral.", "Shares slide.",
     "classification", ("positive", "negative", "neutral")),
    ("Identify the main area of law: contract, tort or criminal.", "A bylaw.", "classification",
     ("contract", "tort", "criminal")),
])
def test_closed_forms_are_read_from_the_task(instruction, task_input, form, labels):
    got = closed_form(instruction, task_input)
    assert got is not None and (got.form, got.labels) == (form, labels)


@pytest.mark.parametrize("instruction", [
    "Explain how a bond's price relates to market interest rates.",
    "Can you explain how a bond's price relates to market interest rates?",  # a request
    "Is the defamatory statement libel or slander?",  # either-or: no yes/no answer
    "Explain risk factors such as smoking or obesity.",  # examples, not labels
    "What is the mechanism of action of omeprazole?",
    "Summarize the passage in two sentences.",
])
def test_open_tasks_are_not_closed_form(instruction):
    assert closed_form(instruction, "Some input text.") is None


def test_multiple_choice_options_keep_their_texts():
    form = closed_form("Which remedy?", MC_INPUT)
    assert form.options == ("Reliance damages", "Expectation damages", "Restitution",
                            "Rescission")


@pytest.mark.parametrize("task_input, answer, label", [
    ("", "Yes. The factor VIII gene lies on the X chromosome.", "yes"),
    ("", "No, antibiotics act on bacteria, not viruses.", "no"),
    ("", "The answer is yes.", "yes"),
    ("", "Antibiotics act on bacteria.", None),
    (MC_INPUT, "B) Expectation damages protect the expectation interest.", "B"),
    (MC_INPUT, "(C)", "C"),
    (MC_INPUT, "Answer: D", "D"),
    (MC_INPUT, "Expectation damages. They put the claimant where performance would have.", "B"),
    (MC_INPUT, "A court decides what is fair.", None),
    (MC_INPUT, "E) none of these", None),  # no option E
])
def test_the_label_is_read_from_the_answer_s_start(task_input, answer, label):
    question = "Which remedy applies?" if task_input else "Is it inherited?"
    assert answer_label(answer, closed_form(question, task_input)) == label


@pytest.mark.parametrize("answer, label", [
    ("Negative. Falling shares point to weaker profitability.", "negative"),
    ("The tone is neutral. Nothing changed, so not positive.", "neutral"),
    ("Falling shares. This is negative news.", None),  # the first sentence names no label
])
def test_a_classification_label_is_the_first_one_the_first_sentence_names(answer, label):
    form = closed_form("Label the tone as positive, negative or neutral.", "Shares slide.")
    assert answer_label(answer, form) == label


def test_the_shipped_seeds_closed_forms_are_detected_and_labelled():
    """The seeds carry a `type`; generated tasks do not, so the form detector is checked on
    the seeds: no open seed is taken for closed-form, every multiple-choice seed and nearly
    every yes/no seed is found, and their own answers give a label."""
    found, labelled = Counter(), Counter()
    for name in ("biomedicine", "finance", "law", "math"):
        for seed in load_domain(name).seeds:
            kind = seed.type if seed.type in ("yes_no", "multiple_choice",
                                              "classification") else "open"
            form = closed_form(seed.instruction, seed.input)
            found[kind, form.form if form else None] += 1
            if form:
                labelled[answer_label(seed.output, form) is not None] += 1
    open_total = sum(n for (kind, _), n in found.items() if kind == "open")
    assert found["open", None] == open_total > 100  # no open seed taken for closed-form
    assert found["multiple_choice", "multiple_choice"] >= 30
    assert found["multiple_choice", None] == 0
    assert found["yes_no", "yes_no"] >= 0.9 * (found["yes_no", "yes_no"] + found["yes_no", None])
    assert found["classification", "classification"] >= 15  # those that list their labels
    assert labelled[True] >= 0.95 * (labelled[True] + labelled[False])


# ---- the vote ------------------------------------------------------------------------------------

def _record(votes, form="yes_no", labels=("yes", "no")):
    return {"form": form, "labels": list(labels), "options": [], "votes": list(votes)}


@pytest.mark.parametrize("votes, kept", [
    (["yes", "yes", "yes", "yes"], True),
    (["yes", "yes", "no", None], True),  # half, and more than any other label
    (["yes", "yes", "no", "no"], False),  # a tie is no majority
    (["yes", None, None, None], False),  # one vote of four is not half
    (["no", "no", "no", "yes"], False),
])
def test_the_answer_is_kept_only_when_the_majority_gives_its_label(votes, kept):
    reason, detail = consistency_verdict("Yes. Because.", _record(votes))
    assert (reason is None) == kept
    if not kept:
        assert reason == "inconsistent" and "4 samples" in detail


def test_a_closed_form_answer_without_a_label_is_rejected_as_such():
    reason, detail = consistency_verdict("It depends on many things.", _record(["yes"] * 4))
    assert reason == "no_label" and "yes/no" in detail


# ---- stages 3 and 4 with a fake engine -----------------------------------------------------------

TASKS = {
    "demo-yes": ("Is hemophilia A inherited in an X-linked recessive pattern?", "",
                 "Yes. The gene lies on the X chromosome.", ["Yes.", "yes, it is", "Yes.", "No."]),
    "demo-mc": ("Which remedy protects the expectation interest?", MC_INPUT,
                "A) Reliance damages.", ["B) Expectation", "B", "A) Reliance", "Answer: B"]),
    "demo-open": ("Explain what a tort is in plain words.", "",
                  "A tort is a civil wrong that causes harm.", None),
}


class Voter:
    """Answers each task with its canned answer; with Sampling.n > 1 returns the task's canned
    samples in `Completion.samples`, as the vLLM generator does. Records every call."""

    def __init__(self):
        self.calls = []

    def complete(self, prompts, sampling, adapter=None):
        self.calls.append((prompts, sampling))
        out = []
        for p in prompts:
            # the new task closes the prompt, after the seed demos
            key = next(k for k, (instruction, *_) in TASKS.items() if instruction in p[-400:])
            _, _, answer, samples = TASKS[key]
            if sampling.n > 1:
                out.append(Completion(samples[0], "stop", len(p), 0, tuple(samples)))
            else:
                out.append(Completion(answer, "stop", len(p), 0))
        return out


@pytest.fixture
def workdir(tmp_path):
    write_domain(tmp_path / "seeds")
    domain = load_domain("demo", tmp_path / "seeds")
    append_jsonl(tmp_path / "filter" / "kept.jsonl",
                 [{"id": k, "instruction": i, "input": x} for k, (i, x, *_) in TASKS.items()])
    return domain, tmp_path


def test_votes_are_sampled_once_per_closed_form_prompt_and_decide_stage_4(workdir):
    domain, tmp = workdir
    gen = Voter()
    generate_responses(domain, RespondConfig(self_consistency=4, retrieval="none"), gen, tmp)

    greedy, sampled = gen.calls  # one batch: the answers, then one request per closed prompt
    assert greedy[1].n == 1 and greedy[1].temperature == 0.0 and len(greedy[0]) == 3
    assert sampled[1].n == 4 and sampled[1].temperature == 0.7
    assert sampled[0] == [p for p in greedy[0] if "Explain what a tort" not in p[-200:]]
    rows = {r["id"]: r for r in read_jsonl(tmp / "respond" / "responses.jsonl")}
    assert rows["demo-yes"]["consistency"]["votes"] == ["yes", "yes", "yes", "no"]
    assert rows["demo-mc"]["consistency"]["votes"] == ["B", "B", "A", "B"]
    assert "consistency" not in rows["demo-open"]  # open-ended: never sampled

    summary = filter_responses(ResponseFilterConfig(), tmp)
    assert summary["rejected"] == {"inconsistent": 1} and summary["closed_form_voted"] == 2
    assert [r["id"] for r in read_jsonl(tmp / "respond_filter" / "train.jsonl")] == \
        ["demo-yes", "demo-open"]
    (rejected,) = read_jsonl(tmp / "respond_filter" / "rejected.jsonl")
    assert rejected["id"] == "demo-mc" and rejected["reason"] == "inconsistent"
    assert rejected["detail"] == "answer A; 4 samples: B 3, A 1"


def test_off_by_default_nothing_is_sampled_and_nothing_voted(workdir):
    domain, tmp = workdir
    gen = Voter()
    generate_responses(domain, RespondConfig(retrieval="none"), gen, tmp)
    assert len(gen.calls) == 1 and gen.calls[0][1].n == 1
    assert not any("consistency" in r for r in read_jsonl(tmp / "respond" / "responses.jsonl"))
    summary = filter_responses(ResponseFilterConfig(), tmp)
    assert summary == {"responses": 3, "kept": 3, "rejected": {}}


def test_one_sample_is_refused_with_a_one_line_reason():
    with pytest.raises(ConfigError, match="respond.self_consistency: .*1 sample is no majority"):
        build_config(respond={"self_consistency": 1})
    with pytest.raises(ConfigError, match="self_consistency"):
        resolve_config(settings=["respond.self_consistency=-2"])
    assert resolve_config(settings=["respond.self_consistency=4"]).respond.self_consistency == 4
    assert RespondConfig().self_consistency == 0  # off until measured
