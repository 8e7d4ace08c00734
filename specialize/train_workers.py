"""Stage 5 on several workers: `train_adapter` data-parallel under Ray Train's `TorchTrainer`.

Each of `TrainConfig.workers` Ray Train workers runs the same `specialize.train.train_adapter`;
Ray Train starts torch.distributed among them (gloo on CPU, NCCL on GPUs) and sets RANK /
LOCAL_RANK / WORLD_SIZE, so SFTTrainer (through accelerate) wraps the model in
DistributedDataParallel, gives each rank its share of every batch and averages the gradients.
Only rank 0 writes adapter/, loss.json, loss.png and config.json, into the same folder as a
one-process run, so validation and publishing are unchanged; the summary this returns is the one
rank 0 wrote into config.json.

It runs on the Ray cluster the process is connected to: inside a `--ray-address` domain task,
the task's own cluster. A domain task waits in `fit()` while its workers train; Ray lends the
waiting task's CPUs to them (a task blocked in `ray.get` releases its CPUs, not its GPUs), so a
CPU node that runs one domain task can also run its workers, while on GPUs the workers need GPUs
beyond the task's own. Workers' run files go under `<out>/ray_train/` (on the shared
filesystem the distributed run already requires) and are removed after a successful fit.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from core.errors import ConfigError
from specialize.config import GainConfig, TrainConfig


def _train_loop(config: dict) -> None:
    """One Ray Train worker: the ordinary stage 5 under the process group Ray Train set up."""
    from specialize.train import train_adapter

    train_adapter(Path(config["base"]), config["cfg"], Path(config["train_file"]),
                  Path(config["out_dir"]), config["gain_items"], config["gain_cfg"])


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def train_adapter_on_workers(base_model_path: Path, cfg: TrainConfig, train_file: Path,
                             out_dir: Path, gain_items: list | None = None,
                             gain_cfg: GainConfig | None = None,
                             use_gpu: bool | None = None) -> dict:
    """`train_adapter` on `cfg.workers` Ray Train workers; `use_gpu` None: a GPU per worker
    when the cluster has GPUs. Needs a connected Ray session (`--ray-address`)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise ConfigError(f"--train-workers {cfg.workers} trains on Ray: add --ray-address "
                          "auto|local|ADDR")
    gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    out_dir = out_dir.resolve()
    storage = out_dir / "ray_train"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"base": str(base_model_path), "cfg": cfg,
                           "train_file": str(train_file.resolve()), "out_dir": str(out_dir),
                           "gain_items": gain_items, "gain_cfg": gain_cfg},
        # One CPU per worker feeds a GPU; on CPU it is the worker's torch thread count (Ray sets
        # OMP_NUM_THREADS from it), so N workers on an N-core node do not oversubscribe it.
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=f"train-{uuid.uuid4().hex[:8]}", storage_path=str(storage)))
    trainer.fit()  # raises the first worker's error (Ray's TrainingFailedError wraps it)
    summary = json.loads((out_dir / "config.json").read_text())["result"]
    summary["workers"] = cfg.workers
    shutil.rmtree(storage, ignore_errors=True)
    return summary
