"""The validation gain (specialize/gain.py) on a tiny random Llama with a real PEFT adapter: the
shared-context likelihoods equal whole-sequence ones, the adapter-off pass is the base model, and an
expert is measured better exactly where the answers are the ones it prefers."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from core.registry import GainInfo
from core.seeds import EvalItem, load_domain
from specialize.config import GainConfig, TrainConfig
from specialize.gain import (
    chat_ids,
    continuation_logliks,
    load_validation,
    measure_gain,
    score_items,
)
from tests.conftest import write_domain

QUESTIONS = [
    "Which organ pumps blood through the body?", "Which metal is liquid at room temperature?",
    "What does a central bank set to steer inflation?", "Which court hears appeals last?",
    "Which planet is closest to the sun?", "What is the square root of 81?",
    "Which gas do plants take in for photosynthesis?", "What does GDP measure?",
    "Who signs a bill into law in the United States?", "Which number is prime?",
]
OPTIONS = [["Heart", "Liver", "Lung", "Kidney"], ["Mercury", "Iron", "Lead", "Tin"],
           ["Interest rates", "Tax rates", "Tariffs", "Wages"],
           ["Supreme court", "District court", "Small claims", "Traffic court"],
           ["Mercury", "Venus", "Earth", "Mars"], ["9", "8", "7", "81"],
           ["Carbon dioxide", "Oxygen", "Nitrogen", "Helium"],
           ["Output", "Debt", "Prices", "Savings"],
           ["The president", "A judge", "A mayor", "A senator"], ["7", "8", "9", "10"]]


def items(answers: list[str]) -> list[EvalItem]:
    """Five multiple-choice and five yes/no items; answers[i] is a letter or yes/no."""
    out = []
    for i, (q, a) in enumerate(zip(QUESTIONS, answers)):
        if i % 2 == 0:
            out.append(EvalItem(id=f"v{i}", type="multiple_choice", question=q,
                                options=OPTIONS[i], answer=a))
        else:
            out.append(EvalItem(id=f"v{i}", type="yes_no", question=q, answer=a))
    return out


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    """The tiny Llama in fp32 with a random (nonzero) LoRA adapter, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.integration.tiny_model import build_tiny_llama

    base = build_tiny_llama(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(8.0)  # far enough from the base that its choices differ
    model.eval()
    return model, AutoTokenizer.from_pretrained(base), base


def reference_loglik(model, ctx, cont) -> float:
    ids = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_shared_context_logliks_equal_one_sequence_at_a_time(peft_model):
    model, tok, _ = peft_model
    opts = [o for o in OPTIONS[:4]]
    opts[3] = opts[3] + ["The supreme court of the whole land"]  # rows of different lengths
    pairs = [(chat_ids(tok, q), tuple(tok.encode(o, add_special_tokens=False)))
             for q, group in zip(QUESTIONS[:4], opts) for o in group]
    assert len({len(c) for _, c in pairs}) >= 3  # 1-token and longer continuations, padded
    got = continuation_logliks(model, pairs)  # each context once, its KV cache for both options
    want = [reference_loglik(model, c, t) for c, t in pairs]
    assert got == pytest.approx(want, abs=1e-3)
    assert all(v < 0 for v in got)


def preferred_answers(model, tok) -> list[str]:
    """Each item's answer as `model` scores it: a set the model gets all right."""
    probe = items(["A", "yes"] * 5)
    answers = []
    for it in probe:
        for cand in (["A", "B", "C", "D"] if it.type == "multiple_choice" else ["yes", "no"]):
            if score_items(model, tok, [it.model_copy(update={"answer": cand})]) == [1.0]:
                answers.append(cand)
                break
    assert len(answers) == len(probe)
    return answers


def test_gain_is_positive_where_the_expert_is_right_and_negative_where_the_base_is(peft_model):
    model, tok, _ = peft_model
    expert_answers = preferred_answers(model, tok)
    with model.disable_adapter():
        base_answers = preferred_answers(model, tok)
    differ = sum(a != b for a, b in zip(expert_answers, base_answers))
    assert differ >= 2, "the random adapter should change some choices"

    cfg = GainConfig(resamples=200)
    up = GainInfo(**measure_gain(model, tok, items(expert_answers), cfg))
    assert up.expert == 1.0 and up.base == pytest.approx(1 - differ / 10)
    assert up.diff == pytest.approx(differ / 10) and up.n == 10 and up.helps()
    assert up.ci[0] <= up.diff <= up.ci[1] and up.p_not_better < 0.5

    down = GainInfo(**measure_gain(model, tok, items(base_answers), cfg))
    assert down.base == 1.0 and down.diff == pytest.approx(-differ / 10)
    assert not down.helps() and down.p_not_better == 1.0
    assert not model.training  # the model is left as it was found


def test_a_zero_adapter_measures_no_gain(peft_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok, base = peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gain = measure_gain(model, tok, items(["A", "yes", "B", "no", "C", "yes", "D", "no", "A",
                                           "yes"]), GainConfig(resamples=200))
    assert gain["diff"] == 0.0 and gain["expert"] == gain["base"]
    assert gain["p_not_better"] == 1.0 and not GainInfo(**gain).helps()
    assert model.training  # a model in training mode is put back in training mode


def test_train_adapter_stores_the_gain(peft_model, tmp_path):
    from specialize.train import train_adapter

    _, _, base = peft_model
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": o[0]}) + "\n"
                            for q, o in zip(QUESTIONS, OPTIONS)))
    val = items(["A", "yes", "B", "no", "C", "yes", "D", "no", "A", "yes"])
    res = train_adapter(base, TrainConfig(epochs=1, batch_size=4, max_seq_len=128, threads=2),
                        data, tmp_path / "out", val, GainConfig(resamples=100))
    gain = GainInfo(**res["gain"])
    assert gain.n == 10 and gain.metric == "validation_score"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["result"]["gain"] == \
        res["gain"]
    assert "gain" not in train_adapter(base, TrainConfig(epochs=0.5, batch_size=4, threads=2),
                                       data, tmp_path / "out2")


