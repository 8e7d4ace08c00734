"""The whole pipeline for real: vLLM generation on a tiny random Llama, PEFT training, vLLM
serving rules, atomic publish, a resumed interruption, and the adapter changing vLLM's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.jsonl import read_jsonl
from core.registry import load_registry
from core.rouge import rouge_l
from specialize.config import build_config
from specialize.pipeline import specialize

pytestmark = pytest.mark.integration


def tiny_config(experts_dir: Path, base: Path, **over) -> object:
    cfg = {
        "base_model": str(base), "experts_dir": experts_dir,
        "engine": {"max_model_len": 2048, "kv_cache_gib": 1},
        "generate": {"num_instructions": 8, "prompts_per_batch": 4, "max_tokens": 160,
                     "guided_items": 3},
        # A random model writes noise that these rightly reject (see
        # test_meaning_filters_reject_a_random_model_s_noise). The perplexity check stays on;
        # it runs where the pipeline builds its own engine (the shared one has LoRA on, and has
        # no prompt logprobs then: see test_stop_after_previews_the_data_and_resumes).
        "filter": {"wellformed": False, "relevance": False},
        # Greedy, a random model loops on "\n" (rightly rejected as empty): sample instead.
        "respond": {"max_tokens": 24, "batch_size": 4, "top_k": 1, "temperature": 1.0},
        # A random model never stops by itself: keep its cut-off answers for the mechanics.
        "responses": {"drop_truncated": False},
        "train": {"epochs": 2, "batch_size": 4, "max_seq_len": 256, "learning_rate": 2e-2,
                  "threads": 2},
        "router_exemplars": 4}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return build_config(**cfg)


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model, engine):
    """Two rounds on the shipped math seeds (real BM25 grounding on its corpus)."""
    from tests.integration.conftest import Shared

    experts = tmp_path_factory.mktemp("experts")
    cfg = tiny_config(experts, tiny_model, rounds=2)
    shared = Shared(engine)
    results = specialize(["math"], cfg, make_generator=shared)
    return experts, results, shared


def test_pipeline_publishes_a_complete_expert(published, tiny_model):
    experts, results, _ = published
    reg = load_registry(experts)
    entry = reg.get("math")
    assert entry.version == 1 and entry.train.rounds == 2
    assert entry.base_model_path == str(tiny_model)
    assert entry.lora.rank == 8 and "q_proj" in entry.lora.target_modules
    version = experts / entry.path
    assert sorted(p.name for p in version.iterdir()) == [
        "adapter", "config.json", "data", "data_card.json", "data_card.md", "expert.json",
        "loss.json", "loss.png", "summary.json"]
    assert sorted(p.name for p in (version / "data").iterdir()) == [
        "generated.jsonl", "kept_instructions.jsonl", "rejected_instructions.jsonl",
        "rejected_responses.jsonl", "rejected_responses_round2.jsonl", "responses.jsonl",
        "responses_round2.jsonl", "train.jsonl"]
    cfg = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg.get("modules_to_save")
    assert not (experts / ".work" / "math").exists()  # work dir cleaned after publish
    assert results[0]["kept_instructions"] == 8
    # the published adapter (round 2) scored against the base on seeds/math/validation.jsonl
    from core.seeds import load_domain
    from specialize.config import GainConfig
    from specialize.gain import load_validation
    assert entry.gain is not None and results[0]["gain"] == entry.gain.model_dump()
    assert entry.gain.n == len(load_validation(load_domain("math"), GainConfig()))
    loss = json.loads((version / "loss.json").read_text())
    assert len(loss) >= 2 and all(r["loss"] > 0 for r in loss)


def test_training_data_was_written_by_the_model_not_copied(published):
    from core.seeds import load_domain

    experts, _, _ = published
    data = Path(experts / "math" / "data")
    train = read_jsonl(data / "train.jsonl")
    generated = {r["id"]: r for r in read_jsonl(data / "generated.jsonl")}
    seeds = [s.instruction for s in load_domain("math").seeds]
    assert train and all(r["id"] in generated for r in train)
    for row in train:
        assert max(rouge_l(row["instruction"], s) for s in seeds) <= 0.7
    assert len({r["instruction"] for r in train}) == len(train)
    rejected = read_jsonl(data / "rejected_instructions.jsonl")
    assert all(r["reason"] for r in rejected)


def test_round2_answers_come_from_the_round1_adapter(published):
    experts, _, shared = published
    r1 = {r["id"]: r["response"] for r in read_jsonl(experts / "math/data/responses.jsonl")}
    r2 = {r["id"]: r["response"] for r in
          read_jsonl(experts / "math/data/responses_round2.jsonl")}
    assert r1.keys() == r2.keys() and len(r2) == 8
    # Every round-2 batch went through vLLM with the round-1 LoRA (8 answers, batches of 4).
    assert [a.name for a in shared.adapters] == ["math-round1"] * 2
    assert shared.adapters[0].path.name == "adapter" and shared.adapters[0].path.parent.name == "train"
    train = read_jsonl(experts / "math/data/train.jsonl")
    assert {r["output"] for r in train} <= set(r2.values())  # the expert learned round 2


def test_published_adapter_changes_vllm_output(published, engine):
    experts, _, _ = published
    entry = load_registry(experts).get("math")
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    prompt = engine.chat_prompt("Solve for x: 3x + 5 = 20.")
    # Greedy text of a random model is pinned to one token; its distribution is what moves.
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)
    lora = LoRARequest(entry.lora_name, 77, str(experts / entry.adapter_path))
    base, tuned = (engine.llm.generate([prompt], params, lora_request=r, use_tqdm=False)[0]
                   .outputs[0].logprobs[0] for r in (None, lora))
    shared_ids = base.keys() & tuned.keys()
    assert shared_ids
    shift = max(abs(base[t].logprob - tuned[t].logprob) for t in shared_ids)
    assert shift > 0.05, shift
    # Both requests in one batch: vLLM mixes base and adapter rows and keeps them apart.
    mixed = engine.llm.generate([prompt, prompt], params, lora_request=[None, lora],
                                use_tqdm=False)
    assert mixed[0].outputs[0].logprobs[0][next(iter(shared_ids))].logprob == pytest.approx(
        base[next(iter(shared_ids))].logprob, abs=1e-3)
    assert mixed[1].outputs[0].logprobs[0][next(iter(shared_ids))].logprob == pytest.approx(
        tuned[next(iter(shared_ids))].logprob, abs=1e-3)


def test_vllm_lora_matches_peft_in_a_mixed_batch(engine, tiny_model, tmp_path):
    """The CPU LoRA plugin (serve/cpu_lora*.py) inside the real engine, against transformers +
    PEFT on the same weights: one batch mixing base rows and two adapters, through its prefill
    step and its decode steps, every generated position compared."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.integration.tiny_experts import build_random_adapter

    paths = [build_random_adapter(tiny_model, tmp_path / f"a{i}", seed=500 + i) for i in (0, 1)]
    loras = [LoRARequest(f"ref{i}", 900 + i, str(p)) for i, p in enumerate(paths)]
    rows = [None, loras[0], loras[1], loras[0], None, loras[1]]
    prompts = [engine.chat_prompt(q) for q in ("What is 2+2?", "Define a tort.", "What is a bond?",
                                                "Name a vitamin.", "Why is the sky blue?", "Hi")]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, ignore_eos=True)
    outs = engine.llm.generate(prompts, params, lora_request=rows, use_tqdm=False)

    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    models = {None: base}
    for lora in loras:
        models[lora.lora_int_id] = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32),
            lora.lora_path).eval()
    worst, shift = 0.0, 0.0
    for out, lora in zip(outs, rows):
        gen = out.outputs[0]
        ids = torch.tensor([list(out.prompt_token_ids) + list(gen.token_ids)])
        start = len(out.prompt_token_ids) - 1
        with torch.no_grad():
            want = {key: m(ids).logits[0, start:-1].float().log_softmax(-1)
                    for key, m in models.items()}
        own = want[None if lora is None else lora.lora_int_id]
        for pos, top in enumerate(gen.logprobs):
            for token, lp in top.items():
                worst = max(worst, abs(lp.logprob - own[pos, token].item()))
                shift = max(shift, *(abs(lp.logprob - w[pos, token].item())
                                     for key, w in want.items() if w is not own))
    # bf16 in vLLM vs fp32 here: small; the wrong adapter (or none) is off by far more.
    assert worst < 0.05, worst
    assert shift > 4 * worst, (shift, worst)


