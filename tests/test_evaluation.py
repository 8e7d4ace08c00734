"""`selfspec eval` without models: evaluate -> report on a fake backend, bad input failing early."""

from __future__ import annotations

import json

import pytest

from core.errors import ConfigError
from core.eval_formats import letter_text, user_text
from core.seeds import load_domain
from evaluation.backends import Result, Served
from evaluation.config import build_eval_config
from evaluation.report import format_table, write_outputs
from evaluation.run import evaluate, limit_items
from selfspec.cli import main


def test_limit_spreads_over_types():
    items = load_domain("finance").eval_items
    picked = limit_items(items, 8)
    assert len(picked) == 8
    assert {it.type for it in picked} == {"multiple_choice", "yes_no", "short_answer",
                                          "classification"}
    assert picked == sorted(picked, key=items.index)
    assert limit_items(items, None) is items


# ---------------------------------------------------------------- evaluate, with a fake backend
class FakeTokens:
    """Characters as token ids; the chat 'template' is a fixed wrapper."""

    def chat(self, user):
        return tuple(ord(c) for c in f"<u>{user}</u><a>")

    def text(self, text):
        return tuple(ord(c) for c in text)


class FakeBackend:
    """Each expert knows its own domain perfectly and nothing else; the base model knows
    nothing. The router sends every item to the expert named after its domain. Asked for a
    letter, who knows answers "The answer is (X)."; who does not, "I am not sure." (no letter)."""

    def __init__(self, domains):
        self.tokens = FakeTokens()
        self.by_user = {user_text(it): (d, it) for d, its in domains.items() for it in its}
        self.letters = {letter_text(it): (d, it) for d, its in domains.items() for it in its
                        if it.type == "multiple_choice"}
        self.closed = False
        self.by_user |= self.letters

    def route(self, users):
        return [self.by_user[u][0] if self.by_user[u][0] != "law" else None for u in users]

    def complete(self, requests, progress):
        out = []
        for r in requests:
            text = "".join(map(chr, r.prompt_ids))
            user = text[3:text.index("</u><a>")]
            domain, it = self.by_user[user]
            knows = r.target == domain
            if user in self.letters:
                assert not r.logprobs and r.max_tokens == 8
                out.append(Result(f"The answer is ({it.answer})." if knows else "I am not sure."))
            elif r.logprobs:
                option = text[text.index("</u><a>") + 7:]
                right = option == it.options[ord(it.answer) - 65]
                # who knows prefers the right option, who does not prefers any other one
                lp = (-0.01 if right else -1.0) if knows else (-2.0 if right else -1.0)
                out.append(Result("", tuple([None] + [-5.0] * (len(text) - len(option) - 1)
                                            + [lp] * len(option))))
            elif knows:
                out.append(Result({"yes_no": it.answer, "classification": it.answer or ""}
                                  .get(it.type, it.answer)))
            else:
                out.append(Result("I am not sure."))
        progress(len(requests))
        return out

    def close(self):
        self.closed = True


@pytest.fixture
def fake_served(monkeypatch, tmp_path):
    served = Served("vllm", {"spec": "fake-base", "path": "/fake"},
                    {"finance": {"version": 1, "lora_name": "finance@v1"},
                     "law": {"version": 2, "lora_name": "law@v2"}}, {}, 7)
    (tmp_path / "registry.json").write_text("{}")
    monkeypatch.setattr("evaluation.backends.plan_direct",
                        lambda experts_dir, want: (served, None, None))
    return tmp_path


