"""`selfspec bench train`: stage 5 through TRL's SFTTrainer (specialize/train.py) against the
hand-written loop it replaced (bench/train_loop.py), on the same data, seed and settings.

Issue 21's bounds on CPU: the same loss curve within noise and at most 1.2x the loop's wall time.
Each run is its own fresh process (nothing warm carries from one to the next), the two trainers
alternate (loop, sft, loop, sft, ...) so that a change in the machine's load hits both, and each
one's median is reported. The data: `--train-data FILE`, else the first 64 seed pairs of one
shipped domain, rendered and masked as stage 5 renders generated ones. Numbers go to
`<out>/bench_train.json` (`--out docs/results` for the committed ones).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.precision import cpu_model

TRAINERS = ("loop", "sft")


def seed_rows(domain: str, n: int) -> list[dict]:
    from core.seeds import load_domain

    seeds = load_domain(domain).seeds[:n]
    return [{"instruction": s.instruction, "input": s.input, "output": s.output} for s in seeds]


def _one(trainer: str, base: str, data: str, out: str, cfg_json: str) -> None:
    """In a fresh process: one training run; prints its wall time and summary as JSON."""
    from specialize.config import TrainConfig

    cfg = TrainConfig.model_validate_json(cfg_json)
    if trainer == "loop":
        from bench.train_loop import train_adapter_loop as train
    else:
        from specialize.train import train_adapter as train
    start = time.perf_counter()
    summary = train(Path(base), cfg, Path(data), Path(out))
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": round(wall, 2), "summary": summary}))


def compare_curves(loop: list[dict], sft: list[dict]) -> dict:
    a, b = [r["loss"] for r in loop], [r["loss"] for r in sft]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return {"steps": [len(a), len(b)],
            "max_abs_diff_per_step": round(max(diffs), 5),
            "mean_abs_diff_per_step": round(sum(diffs) / len(diffs), 5),
            "final_loss": {"loop": round(a[-1], 4), "sft": round(b[-1], 4)},
            "first_loss": {"loop": round(a[0], 4), "sft": round(b[0], 4)},
            "loss_per_step": {"loop": [round(x, 4) for x in a], "sft": [round(x, 4) for x in b]}}


def summarize(runs: dict[str, list[dict]], curves: dict[str, list[dict]]) -> dict:
    done = [t for t in TRAINERS if runs[t]]
    med = {t: statistics.median(r["wall_s"] for r in runs[t]) for t in done}
    med_train = {t: statistics.median(r["train_s"] for r in runs[t]) for t in done}
    out = {"runs": runs, "median_wall_s": med, "median_train_s": med_train}
    if len(done) == len(TRAINERS):
        out["wall_ratio_sft_over_loop"] = round(med["sft"] / med["loop"], 3)
        out["train_ratio_sft_over_loop"] = round(med_train["sft"] / med_train["loop"], 3)
        out["loss"] = compare_curves(curves["loop"], curves["sft"])
    return out


def bench_train(base: Path, rows: list[dict], cfg, rounds: int, workdir: Path,
                report=lambda partial: None) -> dict:
    """`report` gets the numbers so far after every run, so a run cut short still leaves them."""
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    runs: dict[str, list[dict]] = {t: [] for t in TRAINERS}
    curves: dict[str, list[dict]] = {}
    for i in range(rounds):
        for trainer in TRAINERS:
            out = workdir / f"{trainer}{i}" / "train"
            print(f"round {i + 1}/{rounds}: {trainer} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [sys.executable, "-m", "bench.train", "--one", trainer, str(base),
                 str(data), str(out), cfg.model_dump_json()],
                env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{trainer} run failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[trainer].append({"wall_s": res["wall_s"], "train_s": res["summary"]["seconds"],
                                  "steps": res["summary"]["steps"]})
            curves.setdefault(trainer, json.loads((out / "loss.json").read_text()))
            report({"examples": len(rows), "train_config": cfg.model_dump(mode="json"),
                    **summarize(runs, curves)})
    return {"examples": len(rows), "train_config": cfg.model_dump(mode="json"),
            **summarize(runs, curves)}


def run_train_bench(args) -> int:
    from core.base_model import resolve_base_model
    from specialize.config import TrainConfig

    if args.train_data:
        from core.jsonl import read_jsonl

        rows, source = read_jsonl(args.train_data)[:args.train_rows], str(args.train_data)
    else:
        rows = seed_rows(args.train_domain, args.train_rows)
        source = f"seeds/{args.train_domain}: first {len(rows)} seed pairs"
    cfg = TrainConfig(seed=0, epochs=args.train_epochs)  # the rest: stage 5's defaults
    base = resolve_base_model(args.base_model)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_train.json"

    def report(numbers: dict) -> dict:
        result = {"base_model": args.base_model, "data": source, "machine": _machine(),
                  "load_avg_1m": round(os.getloadavg()[0], 2), **numbers}
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        result = report(bench_train(base, rows, cfg, args.train_rounds, Path(tmp), report))
    loss = result["loss"]
    print(f"wall: loop {result['median_wall_s']['loop']:.1f} s, sft "
          f"{result['median_wall_s']['sft']:.1f} s (ratio {result['wall_ratio_sft_over_loop']}); "
          f"loss per step max |diff| {loss['max_abs_diff_per_step']}, final "
          f"{loss['final_loss']['loop']} vs {loss['final_loss']['sft']}\nwrote {path}")
    return 0


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        _one(*sys.argv[2:7])