def test_second_run_publishes_version_2(published, tiny_model, engine, tmp_path):
    from tests.integration.conftest import Shared

    experts, _, _ = published
    before = load_registry(experts)
    cfg = tiny_config(experts, tiny_model, generate={"num_instructions": 4})
    specialize(["math"], cfg, make_generator=Shared(engine))
    after = load_registry(experts)
    assert after.get("math").version == 2 and after.revision == before.revision + 1
    assert (experts / ".versions/math/v1/adapter").is_dir()
    assert Path(experts / "math").resolve().name == "v2"


def test_interrupted_run_resumes_without_duplicates(tmp_path, tiny_model, engine):
    from core.errors import ConfigError
    from tests.integration.conftest import Shared

    experts = tmp_path / "experts"
    cfg = tiny_config(experts, tiny_model, generate={"num_instructions": 12,
                                                     "prompts_per_batch": 2})
    with pytest.raises(KeyboardInterrupt):
        specialize(["finance"], cfg, make_generator=Shared(engine, interrupt_on_call=3))
    work = experts / ".work" / "finance"
    before = read_jsonl(work / "generate" / "instructions.jsonl")
    assert before and not load_registry(experts).experts  # nothing published yet
    with pytest.raises(ConfigError, match="--resume"):
        specialize(["finance"], cfg, make_generator=Shared(engine))
    specialize(["finance"], cfg, resume=True, make_generator=Shared(engine))
    data = experts / "finance" / "data"
    generated = read_jsonl(data / "generated.jsonl")
    assert generated[:len(before)] == before  # nothing lost, nothing rewritten
    ids = [r["id"] for r in generated]
    assert len(ids) == len(set(ids))
    train = read_jsonl(data / "train.jsonl")
    assert len({r["id"] for r in train}) == len(train) == 12 - len(
        read_jsonl(data / "rejected_responses.jsonl"))


