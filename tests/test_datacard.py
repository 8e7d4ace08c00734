"""The data card from a work dir's files, `--stop-after` with a fake engine (stop, preview,
resume), and the card published beside the adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.jsonl import read_jsonl, write_jsonl
from core.registry import load_registry
from core.seeds import load_domain
from specialize.config import build_config
from specialize.datacard import build_data_card, format_data_card, write_data_card
from specialize.pipeline import specialize
from tests.conftest import FakeGenerator, seeds_dir


class WordEncoder:
    """A text is on the axis of the first of these words it contains (else the last axis)."""

    name, dim = "words", 4
    WORDS = ("alpha", "beta", "fun")

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            hit = [j for j, w in enumerate(self.WORDS) if w in t.lower()]
            out[i, hit[0] if hit else 3] = 1.0
        return out


@pytest.fixture
def seeds(tmp_path, monkeypatch):
    return seeds_dir(tmp_path, monkeypatch)


def _workdir(tmp_path):
    wd = tmp_path / "work"
    gen = [{"id": f"g{i}", "instruction": f"Explain alpha idea {i}.", "input": ""}
           for i in range(12)]
    gen[10]["instruction"] = "Explain beta idea 10."  # kept, but nearest another domain
    gen[11]["instruction"] = "The alpha idea of the"  # kept, but a fragment
    write_jsonl(wd / "generate" / "instructions.jsonl",
                gen + [{"id": "empty", "instruction": "", "marker": True}])
    write_jsonl(wd / "filter" / "kept.jsonl", gen[:2] + gen[4:])
    write_jsonl(wd / "filter" / "rejected.jsonl",
                [{**gen[2], "reason": "off_domain"}, {**gen[3], "reason": "fragment"}])
    return wd, gen


def test_card_counts_rates_and_examples(tmp_path, seeds):
    wd, gen = _workdir(tmp_path)
    domain = load_domain("alpha")
    card = build_data_card(domain, wd, WordEncoder(), stopped_after="filter")
    assert card["stages"] == {"generate": {"candidates": 12},
                              "filter": {"kept": 10,
                                         "rejected": {"off_domain": 1, "fragment": 1}}}
    assert card["on_domain_rate"] == 0.9 and card["off_domain_nearest"] == {"beta": 1}
    assert card["fragment_rate"] == 0.1
    assert len(card["examples"]) == 10 and all(e["output"] is None for e in card["examples"])

    # With answers, the examples come from the final training data, with their answers.
    write_jsonl(wd / "respond" / "responses.jsonl",
                [{**g, "response": "An answer."} for g in gen[:4]])
    write_jsonl(wd / "respond_filter" / "train.jsonl",
                [{**g, "output": f"Answer {g['id']}."} for g in gen[:3]])
    write_jsonl(wd / "respond_filter" / "rejected.jsonl", [{**gen[3], "reason": "repetition"}])
    card = build_data_card(domain, wd, WordEncoder())
    assert card["stages"]["respond"] == {"answered": 4}
    assert card["stages"]["filter_responses"] == {"kept": 3, "rejected": {"repetition": 1}}
    assert sorted(e["output"] for e in card["examples"]) == ["Answer g0.", "Answer g1.",
                                                            "Answer g2."]
    assert build_data_card(domain, wd, WordEncoder()) == card  # same seed, same examples
    assert card["echo_rate"] == 0.0  # "Answer g0." has one content word: too short to echo

    # One of three answers only restates its instruction: a third of the training answers echo.
    write_jsonl(wd / "respond_filter" / "train.jsonl",
                [{**g, "output": f"Answer {g['id']}."} for g in gen[:2]]
                + [{**gen[2], "output": "Explain alpha idea: the alpha idea explained."}])
    echo_card = build_data_card(domain, wd, WordEncoder())
    assert echo_card["echo_rate"] == 0.3333
    assert "echo rate of the training answers" in format_data_card(echo_card)

    md = format_data_card(card)
    assert md.startswith("# Data card: alpha\n")
    assert "on-domain rate of the kept instructions (nearest domain by the router's encoder): " \
           "90.0%" in md
    assert "fragment rate of the kept instructions: 10.0%" in md
    assert "| filter | kept 10 | off_domain 1, fragment 1 |" in md
    assert "   - answer: Answer g0." in md
    path = write_data_card(card, tmp_path / "out")
    assert path.read_text() == md
    assert json.loads((tmp_path / "out" / "data_card.json").read_text()) == card


def test_card_without_encoder_or_filter_output(tmp_path, seeds):
    domain = load_domain("alpha")
    wd, _ = _workdir(tmp_path)
    card = build_data_card(domain, wd)
    assert card["on_domain_rate"] is None and card["fragment_rate"] == 0.1
    assert "on-domain rate of the kept instructions (nearest domain by the router's encoder): -" \
        in format_data_card(card)
    empty = build_data_card(domain, tmp_path / "nothing")
    assert empty["stages"] == {} and empty["examples"] == []


# ---- --stop-after through the pipeline, with a fake engine ---------------------------------------

@pytest.fixture
def base(fake_base):
    return fake_base


def _cfg(tmp_path, base):
    # The fake's "Explain t1w0 ... clearly" is no real task: the meaning filters stay off.
    return build_config(base_model=str(base), experts_dir=tmp_path / "experts",
                        respond={"retrieval": "none", "batch_size": 3},
                        generate={"num_instructions": 6, "prompts_per_batch": 2},
                        filter={"wellformed": False, "relevance": False})


@pytest.fixture
def no_encoder(monkeypatch):
    """The card's on-domain rate from the word encoder, not a 10-second model load."""
    from specialize import quality

    monkeypatch.setattr(quality, "load_default_encoder", lambda: WordEncoder())


