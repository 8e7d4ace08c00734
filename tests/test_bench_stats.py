"""The serving bench's statistics: medians over alternating rounds, paired latency overhead."""

from bench.serving import median_run
from bench.serving_latency import latency_summary
from bench.serving_load import LoadResult


def run(tokens_per_s: float) -> LoadResult:
    return LoadResult(10, 100 / tokens_per_s, 100, [0.5] * 10, ["law"] * 10)


def test_median_run_is_the_middle_run_and_keeps_every_run():
    out = median_run([run(180.0), run(150.0), run(200.0)])
    assert out["tokens_per_s"] == 180.0
    assert out["runs_tokens_per_s"] == [180.0, 150.0, 200.0]
    assert median_run([run(100.0), run(120.0)])["tokens_per_s"] == 100.0  # lower middle


def test_latency_overhead_pairs_cancel_drift():
    # The machine slows down 30% halfway; routing adds 10 ms to a 1 s request throughout.
    forced = [1.0] * 6 + [1.3] * 6
    auto = [f + 0.010 for f in forced]
    out = latency_summary(auto, forced)
    assert out["paired_diff_p50_s"] == 0.01
    assert out["overhead"] == round(0.010 / 1.15, 4)
    assert out["pairs"] == 12


def test_the_report_says_where_the_stack_ran():
    from bench.serving import pinning_line

    line = pinning_line({"worker_cpus": [0], "serve_cpus": [1], "processes": 9})
    assert line == "stack CPU pinning: vLLM's worker on cores [0], 9 Serve processes on [1]"
    assert "none" in pinning_line(None)
