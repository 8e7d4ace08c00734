import pytest
from pydantic import ValidationError

from specialize.config import FilterConfig, ResponseFilterConfig
from specialize.filter import InstructionFilter
from specialize.filter_responses import echo_share, response_verdict
from specialize.prompts import Task

SEEDS = [Task("Explain what a bond is to a new investor."), Task("Compute simple interest.")]
EVAL = ["What is the duration of a ten year zero coupon bond held by a pension fund today?"]


def make():
    return InstructionFilter(FilterConfig(), SEEDS, EVAL)


def test_each_rejection_reason():
    f = make()
    assert f.check(Task("Define beta.")).reason == "too_short"
    assert f.check(Task(" ".join(["word"] * 151))).reason == "too_long"
    assert f.check(Task("Draw a graph of the yield curve over time.")).reason == "not_text_task"
    assert f.check(Task("Summarize the following passage for a client.", "<input text>")
                   ).reason == "placeholder"
    v = f.check(Task("Explain what a bond is to a new investor, please."))
    assert v.reason == "near_duplicate" and "seed:" in v.detail
    v = f.check(Task("Tell me: the duration of a ten year zero coupon bond held by a pension fund?"))
    assert v.reason == "eval_contamination"
    assert f.kept == 0


def test_kept_items_join_the_pool():
    f = make()
    assert f.check(Task("List three risks of holding high-yield corporate debt.")).reason is None
    v = f.check(Task("List three risks of holding high yield corporate debt"))
    assert v.reason == "near_duplicate" and "generated:" in v.detail
    assert f.check(Task("How does inflation erode the real return of savings?")).reason is None
    assert f.kept == 2


def test_response_filter_reasons():
    cfg = ResponseFilterConfig()
    assert response_verdict({"response": " "}, cfg)[0] == "empty"
    assert response_verdict({"response": "A bond is", "finish_reason": "length"}, cfg)[0] == \
        "truncated"
    assert response_verdict({"response": "Buy.\nBuy.\nBuy.\n"}, cfg)[0] == "repetition"
    loop = "the rate is high and " * 20
    assert response_verdict({"response": loop, "finish_reason": "stop"}, cfg)[0] == "repetition"
    ok = "A bond is a loan to an issuer that pays interest and returns principal at maturity."
    assert response_verdict({"response": ok, "finish_reason": "stop"}, cfg) == (None, "")


def test_echo_rule_is_off_by_default_and_drops_a_restated_task_when_on():
    row = {"instruction": "What is the main purpose of a central bank in an economy?", "input": "",
           "response": "The main purpose of a central bank is the economy.", "finish_reason": "stop"}
    assert response_verdict(row, ResponseFilterConfig()) == (None, "")
    reason, detail = response_verdict(row, ResponseFilterConfig(max_echo_share=0.8))
    assert reason == "echo" and detail == "100% of 5 content words from the task"
    # An answer that brings its own words is kept even though it reuses the question's.
    row["response"] = ("A central bank sets interest rates and the money supply to keep prices "
                       "stable and lends to banks in a crisis.")
    assert response_verdict(row, ResponseFilterConfig(max_echo_share=0.8)) == (None, "")
    # Copying the input counts like copying the instruction.
    copied = {"instruction": "Which sentence contains a missing word?",
              "input": "The contract will be signed within two months without notice.",
              "response": "The contract will be signed within two months without notice."}
    assert response_verdict(copied, ResponseFilterConfig(max_echo_share=0.8))[0] == "echo"


def test_echo_rule_spares_closed_form_answers():
    cfg = ResponseFilterConfig(max_echo_share=0.5)
    math = {"instruction": "If x = 13 and y = 26, what is y / 2?", "input": ""}
    # Numbers neither echo nor count as the answer's own words.
    assert echo_share("Answer: 13", math["instruction"]) == (0.0, 1)  # only "answer" counts
    assert echo_share("x = 13, y = 26", math["instruction"]) == (0.0, 0)
    assert response_verdict({**math, "response": "Answer: 13"}, cfg) == (None, "")
    yes_no = {"instruction": "Is a bond's price inversely related to its market interest rate?",
              "input": ""}
    for short in ("Yes.", "Yes, a bond's price is inversely related.", "B) 4%", "No"):
        assert response_verdict({**yes_no, "response": short}, cfg) == (None, "")
    # The guard is the answer's count of content words, not its length in characters.
    long_echo = {**yes_no, "response": "Yes, a bond's price is inversely related to its "
                 "market interest rate."}
    assert response_verdict(long_echo, cfg)[0] == "echo"
    assert response_verdict(long_echo, ResponseFilterConfig(max_echo_share=0.5,
                                                             echo_min_words=8)) == (None, "")


def test_echo_config_is_validated():
    with pytest.raises(ValidationError):
        ResponseFilterConfig(max_echo_share=0)
    with pytest.raises(ValidationError):
        ResponseFilterConfig(max_echo_share=1.5)
    with pytest.raises(ValidationError):
        ResponseFilterConfig(echo_min_words=0)


def test_echo_rule_is_reached_from_the_command_line():
    from selfspec.cli import build_parser
    from specialize.cli import flag_settings
    from specialize.config import resolve_config

    args = build_parser().parse_args(["specialize", "finance", "--set",
                                      "responses.max_echo_share=0.8"])
    cfg = resolve_config(args.config, flag_settings(args), args.set)
    assert cfg.responses.max_echo_share == 0.8 and cfg.responses.echo_min_words == 5
