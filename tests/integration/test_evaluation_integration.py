"""`selfspec eval` for real on the tiny random Llama and the serving tests' experts (finance, law,
and a corrupt biomedicine that both backends must leave out): the direct vLLM engine and the
HTTP endpoint give the same numbers, and lm-evaluation-harness runs against the endpoint.

The direct run starts one engine of its own (LoRA on, the server's plan) and closes it before
the shared Ray Serve app (conftest `serve_app`) is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from evaluation.config import build_eval_config
from evaluation.report import write_outputs
from evaluation.run import evaluate
from tests.conftest import REPO
from tests.integration.conftest import SERVE_API_KEY

pytestmark = pytest.mark.integration

DOMAINS = ["finance", "law"]
LIMIT = 8  # per domain: two items of each type


class _Quiet:
    def update(self, n):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def direct_run(serve_experts, tmp_path_factory):
    cfg = build_eval_config(experts_dir=serve_experts, domains=DOMAINS, limit=LIMIT,
                            resamples=200, out=tmp_path_factory.mktemp("eval-direct"))
    report, rows = evaluate(cfg, progress=_Quiet())
    write_outputs(report, rows, cfg.out)
    return cfg, report, rows


def _by_cell(rows):
    return {(r["target"], r["id"]): r for r in rows}


def test_direct_eval_writes_the_report(direct_run):
    cfg, report, rows = direct_run
    assert report["targets"] == ["base", "finance", "law", "auto"]
    assert "biomedicine" in report["registry"]["skipped"]  # its adapter is corrupt
    assert report["backend"] == {"kind": "vllm", "endpoint": None}
    assert sorted(p.name for p in cfg.out.iterdir()) == \
        ["eval.json", "eval.md", "eval_heatmap.png", "eval_items.jsonl"]
    assert len(rows) == 4 * 2 * LIMIT
    mc = [r for r in rows if r["type"] == "multiple_choice"]
    assert mc and all(len(r["logliks"]) == 4 and all(x < 0 for x in r["logliks"]) for r in mc)
    # generative multiple choice ran for real: a greedy reply per item and target, scored as
    # the letter it starts with (the tiny random model rarely starts with one: then invalid)
    assert all(isinstance(r["generative_reply"], str) and r["generative"] in (0.0, 1.0)
               and r["generative_valid"] == (r.get("generative_pred") in ("A", "B", "C", "D"))
               for r in mc)
    for t in report["targets"]:
        m = report["results"][t]["mixed"]
        gen = m["multiple_choice"]["generative"]
        assert gen["ci"][0] <= gen["mean"] <= gen["ci"][1]
        assert 0.0 <= m["multiple_choice"]["generative_invalid"] <= 1.0
        assert m["score_generative"]["mean"] is not None
    assert set(report["comparisons"]["generative"]) == {"expert_vs_base", "auto_vs_base"}
    gen = [r for r in rows if r["type"] != "multiple_choice"]
    assert all(isinstance(r["reply"], str) for r in gen)
    # each adapter really changes what is scored: the experts' log-likelihoods differ from base
    cells = _by_cell(rows)
    assert any(cells[("finance", r["id"])]["logliks"] != r["logliks"]
               for r in mc if r["target"] == "base")
    # auto's generative turn lists the options and is routed on its own
    assert all(r["generative_routed_to"] in report["targets"] for r in mc
               if r["target"] == "auto")
    # auto: each item scored exactly as the cell of the target it was routed to
    for r in rows:
        if r["target"] == "auto":
            same = cells[(r["routed_to"], r["id"])]
            assert (r["score"], r.get("pred")) == (same["score"], same.get("pred"))
            if r["type"] == "multiple_choice":
                letter = cells[(r["generative_routed_to"], r["id"])]
                assert r["generative_reply"] == letter["generative_reply"]


def test_http_backend_gives_the_same_numbers(direct_run, serve_app):
    _, direct, direct_rows = direct_run
    url, _ = serve_app
    cfg = build_eval_config(endpoint=url, api_key=SERVE_API_KEY, domains=DOMAINS, limit=LIMIT,
                            resamples=200, concurrency=4)
    http, http_rows = evaluate(cfg, progress=_Quiet())
    assert http["backend"] == {"kind": "http", "endpoint": url}
    assert http["targets"] == direct["targets"]
    assert "biomedicine" in http["registry"]["skipped"]
    a, b = _by_cell(direct_rows), _by_cell(http_rows)
    assert a.keys() == b.keys()
    for key, r in a.items():
        s = b[key]
        assert (r["score"], r.get("pred"), r.get("routed_to")) == \
            (s["score"], s.get("pred"), s.get("routed_to")), key
        if "reply" in r:
            assert r["reply"] == s["reply"], key
        else:  # same tokens, same adapter; only batch composition differs between the two
            assert r["logliks"] == pytest.approx(s["logliks"], abs=2e-2), key
            # the generative turn is greedy over the same tokens: the same letter reply
            assert (r["generative_reply"], r.get("generative_pred"),
                    r.get("generative_routed_to")) == \
                (s["generative_reply"], s.get("generative_pred"),
                 s.get("generative_routed_to")), key
    for t in direct["targets"]:
        for col in direct["columns"]:
            assert http["results"][t][col] == direct["results"][t][col], (t, col)
    assert http["routing"] == direct["routing"]


def test_lm_eval_local_completions_against_the_endpoint(serve_app, tiny_model, tmp_path):
    """The documented lm-eval command (README "Evaluation"), on the shipped task YAML."""
    url, _ = serve_app
    out = tmp_path / "lm_eval"
    model_args = ",".join([
        "model=finance", f"base_url={url}/v1/completions", f"tokenizer={tiny_model}",
        "tokenizer_backend=huggingface", "tokenized_requests=True", "num_concurrent=2",
        "max_retries=1"])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", model_args, "--tasks", "selfspec_finance_mc",
           "--include_path", "evaluation/lm_eval_tasks", "--apply_chat_template",
           "--limit", "4", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "OPENAI_API_KEY": SERVE_API_KEY, "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    task = results["results"]["selfspec_finance_mc"]
    assert 0.0 <= task["acc,none"] <= 1.0 and 0.0 <= task["acc_norm,none"] <= 1.0
    assert results["n-samples"]["selfspec_finance_mc"]["effective"] == 4
    samples = sorted((json.loads(line) for line in next(
        out.rglob("samples_selfspec_finance_mc_*.jsonl")).read_text().splitlines()),
        key=lambda s: s["doc_id"])
    assert len(samples) == 4

    # lm-eval scored what `selfspec eval` scores: the same items and options; its log-likelihoods
    # differ from ours only by the prompt's trailing newline it moves into every option (the same
    # constant for each option of an item), so acc agrees item by item.
    from core.seeds import load_domain
    from evaluation.backends import HttpBackend, probe_endpoint
    from evaluation.run import _requests, _score

    items = [it for it in load_domain("finance").eval_items if it.type == "multiple_choice"][:4]
    backend = HttpBackend(probe_endpoint(url, SERVE_API_KEY), SERVE_API_KEY, str(tiny_model))
    try:
        for it, sample in zip(items, samples):
            reqs, n_ctx = _requests(backend, it, "finance")
            ours, extra = _score(it, n_ctx, backend.complete(reqs, lambda n: None))
            theirs = [float(r[0]) for r in sample["filtered_resps"]]  # logged as text
            shift = [t - o for t, o in zip(theirs, extra["logliks"])]
            assert max(shift) - min(shift) < 2e-2, (it.id, shift)
            assert sample["acc"] == ours.acc, it.id
    finally:
        backend.close()
