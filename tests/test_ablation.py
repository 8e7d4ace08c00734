"""`selfspec ablate` with a fake generator and a keyword encoder: setting names, the measures, the
report file and table, and bad input."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from core.engine import Completion
from core.errors import ConfigError
from core.seeds import load_domain
from core.stats import paired_diff
from selfspec.cli import main
from specialize.ablation import (
    build_ablation_config,
    format_report,
    pool_seeds,
    resolve_setting,
    run_ablation,
)
from specialize.config import FilterConfig
from specialize.datacard import build_data_card
from tests.conftest import FakeGenerator, seeds_dir

AXES = ("alpha", "beta")
# The rule filters only: the meaning filters would load the real encoder and the fragments and
# off-domain items this test counts would not be kept.
RULES_ONLY = FilterConfig(wellformed=False, relevance=False, max_perplexity_ratio=None)


class KeywordEncoder:
    """Each domain name in a text adds 1 on its axis, plus a small jitter fixed by the text."""

    name, dim = "keywords", 4

    def encode(self, texts):
        out = []
        for t in texts:
            v = np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).normal(
                0, 0.05, self.dim)
            for axis, word in enumerate(AXES):
                v[axis] += 1.0 if word in t.lower() else 0.0
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32).reshape(len(texts), self.dim)


class MixedWriter(FakeGenerator):
    """Per prompt: an on-domain task, one about the other domain, and an on-domain fragment;
    records each prompt."""

    def __init__(self):
        super().__init__()
        self.prompts = []

    def complete(self, prompts, sampling, adapter=None):
        self.calls.append((len(prompts), sampling, adapter))
        self.prompts += prompts
        out = []
        for p in prompts:
            own = "alpha" if "about alpha" in p else "beta"
            other = "beta" if own == "alpha" else "alpha"
            first = int(re.findall(r"(\d+)\. Instruction:$", p)[0])
            items = []
            for k, text in enumerate((f"Explain the {own} idea {{w}} clearly.",
                                      f"Describe the {other} method {{w}} for beginners.",
                                      f"The {own} result {{w}} of the")):
                self.counter += 1
                w = " ".join(f"t{self.counter}w{j}" for j in range(3))
                line = " " + text.format(w=w)
                items.append(line if k == 0 else f"{first + k}. Instruction:{line}")
                items.append(f"{first + k}. Input: <noinput>")
            out.append(Completion("\n".join(items) + "\n", "stop"))
        return out

    def close(self):
        self.closed = True


@pytest.fixture
def seeds(tmp_path, monkeypatch):
    return seeds_dir(tmp_path, monkeypatch, AXES)


@pytest.fixture
def base(fake_base):
    return fake_base


def test_settings_change_one_thing_on_top_of_the_paper_prompt():
    paper = {"focus": "none", "prompt_format": "list", "temperature": 1.0}
    assert resolve_setting("paper") == paper
    assert resolve_setting("passage") == {**paper, "focus": "passage"}
    assert resolve_setting("passage+chat+t0.7") == {"focus": "passage", "prompt_format": "chat",
                                                    "temperature": 0.7}
    assert resolve_setting("default") == {}  # today's GenerateConfig defaults
    assert resolve_setting("default+t1.0") == {"temperature": 1.0}
    with pytest.raises(ConfigError, match="unknown ablation setting 'hot'"):
        resolve_setting("passage+hot")


def test_run_reports_keep_on_domain_and_fragment_rates(tmp_path, seeds, base):
    acfg = build_ablation_config(domains=["alpha", "beta"], settings=["paper", "subtopic"],
                                 num_instructions=6, base_model=str(base), out=tmp_path / "abl",
                                 filter=RULES_ONLY)
    gen = MixedWriter()
    encoder = KeywordEncoder()
    report = run_ablation(acfg, make_generator=lambda *a, **k: gen, encoder=encoder)

    assert gen.closed  # one engine for every setting, closed at the end
    assert list(report["settings"]) == ["paper", "subtopic"]
    assert json.loads((tmp_path / "abl" / "report.json").read_text()) == report
    for name, entry in report["settings"].items():
        assert entry["generate"]["focus"] == ("none" if name == "paper" else "subtopic")
        for dom in AXES:
            m = entry["domains"][dom]
            # every third candidate is about the other domain, every third is a fragment
            assert m["candidates"] % 3 == 0 and m["candidates"] >= 6
            assert m["on_domain_candidates"] == pytest.approx(2 / 3, abs=1e-4)
            assert m["fragment_candidates"] == pytest.approx(1 / 3, abs=1e-4)
            assert m["kept"] == 6 and m["keep_rate"] == round(6 / m["judged"], 4)
            workdir = tmp_path / "abl" / name / "experts" / ".work" / dom
            kept = [json.loads(line)["instruction"] for line in
                    (workdir / "filter" / "kept.jsonl").read_text().splitlines()]
            on = sum(dom in k for k in kept)
            assert m["on_domain_kept"] == round(on / 6, 4)
            assert m["fragment_kept"] == round(sum(k.endswith("of the") for k in kept) / 6, 4)
            # the same numbers as the data card an expert from this data would carry
            card = build_data_card(load_domain(dom), workdir, encoder)
            assert (m["on_domain_kept"], m["fragment_kept"]) == (card["on_domain_rate"],
                                                                 card["fragment_rate"])
        total = entry["total"]
        assert total["kept"] == 12 and total["eval_gain"] is None
        assert total["on_domain_candidates"] == pytest.approx(2 / 3, abs=1e-4)
    # the subtopic setting's prompts each name one subtopic; the paper's name none
    assert any("Every task should be about this subtopic" in p for p in gen.prompts)
    assert any("Cover many subtopics of alpha." in p for p in gen.prompts)

    table = format_report(report)
    assert "subtopic" in table and "67%" in table and "33%" in table


def test_train_eval_adds_each_setting_s_eval_gain(tmp_path, seeds, base, monkeypatch):
    calls = []

    def fake_specialize(domains, cfg, resume=False, **kw):
        calls.append((domains, cfg.experts_dir, resume, cfg.train.seed, kw))
        return []

    def fake_gain(experts_dir, domains, out):
        return {d: {"diff": 0.05 if "chat" in str(experts_dir) else -0.01, "ci": [0, 0.1],
                    "p_not_better": 0.2} for d in domains}

    monkeypatch.setattr("specialize.pipeline.specialize", fake_specialize)
    acfg = build_ablation_config(domains=["alpha"], settings=["paper", "chat"],
                                 num_instructions=3, base_model=str(base), out=tmp_path / "abl",
                                 train_eval=True, filter=RULES_ONLY)
    report = run_ablation(acfg, make_generator=lambda *a, **k: MixedWriter(),
                          encoder=KeywordEncoder(), eval_gain=fake_gain)
    # each setting resumes its own work dirs after generate+filter
    assert [(c[1].name, c[2]) for c in calls] == [("experts", True), ("experts", True)]
    assert [c[1].parent.name for c in calls] == ["paper", "chat"]
    # one training seed (the default, 0): answered and trained in one go, as before
    assert [(c[3], c[4]) for c in calls] == [(0, {}), (0, {})]
    assert report["settings"]["chat"]["total"]["eval_gain"] == 0.05
    assert report["settings"]["paper"]["domains"]["alpha"]["eval_gain"] == {
        "diff": -0.01, "ci": [0, 0.1], "p_not_better": 0.2, "train_seeds": [0]}
    assert "+0.050" in format_report(report)
    assert "training seeds" not in format_report(report)


# Per-item eval scores of the fake evaluator: the base's are fixed, each training seed's expert
# gets its own, so pooling has something to average.
ITEMS = [f"i{k}" for k in range(12)]
BASE_SCORES = [float(k % 3 == 0) for k in range(12)]


def seed_scores(seed: int, domain: str) -> list[float]:
    rng = np.random.default_rng(seed * 7 + len(domain))
    return rng.integers(0, 2, len(ITEMS)).astype(float).tolist()


def scoring_gain(log):
    """A fake `eval_gain` that reads the training seed from the experts dir (seed<s>/experts)
    and returns per-item scores, as evaluation.gain.expert_gain does."""
    def gain(experts_dir, domains, out):
        log.append((experts_dir, out))
        part = experts_dir.parent.name
        seed = int(part[4:]) if part.startswith("seed") else 0
        return {d: {**paired_diff(seed_scores(seed, d), BASE_SCORES),
                    "scores": {"ids": ITEMS, "base": BASE_SCORES,
                               "expert": seed_scores(seed, d)}} for d in domains}
    return gain


def test_one_training_seed_trains_with_that_seed_and_keeps_no_scores(tmp_path, seeds, base,
                                                                     monkeypatch):
    calls = []
    monkeypatch.setattr("specialize.pipeline.specialize",
                        lambda domains, cfg, resume=False, **kw: calls.append((cfg, kw)) or [])
    acfg = build_ablation_config(domains=["alpha"], settings=["paper"], num_instructions=3,
                                 base_model=str(base), out=tmp_path / "abl", train_eval=True,
                                 train_seeds=[3], filter=RULES_ONLY)
    report = run_ablation(acfg, make_generator=lambda *a, **k: MixedWriter(),
                          encoder=KeywordEncoder(), eval_gain=scoring_gain(log := []))
    [(cfg, kw)] = calls
    assert cfg.train.seed == 3 and kw == {}
    assert cfg.experts_dir == tmp_path / "abl" / "paper" / "experts"
    assert log == [(cfg.experts_dir, tmp_path / "abl" / "paper" / "eval")]
    gain = report["settings"]["paper"]["domains"]["alpha"]["eval_gain"]
    assert gain == {**paired_diff(seed_scores(0, "alpha"), BASE_SCORES), "train_seeds": [3]}
    assert "scores" not in json.dumps(report)


def test_several_training_seeds_answer_once_train_each_and_pool_the_gain(tmp_path, seeds, base,
                                                                         monkeypatch):
    calls = []

    def fake_specialize(domains, cfg, resume=False, stop_after=None, **_):
        work = cfg.experts_dir / ".work"
        calls.append({"domains": domains, "experts_dir": cfg.experts_dir, "resume": resume,
                      "stop_after": stop_after, "seed": cfg.train.seed,
                      "engine_seed": cfg.engine.seed, "focus": cfg.generate.focus,
                      "answers": {d: (work / d / "respond_filter" / "train.jsonl").read_text()
                                  for d in domains
                                  if (work / d / "respond_filter" / "train.jsonl").exists()}})
        if stop_after == "filter_responses":  # the answering: one file per work dir
            for d in domains:
                (work / d / "respond_filter").mkdir(parents=True)
                (work / d / "respond_filter" / "train.jsonl").write_text(f"answers of {d}\n")
        return []

    monkeypatch.setattr("specialize.pipeline.specialize", fake_specialize)
    acfg = build_ablation_config(domains=["alpha", "beta"], settings=["paper", "chat"],
                                 num_instructions=3, base_model=str(base), out=tmp_path / "abl",
                                 train_eval=True, train_seeds=[2, 0, 2], filter=RULES_ONLY)
    assert acfg.train_seeds == [2, 0]  # duplicates dropped, order kept
    log = []
    report = run_ablation(acfg, make_generator=lambda *a, **k: MixedWriter(),
                          encoder=KeywordEncoder(), eval_gain=scoring_gain(log))

    abl = tmp_path / "abl"
    for i, name in enumerate(("paper", "chat")):
        answer, *trained = calls[3 * i:3 * i + 3]
        # answered once, in the setting's own work dirs, stopping before training
        assert (answer["experts_dir"], answer["stop_after"], answer["resume"]) == (
            abl / name / "experts", "filter_responses", True)
        assert answer["answers"] == {}
        # then one full run per training seed, resuming a copy of the answered work dirs
        assert [(c["experts_dir"], c["seed"], c["resume"], c["stop_after"]) for c in trained] \
            == [(abl / name / f"seed{s}" / "experts", s, True, None) for s in (2, 0)]
        for c in trained:
            assert c["domains"] == ["alpha", "beta"]
            assert c["answers"] == {"alpha": "answers of alpha\n", "beta": "answers of beta\n"}
            # everything else is the setting's config
            assert (c["engine_seed"], c["focus"]) == (answer["engine_seed"], answer["focus"])
            for d in ("alpha", "beta"):
                assert (c["experts_dir"] / ".work" / d / "filter" / "kept.jsonl").read_text() \
                    == (abl / name / "experts" / ".work" / d / "filter" / "kept.jsonl").read_text()
        assert [out for _, out in log[2 * i:2 * i + 2]] == [abl / name / "eval-seed2",
                                                           abl / name / "eval-seed0"]
        for d in ("alpha", "beta"):
            gain = report["settings"][name]["domains"][d]["eval_gain"]
            mean = np.mean([seed_scores(2, d), seed_scores(0, d)], axis=0)
            assert {k: gain[k] for k in ("diff", "ci", "p_not_better")} == paired_diff(
                mean, BASE_SCORES)
            assert gain["train_seeds"] == [2, 0] and gain["base_averaged"] is False
            assert gain["per_seed"] == [{"seed": s, **paired_diff(seed_scores(s, d), BASE_SCORES)}
                                        for s in (2, 0)]
    assert len(calls) == 6
    assert "scores" not in json.dumps(report)
    assert json.loads((abl / "report.json").read_text()) == report
    total = report["settings"]["chat"]["total"]["eval_gain"]
    assert total == round(float(np.mean([report["settings"]["chat"]["domains"][d]["eval_gain"]
                                         ["diff"] for d in ("alpha", "beta")])), 4)
    table = format_report(report)
    assert "pooled over 2 training seeds (2,0)" in table and f"{total:+.3f}" in table


def test_pooling_averages_a_base_that_differs_between_seeds_and_says_so():
    ids = ["a", "b", "c", "d"]
    one = {"diff": 0.25, "ci": [0, 0.5], "p_not_better": 0.3,
           "scores": {"ids": ids, "base": [0, 0, 1, 0], "expert": [1, 0, 1, 0]}}
    two = {"diff": 0.0, "ci": [-0.5, 0.5], "p_not_better": 0.6,
           "scores": {"ids": ids, "base": [0, 1, 1, 0], "expert": [1, 1, 0, 0]}}
    pooled = pool_seeds({0: one, 1: two})
    assert pooled["base_averaged"] is True
    assert pooled["diff"] == paired_diff([1, 0.5, 0.5, 0], [0, 0.5, 1, 0])["diff"] == 0.125
    assert pooled["per_seed"][1] == {"seed": 1, "diff": 0.0, "ci": [-0.5, 0.5],
                                     "p_not_better": 0.6}
    # a seed without per-item scores (an evaluator of the old contract) cannot be pooled
    missing = pool_seeds({0: one, 1: {"diff": 0.1, "ci": [0, 0.2], "p_not_better": 0.1}})
    assert missing["diff"] is None and "training seed(s) [1]" in missing["note"]
    with pytest.raises(ValueError, match="different items"):
        pool_seeds({0: one, 1: {**two, "scores": {**two["scores"], "ids": ["a", "b", "c", "e"]}}})


def test_expert_gain_returns_the_per_item_scores_it_compared(tmp_path, monkeypatch):
    from evaluation.gain import expert_gain

    def row(target, domain, k, score):
        return {"target": target, "domain": domain, "id": f"{domain}-{k}", "score": score}

    base = {"alpha": [1, 0, 0, 1], "beta": [0, 0, 1]}
    expert = {"alpha": [1, 1, 0, 1], "beta": [1, 0, 1]}
    rows = [row("base", d, k, s) for d, ss in base.items() for k, s in enumerate(ss)]
    for e in ("alpha", "beta"):  # each expert on every domain, as the eval matrix scores it
        rows += [row(e, d, k, 1 - s if d != e else s) for d in base
                 for k, s in enumerate(expert[d])]
    report = {"comparisons": {"expert_vs_base": {
        d: {"domain": d, **paired_diff(expert[d], base[d])} for d in base}}}
    written = []
    monkeypatch.setattr("evaluation.run.evaluate", lambda cfg: (report, rows))
    monkeypatch.setattr("evaluation.report.write_outputs",
                        lambda rep, rs, out: written.append(out))
    gains = expert_gain(tmp_path / "experts", ["alpha", "beta"], tmp_path / "eval")
    assert written == [tmp_path / "eval"]
    for d, b in base.items():
        sc = gains[d].pop("scores")
        assert sc == {"ids": [f"{d}-{k}" for k in range(len(b))], "base": b, "expert": expert[d]}
        # the pairs the comparison resampled: the same diff, interval and p
        assert gains[d] == paired_diff(sc["expert"], sc["base"])


def test_an_answers_only_setting_reuses_the_instructions_and_sets_stage_3(tmp_path, seeds, base,
                                                                         monkeypatch):
    configs = []
    monkeypatch.setattr("specialize.pipeline.specialize",
                        lambda domains, cfg, resume=False, **_: configs.append(cfg) or [])
    acfg = build_ablation_config(domains=["alpha"], settings=["default", "default+sc4"],
                                 num_instructions=3, base_model=str(base), out=tmp_path / "abl",
                                 train_eval=True, filter=RULES_ONLY)
    gen = MixedWriter()
    report = run_ablation(acfg, make_generator=lambda *a, **k: gen, encoder=KeywordEncoder(),
                          eval_gain=lambda e, domains, out: {})
    assert [c.respond.self_consistency for c in configs] == [0, 4]
    assert configs[0].generate == configs[1].generate
    # one generation, copied: both arms are compared on the very same instructions (the
    # writer numbers every task it writes, so a second generation would keep other ones)
    kept = [(tmp_path / "abl" / s / "experts" / ".work" / "alpha" / "filter" / "kept.jsonl")
            .read_text() for s in ("default", "default+sc4")]
    assert kept[0] == kept[1] and kept[0]
    arm = report["settings"]["default+sc4"]
    assert arm["respond_changes"] == {"self_consistency": 4}
    assert arm["domains"]["alpha"]["instructions_of"] == "default"
    assert arm["domains"]["alpha"]["kept"] == report["settings"]["default"]["domains"]["alpha"][
        "kept"]


@pytest.mark.parametrize("args, message", [
    (["ablate", "alpha", "--settings", "default,default+sc4"], "add --train-eval"),
    (["ablate", "alpha", "--settings", "paper,bogus"], "unknown ablation setting 'bogus'"),
    (["ablate", "alpha", "--settings", "+"], "unknown ablation setting"),
    (["ablate", "alpha", "--num-instructions", "0"], "--num-instructions"),
    (["ablate", "nope"], "unknown domain 'nope'"),
    (["ablate", "alpha", "--train-seeds", "0,1"], "--train-seeds 0,1 trains each setting once "
                                                  "per seed: add --train-eval"),
    (["ablate", "alpha", "--train-eval", "--train-seeds", "0,x"],
     "--train-seeds: 'x' is not an integer"),
    (["ablate", "alpha", "--train-eval", "--train-seeds", "1.5"],
     "--train-seeds: '1.5' is not an integer"),
    (["ablate", "alpha", "--train-eval", "--train-seeds", "0,-1"], "-1 is negative"),
    (["ablate", "alpha", "--train-eval", "--train-seeds", ","], "--train-seeds: ',' is not"),
])
def test_bad_input_one_line_exit_2(tmp_path, seeds, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "reports").exists()  # nothing ran


def test_wilson_interval():
    from specialize.ablation import wilson

    assert wilson(0, 0) is None
    lo, hi = wilson(0, 48)
    assert lo == 0.0 and 0.07 < hi < 0.08  # 0 of 48 still allows ~7% (the rule of three: 6%)
    lo, hi = wilson(40, 48)
    assert lo < 40 / 48 < hi and hi - lo < 0.23