def test_stop_after_previews_and_resumes(tmp_path, seeds, base, no_encoder):
    cfg = _cfg(tmp_path, base)
    engines = []

    def make(*a, **k):
        engines.append(FakeGenerator())
        return engines[-1]

    out = specialize(["alpha"], cfg, make_generator=make, stop_after="filter")
    wd = cfg.experts_dir / ".work" / "alpha"
    state = json.loads((wd / "state.json").read_text())
    assert list(state["done"]) == ["generate", "filter"]
    # the fake's "Explain t1w0 ... clearly" names no domain: nearest the everyday set, 0% on-domain
    assert out == [{"domain": "alpha", "stopped_after": "filter", "workdir": str(wd),
                    "data_card": str(wd / "data_card.md"), "on_domain_rate": 0.0,
                    "fragment_rate": out[0]["fragment_rate"],
                    "stages": json.loads((wd / "data_card.json").read_text())["stages"]}]
    assert (wd / "data_card.md").read_text().startswith("# Data card: alpha\n\nPreview: the "
                                                        "run stopped after the `filter` stage")
    assert not load_registry(cfg.experts_dir).experts and not (wd / "respond").exists()

    # --resume continues from there: answers now, still no training.
    out = specialize(["alpha"], cfg, resume=True, make_generator=make,
                     stop_after="filter_responses")
    state = json.loads((wd / "state.json").read_text())
    assert list(state["done"]) == ["generate", "filter", "respond", "respond_filter"]
    assert state["done"]["generate"]["candidates"] == out[0]["stages"]["generate"]["candidates"]
    card = json.loads((wd / "data_card.json").read_text())
    assert card["stopped_after"] == "filter_responses"
    assert card["examples"] and all(e["output"] for e in card["examples"])
    assert len(engines) == 2 and len(read_jsonl(wd / "filter" / "kept.jsonl")) == 6
    # a finished stage is not run again: asking to stop earlier needs no engine at all
    specialize(["alpha"], cfg, resume=True, make_generator=make, stop_after="respond")
    assert len(engines) == 2


def test_unknown_stage_is_one_line_exit_2(tmp_path, seeds, base, capsys):
    from core.errors import ConfigError
    from selfspec.cli import main

    with pytest.raises(ConfigError, match="--stop-after 'teach' is no stage; use one of "
                                          "generate, filter, respond, filter_responses, train"):
        specialize(["alpha"], _cfg(tmp_path, base), stop_after="teach")
    with pytest.raises(SystemExit) as e:
        main(["specialize", "alpha", "--stop-after", "teach"])
    assert e.value.code == 2
    assert "argument --stop-after: invalid choice: 'teach'" in capsys.readouterr().err