def test_load_validation_skips_generated_types_and_limits_round_robin(tmp_path):
    folder = write_domain(tmp_path)
    rows = [{"id": f"m{i}", "type": "multiple_choice", "question": f"Question {i}?",
             "options": ["a", "b"], "answer": "A"} for i in range(4)]
    rows += [{"id": f"y{i}", "type": "yes_no", "question": f"Is {i} even?", "answer": "no"}
             for i in range(2)]
    rows += [{"id": "s", "type": "short_answer", "question": "Name one.", "answer": "x"}]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    domain = load_domain(str(folder))
    assert [i.id for i in load_validation(domain, GainConfig())] == \
        ["m0", "m1", "m2", "m3", "y0", "y1"]
    assert [i.id for i in load_validation(domain, GainConfig(max_items=3))] == ["m0", "y0", "m1"]
    assert load_validation(domain, GainConfig(enabled=False)) == []
    (folder / "validation.jsonl").unlink()
    assert load_validation(domain, GainConfig()) == []


def test_a_bad_validation_file_fails_before_any_model(tmp_path):
    from core.errors import SeedError

    folder = write_domain(tmp_path)
    (folder / "validation.jsonl").write_text('{"id": "x", "type": "yes_no", "question": "Q?", '
                                             '"answer": "maybe"}\n')
    with pytest.raises(SeedError, match="validation.jsonl:1"):
        load_validation(load_domain(str(folder)), GainConfig())


def test_the_run_summary_shows_each_experts_gain():
    from specialize.pipeline import format_summary

    row = {"domain": "law", "version": 1, "candidates": 10, "kept_instructions": 8,
           "train_examples": 8, "loss_first": 2.0, "loss_last": 1.0,
           "rejected_instructions": {}, "rejected_responses": {}, "seconds": {"train": 1.0}}
    gain = {"metric": "validation_score", "expert": 0.4, "base": 0.45, "diff": -0.05,
            "ci": [-0.12, 0.02], "p_not_better": 0.93, "n": 64}
    text = format_summary([{**row, "gain": gain}, {**row, "domain": "math", "gain": None}])
    assert "law          -0.050 vs base on validation (95% CI -0.120..+0.020, p 0.93, n 64)" \
        in text
    assert "math         not measured" in text
    assert "validation" not in format_summary([{**row, "gain": None}])
