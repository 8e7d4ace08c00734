"""The shipped seeds as router inputs: exemplars per domain, a registry built from them, and the
routing evaluation sets. Used by tests, the bench (before any expert is specialized) and anyone
trying the router on the seeds alone. The routing sets are evaluation data: nothing here feeds
them into calibration or into an index.

Two kinds of routing set ship in seeds/:
  seeds/<domain>/routing.jsonl, seeds/routing_none.jsonl   short, mostly exam-style queries;
  seeds/routing_user_dev.jsonl, seeds/routing_user_test.jsonl   the user-style set: queries as
      people ask them, each tagged with one of STYLES. Dev chooses the router's settings, test
      reports them (docs/router.md).
"""

from __future__ import annotations

from pathlib import Path

from core.registry import ExpertEntry, LoraInfo, Registry, TrainInfo, utcnow, write_registry
from core.seeds import RoutingItem, available_domains, load_domain, load_jsonl, seeds_root

# How users ask (issue 17): a long story ending in the question, lay wording, two or three bare
# keywords, an exam-style question, a task ("draft a clause that ...").
STYLES = ("story", "lay", "keywords", "exam", "task")
USER_SPLITS = ("dev", "test")


def seed_exemplars(root: Path | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{domain: seed instructions}, {domain: description} for every shipped domain."""
    exemplars, descriptions = {}, {}
    for name in available_domains(root):
        domain = load_domain(name, root)
        exemplars[name] = [s.instruction for s in domain.seeds]
        descriptions[name] = domain.description
    return exemplars, descriptions


def write_seed_registry(experts_dir: Path, root: Path | None = None,
                        domains: list[str] | None = None, revision: int = 1) -> Registry:
    """A registry whose experts carry the seeds' exemplars and placeholder adapters: what the
    router reads from a real `selfspec specialize --all`, minus the generated exemplars."""
    exemplars, descriptions = seed_exemplars(root)
    registry = Registry(revision=revision, updated=utcnow())
    for name in domains or sorted(exemplars):
        registry.experts[name] = ExpertEntry(
            name=name, version=1, description=descriptions[name], base_model="placeholder",
            base_model_path="placeholder", path=f".versions/{name}/v1",
            lora=LoraInfo(rank=8, alpha=16, target_modules=["q_proj"]),
            train=TrainInfo(examples=0, epochs=0), exemplars=exemplars[name], created=utcnow())
    experts_dir.mkdir(parents=True, exist_ok=True)
    write_registry(experts_dir, registry)
    return registry


def routing_files(root: Path | None = None) -> list[Path]:
    """seeds/*/routing.jsonl + seeds/routing_none.jsonl: the shipped evaluation sets."""
    root = root or seeds_root()
    files = sorted(root.glob("*/routing.jsonl"))
    if (root / "routing_none.jsonl").is_file():
        files.append(root / "routing_none.jsonl")
    return files


def user_routing_files(split: str, root: Path | None = None) -> list[Path]:
    """seeds/routing_user_<split>.jsonl ("dev" or "test"): the user-style set's halves."""
    if split not in USER_SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(USER_SPLITS)}")
    path = (root or seeds_root()) / f"routing_user_{split}.jsonl"
    return [path] if path.is_file() else []


def load_routing(paths: list[Path]) -> list[RoutingItem]:
    items: list[RoutingItem] = []
    for p in paths:
        items.extend(load_jsonl(Path(p), RoutingItem))
    return items