def test_stop_after_previews_the_data_and_resumes(tmp_path, tiny_model, engine):
    """--stop-after respond: answers written, nothing trained, the card in the work dir; the
    pipeline's own engine (no LoRA, as in a real run) scored every candidate's perplexity;
    --resume then trains and publishes the card."""
    from tests.integration.conftest import Shared

    experts = tmp_path / "experts"
    cfg = tiny_config(experts, tiny_model, generate={"num_instructions": 4})
    out = specialize(["math"], cfg, stop_after="respond")
    work = experts / ".work" / "math"
    assert list(json.loads((work / "state.json").read_text())["done"]) == [
        "generate", "filter", "respond"]
    assert out[0]["data_card"] == str(work / "data_card.md")
    card = json.loads((work / "data_card.json").read_text())
    assert card["stopped_after"] == "respond" and card["stages"]["filter"]["kept"] == 4
    assert card["stages"]["respond"] == {"answered": 4}
    assert (work / "data_card.md").read_text().startswith("# Data card: math")
    assert not load_registry(experts).experts and not (work / "train").exists()
    perplexity = json.loads((work / "filter" / "config.json").read_text())["perplexity"]
    assert perplexity["max_nll"] > perplexity["seeds_median_nll"] > 0
    rows = read_jsonl(work / "filter" / "kept.jsonl") + read_jsonl(
        work / "filter" / "rejected.jsonl")
    assert all(r["nll"] > 0 for r in rows)

    specialize(["math"], cfg, resume=True, make_generator=Shared(engine))
    entry = load_registry(experts).get("math")
    published = json.loads((experts / entry.path / "data_card.json").read_text())
    assert published["stopped_after"] is None and published["stages"]["filter_responses"]


def test_meaning_filters_reject_a_random_model_s_noise(tmp_path, tiny_model, engine):
    """With the default filters, a random model's text is rejected with the reasons that say
    why (not a task, a fragment, off the domain); the run stops with that said."""
    from core.errors import ConfigError
    from tests.integration.conftest import Shared

    experts = tmp_path / "experts"
    cfg = tiny_config(experts, tiny_model, generate={"num_instructions": 4, "patience": 2},
                      filter={"wellformed": True, "relevance": True})
    try:
        specialize(["math"], cfg, make_generator=Shared(engine), stop_after="filter")
    except ConfigError as e:
        assert "wrote no usable instruction" in str(e)
    rejected = read_jsonl(experts / ".work" / "math" / "filter" / "rejected.jsonl")
    meaning = [r for r in rejected if r["reason"] in ("not_a_task", "fragment", "off_domain",
                                                      "input_unrelated")]
    assert len(meaning) >= 0.8 * len(rejected) and len(rejected) >= 8, \
        sorted({r["reason"] for r in rejected})
    assert all(r["detail"] for r in meaning)


