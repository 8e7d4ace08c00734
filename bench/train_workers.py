"""Stage 5 in one process against `--train-workers N` on Ray Train, on this machine.

    python -m bench.train_workers [--examples 64] [--workers 2] [--out docs/results]

Trains the embedded base model on the shipped seeds' own answers (the first `--examples` of all
domains, one epoch, the default batch of 8), once with `train_adapter` in this process and once
with `train_adapter_on_workers` on a local Ray cluster of this machine's CPUs, and writes wall
time (load, train, save), the trainer's own seconds and the losses of both to
`<out>/bench_train_workers.json`. On 2 cores two gloo workers get one core each, so what this
shows is the overhead of the workers, not a speed-up; on a GPU cluster each worker has a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from core.base_model import resolve_base_model
from core.jsonl import write_jsonl
from core.seeds import available_domains, load_domain
from specialize.config import GainConfig, TrainConfig


def seed_examples(n: int) -> list[dict]:
    rows = [{"instruction": s.instruction, "input": s.input, "output": s.output}
            for d in available_domains() for s in load_domain(d).seeds]
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)

    import ray

    from core.precision import cpu_model
    from specialize.train import train_adapter
    from specialize.train_workers import train_adapter_on_workers

    base = resolve_base_model("smollm2-135m-instruct")
    cores = os.cpu_count() or 1
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_jsonl(data, seed_examples(args.examples))
        one = TrainConfig(epochs=1, threads=cores)
        t = time.perf_counter()
        s = train_adapter(base, one, data, Path(tmp) / "one" / "train", None, GainConfig())
        runs["one_process"] = {"wall_s": round(time.perf_counter() - t, 1), **s}
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            many = one.model_copy(update={"workers": args.workers, "threads": None})
            t = time.perf_counter()
            s = train_adapter_on_workers(base, many, data, Path(tmp) / "many" / "train")
            runs[f"{args.workers}_workers"] = {"wall_s": round(time.perf_counter() - t, 1), **s}
        finally:
            ray.shutdown()
    result = {"cpu": cpu_model(), "cores": cores, "examples": args.examples, "epochs": 1,
              "batch_size": one.batch_size, "load_avg": [round(x, 1) for x in os.getloadavg()],
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_train_workers.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
