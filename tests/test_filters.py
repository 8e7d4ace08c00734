from specialize.config import FilterConfig, ResponseFilterConfig
from specialize.filter import InstructionFilter
from specialize.filter_responses import response_verdict
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