def test_dense_retrieval_grounds_answers_in_the_nearest_passages(tmp_path, tiny_model, engine):
    """--retrieval dense for real: the encoder the CLI hands over (the embedded
    all-MiniLM-L6-v2) embeds the math corpus, and each answer's passages are the ones nearest
    its instruction by that encoder's cosine."""
    import numpy as np

    from core.seeds import load_domain
    from specialize.cli import dense_encoder
    from specialize.retrieve import load_passages
    from tests.integration.conftest import Shared

    experts = tmp_path / "experts"
    cfg = tiny_config(experts, tiny_model, generate={"num_instructions": 4},
                      respond={"retrieval": "dense", "top_k": 2})
    make_encoder = dense_encoder(cfg)
    specialize(["math"], cfg, make_generator=Shared(engine), stop_after="respond",
               make_encoder=make_encoder)
    respond = experts / ".work" / "math" / "respond"
    assert json.loads((respond / "config.json").read_text())["retrieval_used"] == "dense"
    rows = read_jsonl(respond / "responses.jsonl")
    assert len(rows) == 4 and all(len(r["passages"]) == 2 for r in rows)

    encoder = make_encoder()
    assert encoder.name == "all-MiniLM-L6-v2"
    passages = load_passages(load_domain("math").corpus_dir, cfg.respond.passage_words)
    cosines = encoder.encode([f"{r['instruction']} {r.get('input', '')}" for r in rows]) @ \
        encoder.encode(passages).T
    for row, cos in zip(rows, cosines):
        best = np.sort(cos)[::-1]
        # The two retrieved are the two nearest (1e-3: bf16 vectors from other batches).
        assert cos[row["passages"][0]] >= best[0] - 1e-3, (row, best[:3])
        assert cos[row["passages"][1]] >= best[1] - 1e-3, (row, best[:3])
        assert row["passages"][0] != row["passages"][1]


def test_self_consistency_samples_k_answers_in_one_request_each(tmp_path, engine):
    """respond.self_consistency for real: vLLM's `n` returns k sampled answers per closed-form
    prompt in one request, the stage stores one vote per sample, and stage 4 judges exactly
    the closed-form answers (a random model's answers open with no label, so the vote rejects
    both; the open-ended answer is never judged)."""
    from core.engine import Sampling
    from core.jsonl import append_jsonl
    from core.seeds import load_domain
    from specialize.config import RespondConfig, ResponseFilterConfig
    from specialize.filter_responses import filter_responses
    from specialize.respond import generate_responses
    from tests.integration.conftest import Shared

    (one,) = engine.complete(["Is 221 a prime number?"], Sampling(temperature=1.0, max_tokens=8,
                                                                   n=4))
    assert len(one.samples) == 4 and one.text == one.samples[0]
    assert len(set(one.samples)) > 1  # sampled, not one answer repeated

    append_jsonl(tmp_path / "filter" / "kept.jsonl", [
        {"id": "m-yes", "instruction": "Is 221 a prime number?", "input": ""},
        {"id": "m-mc", "instruction": "What is the slope of the line 4x - 2y = 6?",
         "input": "A) -2 B) 4 C) 3 D) 2"},
        {"id": "m-open", "instruction": "Explain what a derivative measures.", "input": ""}])
    shared = Shared(engine)
    # Sampled answers: greedy, a random model loops on "\n" and the answer would be "empty".
    cfg = RespondConfig(self_consistency=3, max_tokens=16, retrieval="none", temperature=1.0)
    generate_responses(load_domain("math"), cfg, shared, tmp_path)
    assert shared.calls == 2  # the answers, then one request per closed-form prompt
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "respond" / "responses.jsonl")}
    assert [len(rows[k]["consistency"]["votes"]) for k in ("m-yes", "m-mc")] == [3, 3]
    assert rows["m-mc"]["consistency"]["labels"] == ["A", "B", "C", "D"]
    assert "consistency" not in rows["m-open"]
    summary = filter_responses(ResponseFilterConfig(drop_truncated=False), tmp_path)
    assert summary["closed_form_voted"] == 2
    rejected = {r["id"]: r["reason"] for r in
                read_jsonl(tmp_path / "respond_filter" / "rejected.jsonl")}
    assert set(rejected) == {"m-yes", "m-mc"}
    assert set(rejected.values()) <= {"no_label", "inconsistent"}


def test_user_style_queries_through_real_vllm(tmp_path, engine):
    """Stage 2b on the real engine: the guided format holds for every style (one line an item,
    within the style's length cap), the candidates are parsed and filtered with the real encoder
    (a random model's noise is rejected, each with its reason)."""
    from core.seeds import load_domain
    from specialize.config import QueriesConfig
    from specialize.queries import MAX_CHARS, generate_queries
    from tests.integration.conftest import Shared

    shared = Shared(engine)
    cfg = QueriesConfig(candidates=10, items_per_prompt=2)
    res = generate_queries(load_domain("math"), cfg, shared, tmp_path)
    assert shared.calls == 5  # one engine call per style
    rows = read_jsonl(tmp_path / "queries" / "candidates.jsonl")
    assert 5 <= len(rows) == res["candidates"] <= 10  # at least one item per prompt
    assert all("\n" not in r["query"] and len(r["query"]) <= MAX_CHARS[r["style"]] for r in rows)
    rejected = read_jsonl(tmp_path / "queries" / "rejected.jsonl")
    assert res["kept"] + len(rejected) == len(rows) and all(r["reason"] for r in rejected)