def test_evaluate_with_fake_backend(fake_served, tmp_path):
    backends = []

    def factory(plan):
        backends.append(FakeBackend(plan.domains))
        return backends[-1]

    cfg = build_eval_config(experts_dir=fake_served, domains=["finance", "law"], limit=8,
                            out=tmp_path / "out", resamples=200)
    report, rows = evaluate(cfg, backend_factory=factory, progress=_Bar())
    assert backends[0].closed
    assert report["targets"] == ["base", "finance", "law", "auto"]
    assert report["columns"] == ["finance", "law", "mixed"]
    res = report["results"]
    assert res["finance"]["finance"]["score"]["mean"] == 1.0
    assert res["finance"]["law"]["score"]["mean"] == 0.0  # forgot everything else
    assert res["base"]["mixed"]["score"]["mean"] == 0.0
    # auto: finance items to the finance expert, law items to the base model (router says none)
    assert res["auto"]["finance"]["score"]["mean"] == 1.0
    assert res["auto"]["law"]["score"]["mean"] == 0.0
    assert report["routing"] == {"finance": {"finance": 8}, "law": {"base": 8}}
    cmp = report["comparisons"]
    assert cmp["expert_vs_base"]["finance"]["diff"] == 1.0
    assert cmp["auto_vs_base"]["mixed"]["diff"] == 0.5
    assert report["summary"] == {"experts_beat_base": ["finance", "law"], "experts_compared": 2,
                                 "auto_beats_base_on_mixed": True}
    cell = res["law"]["law"]
    assert set(cell) == {"n", "score", "score_generative", "multiple_choice", "yes_no",
                         "classification", "short_answer"}
    assert set(cell["yes_no"]) == {"n", "accuracy", "macro_f1", "invalid"}
    assert set(cell["multiple_choice"]) == {"n", "acc", "acc_norm", "generative",
                                            "generative_invalid"}
    assert res["base"]["law"]["yes_no"]["invalid"] == 1.0
    # generative multiple choice, beside the cloze score
    assert res["finance"]["finance"]["multiple_choice"]["generative"]["mean"] == 1.0
    assert res["finance"]["finance"]["score_generative"]["mean"] == 1.0
    assert res["base"]["finance"]["multiple_choice"]["generative_invalid"] == 1.0
    assert res["base"]["mixed"]["score_generative"] == res["base"]["mixed"]["score"]
    gen = cmp["generative"]
    assert gen["expert_vs_base"]["finance"]["diff"] == 1.0 and \
        gen["auto_vs_base"]["mixed"]["diff"] == 0.5
    assert report["registry"]["revision"] == 7 and report["backend"]["kind"] == "vllm"
    assert len(rows) == 4 * 16 and {r["routed_to"] for r in rows if r["target"] == "auto"} == \
        {"finance", "base"}

    paths = write_outputs(report, rows, cfg.out)
    assert sorted(p.name for p in cfg.out.iterdir()) == sorted(p.name for p in paths) == \
        ["eval.json", "eval.md", "eval_heatmap.png", "eval_items.jsonl"]
    assert json.loads((cfg.out / "eval.json").read_text())["schema_version"] == 1
    assert (cfg.out / "eval_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(report)
    assert "| finance | **1.00 [1.00, 1.00]** | 0.00 [0.00, 0.00] |" in table
    assert "| auto − base | mixed | +0.500" in table
    assert "Paired differences in score_generative" in table
    from bench.results import eval_section  # README Results: generative beside cloze

    readme = "\n".join(eval_section(report, "docs/results"))
    assert readme.count("| finance − base on finance | +1.000 |") == 2
    assert "\"Answer with the letter.\"" in readme
    assert "| base | 0.00 | 0.00 | 0.00 | 1.00 |" in table  # MC acc, acc_norm, letter, no letter
    mc_rows = [r for r in rows if r["type"] == "multiple_choice"]
    assert all(r["generative_reply"] for r in mc_rows)
    assert all(r["generative_routed_to"] == r["routed_to"] for r in mc_rows
               if r["target"] == "auto")


def test_auto_routes_the_generative_turn_on_its_own(fake_served, tmp_path):
    """The options-listed turn is routed as the server would route it: here the router sends
    it to the base model, so auto's letter comes from base while its cloze is the expert's."""

    class Split(FakeBackend):
        def route(self, users):
            return [None if u in self.letters else self.by_user[u][0] for u in users]

    cfg = build_eval_config(experts_dir=fake_served, domains=["finance"], limit=8,
                            targets=["base", "auto"], resamples=100)
    report, rows = evaluate(cfg, backend_factory=lambda plan: Split(plan.domains),
                            progress=_Bar())
    auto = report["results"]["auto"]["finance"]["multiple_choice"]
    assert auto["acc_norm"]["mean"] == 1.0 and auto["generative"]["mean"] == 0.0
    assert auto["generative_invalid"] == 1.0
    mc = [r for r in rows if r["target"] == "auto" and r["type"] == "multiple_choice"]
    assert mc and all((r["routed_to"], r["generative_routed_to"]) == ("finance", "base")
                      and r["generative_reply"] == "I am not sure." for r in mc)


def test_auto_only_scores_just_the_routed_cells(fake_served, tmp_path):
    seen = []

    class Recording(FakeBackend):
        def complete(self, requests, progress):
            seen.extend({r.target for r in requests})
            return super().complete(requests, progress)

    cfg = build_eval_config(experts_dir=fake_served, domains=["finance", "law"], limit=4,
                            targets=["auto"], resamples=100)
    report, _ = evaluate(cfg, backend_factory=lambda plan: Recording(plan.domains),
                         progress=_Bar())
    assert report["targets"] == ["auto"] and set(seen) == {"finance", "base"}
    assert report["comparisons"] == {
        "expert_vs_base": {}, "auto_vs_base": {},
        "generative": {"expert_vs_base": {}, "auto_vs_base": {}}}
    assert report["summary"]["auto_beats_base_on_mixed"] is None


class _Bar:
    def update(self, n):
        pass

    def close(self):
        pass


# ---------------------------------------------------------------- bad input
def _no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded for bad input")
    monkeypatch.setattr("evaluation.run.open_backend", boom)
    monkeypatch.setattr("evaluation.backends.DirectBackend", boom)
    monkeypatch.setattr("evaluation.backends.HttpBackend", boom)


@pytest.mark.parametrize("args,message", [
    (["--domains", "astrology"], "unknown domain 'astrology'"),
    (["--targets", "base,wizard"], "unknown target 'wizard'"),
    (["--limit", "0"], "--limit"),
    (["--endpoint", "localhost:8000"], "not an http(s) URL"),
    (["--endpoint", "http://127.0.0.1:9"], "cannot reach the endpoint"),
])
def test_bad_input_fails_fast_one_line(fake_served, monkeypatch, capsys, args, message):
    _no_model(monkeypatch)
    code = main(["eval", "--experts-dir", str(fake_served), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("selfspec: error:"), err


@pytest.mark.parametrize("targets", ["experts", "auto", "base,finance"])
def test_no_registry_no_experts(tmp_path, monkeypatch, capsys, targets):
    _no_model(monkeypatch)
    code = main(["eval", "--experts-dir", str(tmp_path / "none"), "--targets", targets])
    err = capsys.readouterr().err
    assert code == 2 and "no expert registry" in err and "selfspec specialize --all" in err


def test_empty_registry_has_no_servable_experts(tmp_path, monkeypatch, capsys):
    from core.registry import Registry, write_registry

    _no_model(monkeypatch)
    write_registry(tmp_path, Registry())
    code = main(["eval", "--experts-dir", str(tmp_path), "--targets", "base,experts"])
    assert code == 2 and "has no servable experts" in capsys.readouterr().err


def test_config_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="invalid eval arguments"):
        build_eval_config(targets=[" ", ""])


def test_api_key_is_not_recorded():
    from evaluation.cli import _command_line

    assert _command_line(["eval", "--api-key", "sk-1", "--endpoint", "http://x"]) == \
        "selfspec eval --api-key '***' --endpoint http://x"
    assert "sk-2" not in _command_line(["eval", "--api-key=sk-2"])


def test_precision_note_names_the_dtype_and_the_cpu_isa():
    from evaluation.report import precision_note

    cpu = {"base_model": {"spec": "m", "precision": {"dtype": "float32", "gpu": False,
                                                      "cpu": {"isa": "avx512f"}}}}
    assert precision_note(cpu["base_model"]) == ", dtype float32 (CPU isa avx512f)"
    assert precision_note({"precision": {"dtype": "auto", "gpu": True}}) == ", dtype auto (GPU)"
    assert precision_note({"spec": "m"}) == ""  # a report from before precision was recorded
