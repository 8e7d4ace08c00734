"""Stage 7: publish a trained expert into the registry, atomically.

1. Build the whole version folder under `.versions/<name>/.staging-*` (adapter, data, logs,
   expert.json) and fsync it, then rename it to `.versions/<name>/v<N>` (one atomic rename; it
   fails when another publisher took v<N>, and the next number is tried).
2. Claim the next registry revision with the expert in it and bring `registry.json` up to it
   (core.registry.commit_registry: a compare-and-swap that holds even where the registry lock
   is node-local, e.g. NFS with local_lock, gcsfuse, s3fs).
3. Re-point the convenience symlink `<name> -> .versions/<name>/v<N>` (also an os.replace).

A crash before step 2 leaves an unreferenced folder and the old registry; nothing half-written is
ever visible to the router or the server, which read only what registry.json names.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import RegistryError
from core.jsonl import fsync_dir, fsync_tree, read_jsonl, write_json
from core.registry import (
    CLAIM_TRIES,
    ExpertEntry,
    GainInfo,
    LoraInfo,
    Registry,
    TrainInfo,
    check_locking,
    commit_registry,
    load_registry,
    newest_registry,
    utcnow,
    version_dirs,
)
from core.seeds import Domain

# Work-dir file -> name inside the published data/ folder.
DATA_FILES = {
    "generate/instructions.jsonl": "generated.jsonl",
    "filter/kept.jsonl": "kept_instructions.jsonl",
    "filter/rejected.jsonl": "rejected_instructions.jsonl",
    "respond/responses.jsonl": "responses.jsonl",
    "respond_filter/rejected.jsonl": "rejected_responses.jsonl",
    "respond2/responses.jsonl": "responses_round2.jsonl",
    "respond2_filter/rejected.jsonl": "rejected_responses_round2.jsonl",
    "queries/candidates.jsonl": "generated_queries.jsonl",
    "queries/kept.jsonl": "kept_queries.jsonl",
    "queries/rejected.jsonl": "rejected_queries.jsonl",
}


def ensure_writable(experts_dir: Path) -> None:
    """Fail before any heavy work if the registry cannot be written."""
    try:
        experts_dir.mkdir(parents=True, exist_ok=True)
        probe = experts_dir / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RegistryError(f"experts dir {experts_dir} is not writable ({e.strerror}): pass "
                            "--experts-dir with a folder you can write") from e
    check_locking(experts_dir)  # a filesystem without flock fails now, not after training
    load_registry(experts_dir)  # an unreadable registry fails now, not after training


@dataclass(frozen=True)
class PublishRequest:
    """One trained expert, and where everything it is published from lies."""

    domain: Domain
    experts_dir: Path  # the registry to publish into
    workdir: Path  # the domain's work dir: DATA_FILES, summary.json, the data card
    train_dir: Path  # the final training stage: adapter/, loss.json, loss.png
    train_file: Path  # the examples the adapter was trained on
    lora: dict  # the adapter check's verdict: LoraInfo's fields
    train_summary: dict  # the training stage's result: examples, epochs, losses, gain
    base_model: str  # as the user named it
    base_model_path: Path  # the folder it resolved to
    resolved_config: dict  # the run's config, saved as config.json beside the adapter
    rounds: int
    n_exemplars: int  # kept generated instructions the router gets besides every seed
    seed: int = 0  # picks those instructions
    queries: tuple[str, ...] = ()  # kept user-style queries (queries.py), also router exemplars


def publish_expert(req: PublishRequest) -> ExpertEntry:
    domain, experts_dir, workdir, train_dir = req.domain, req.experts_dir, req.workdir, \
        req.train_dir
    name = domain.name
    versions = experts_dir / ".versions" / name
    versions.mkdir(parents=True, exist_ok=True)
    staging = versions / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(train_dir / "adapter", staging / "adapter")
        (staging / "data").mkdir()
        for src, dst in DATA_FILES.items():
            if (workdir / src).exists():
                shutil.copy2(workdir / src, staging / "data" / dst)
        shutil.copy2(req.train_file, staging / "data" / "train.jsonl")
        for f in ("loss.json", "loss.png"):
            shutil.copy2(train_dir / f, staging / f)
        for f in ("summary.json", "data_card.json", "data_card.md"):
            if (workdir / f).exists():
                shutil.copy2(workdir / f, staging / f)
        write_json(staging / "config.json", req.resolved_config)

        kept = [r["instruction"] for r in read_jsonl(workdir / "filter" / "kept.jsonl")]
        sample = random.Random(f"{req.seed}:{name}").sample(kept,
                                                            min(req.n_exemplars, len(kept)))
        fsync_tree(staging)  # on disk before the registry names it (a power cut, not empty files)
        summary = req.train_summary
        entry = claim_version(experts_dir, name, staging, lambda version: ExpertEntry(
            name=name, version=version, description=domain.description,
            base_model=req.base_model, base_model_path=str(req.base_model_path),
            path=f".versions/{name}/v{version}",
            lora=LoraInfo(**req.lora),
            train=TrainInfo(examples=summary["examples"], epochs=summary["epochs"],
                            loss_first=summary["loss_first"],
                            loss_last=summary["loss_last"], rounds=req.rounds),
            exemplars=[s.instruction for s in domain.seeds] + sample + list(req.queries),
            created=utcnow(),
            # expert vs base on the validation split, measured after training (gain.py)
            gain=GainInfo(**summary["gain"]) if summary.get("gain") else None))
        register(experts_dir, entry)
        return entry
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def claim_version(experts_dir: Path, name: str, staging: Path,
                  make_entry: Callable[[int], ExpertEntry]) -> ExpertEntry:
    """Rename the complete `staging` folder to `.versions/<name>/v<N>`, N the next free number,
    with `make_entry(N)` as its expert.json. The rename claims N (a folder cannot be renamed onto
    a full one), so two publishers that read the same N both succeed, one with N+1: this holds
    where the registry lock does not exclude."""
    versions = experts_dir / ".versions" / name
    for _ in range(CLAIM_TRIES):
        registry = newest_registry(experts_dir)
        version = max([*version_dirs(experts_dir, name),
                       registry.experts[name].version if name in registry.experts else 0]) + 1
        entry = make_entry(version)
        write_json(staging / "expert.json", entry.model_dump(mode="json"))
        try:
            os.rename(staging, versions / f"v{version}")  # the folder appears complete
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue  # another publisher took v<version> a moment ago
        fsync_dir(versions)
        return entry
    raise RegistryError(f"could not claim a version folder in {versions} after {CLAIM_TRIES} "
                        "tries")


def register(experts_dir: Path, entry: ExpertEntry) -> Registry:
    """Name a claimed version in the registry (a revision compare-and-swap, commit_registry) and
    re-point `<name>`; returns the revision written. A newer version of the expert that another
    publisher registered first stays current: this one is kept on disk for a rollback."""

    def add(registry: Registry) -> None:
        current = registry.experts.get(entry.name)
        if current is None or current.version < entry.version:
            registry.experts[entry.name] = entry

    written = commit_registry(experts_dir, add)
    _follow_symlink(experts_dir, entry.name)
    return written


def _follow_symlink(experts_dir: Path, name: str) -> None:
    """Point `<name>` at the version the registry names, and check by reading both back: a
    publisher of an older version may re-point it at any moment until each has checked."""
    for _ in range(CLAIM_TRIES):
        current = newest_registry(experts_dir).experts.get(name)
        link = experts_dir / name
        if current is None or (link.is_symlink() and os.readlink(link) == current.path):
            return
        if link.exists() and not link.is_symlink():
            return  # a user's own folder of that name: leave it, the registry is what counts
        _point_symlink(link, Path(current.path))


def _point_symlink(link: Path, target: Path) -> None:
    if link.exists() and not link.is_symlink():
        return  # a user's own folder of that name: leave it, the registry is what counts
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    os.replace(tmp, link)
