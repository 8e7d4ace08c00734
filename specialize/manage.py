"""`selfspec experts rollback | remove | show`: manage the registry's experts by hand (`add`:
specialize/add.py).

- rollback: the registry names an older version folder again. Version folders are never
  deleted, so a rollback is a registry change only.
- remove: the registry forgets the expert. Its version folders stay on disk: in-flight requests
  and a replica that has not polled yet still find the files, and `rollback --to vN` restores it.

Each change is one atomic replace of registry.json that bumps its revision, so a running server
(serve/watch.py) picks it up at its next poll, and the router index goes stale and is rebuilt.
A refused change writes nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import (
    ConfigError,
    ExpertNotFoundError,
    RegistryError,
)
from core.registry import (
    ExpertEntry,
    Registry,
    check_name,
    commit_registry,
    load_registry,
    locked,
    read_version,
    version_dirs,
)
from specialize.datacard import CARD_MD
from specialize.publish import _point_symlink as point_symlink


@dataclass(frozen=True)
class Change:
    """What a registry change did; `revision` is the registry revision it wrote."""

    name: str
    before: ExpertEntry | None
    after: ExpertEntry | None
    revision: int


# --- rollback and remove -------------------------------------------------------------------

def parse_version(text: str) -> int:
    """'v2' or '2' -> 2."""
    m = re.fullmatch(r"v?([1-9][0-9]*)", text.strip())
    if not m:
        raise ConfigError(f"version {text!r}: write it as vN, e.g. v1")
    return int(m[1])


def rollback_expert(experts_dir: Path, name: str, to: int | None = None) -> Change:
    """Point the registry at an older version (default: the one before the current), or
    restore a removed expert (`to` required: which version is a choice to make)."""
    check_name(name)
    _known(experts_dir, name)
    with locked(experts_dir):
        registry = load_registry(experts_dir)
        versions = version_dirs(experts_dir, name)
        on_disk = ", ".join(f"v{v}" for v in versions) or "none"
        before = registry.experts.get(name)
        if to is None:
            if before is None:
                raise ExpertNotFoundError(f"{name!r} was removed from the registry: restore it "
                                          f"with --to vN (versions on disk: {on_disk})")
            earlier = [v for v in versions if v < before.version]
            if not earlier:
                raise RegistryError(f"{name} v{before.version} has no earlier version to roll "
                                    f"back to (versions on disk: {on_disk})")
            to = earlier[-1]
        if to not in versions:
            raise ExpertNotFoundError(f"{name} has no version v{to} (versions on disk: "
                                      f"{on_disk})")
        if before is not None and before.version == to:
            raise RegistryError(f"{name} is already at v{to}: nothing to roll back")
        entry = read_version(experts_dir, name, to)
        if (entry.name, entry.version, entry.path) != (name, to, f".versions/{name}/v{to}"):
            raise RegistryError(f"{versions[to] / 'expert.json'} names {entry.name} "
                                f"v{entry.version} at {entry.path}, not {name} v{to}: the "
                                "folder was moved by hand; move it back")
        _commit(experts_dir, registry, name, entry)
    return Change(name, before, entry, registry.revision)


def remove_expert(experts_dir: Path, name: str, force: bool = False) -> Change:
    """Take the expert out of the registry; its version folders stay on disk."""
    check_name(name)
    _known(experts_dir, name)
    with locked(experts_dir):
        registry = load_registry(experts_dir)
        before = registry.get(name)
        if len(registry.experts) == 1 and not force:
            # The CLI cannot see a server's traffic, so the last expert is taken to carry
            # `auto` traffic: without it every `auto` request silently gets the base model.
            raise RegistryError(f"{name} is the last expert: without it every `auto` request "
                                "gets the base model. Pass --force to remove it anyway")
        del registry.experts[name]
        _commit(experts_dir, registry, name, None)
        link = experts_dir / name
        if link.is_symlink():  # the convenience link only; a user's own folder stays
            link.unlink(missing_ok=True)
    return Change(name, before, None, registry.revision)


def _known(experts_dir: Path, name: str) -> None:
    """Fail before taking the lock (which creates a lock file) when the name means nothing."""
    registry = load_registry(experts_dir)
    if name not in registry.experts and not version_dirs(experts_dir, name):
        registry.get(name)  # raises ExpertNotFoundError, listing the names


def _commit(experts_dir: Path, registry: Registry, name: str, entry: ExpertEntry | None) -> None:
    """Under the lock: claim the next revision with this change (commit_registry, which holds
    where the lock is node-local), then re-point `<name>`. `registry` gets the revision written."""

    def change(newest: Registry) -> None:
        if entry is None:
            newest.experts.pop(name, None)
        else:
            newest.experts[name] = entry

    change(registry)
    written = commit_registry(experts_dir, change)
    registry.revision, registry.updated = written.revision, written.updated
    if entry is not None:
        point_symlink(experts_dir / name, Path(entry.path))


# --- show ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertView:
    name: str
    entry: ExpertEntry | None  # None: removed from the registry, versions still on disk
    versions: dict[int, ExpertEntry]
    data_card: str | None
    eval_gain: str | None  # the gain over the base model in `selfspec eval`'s report


def describe_expert(experts_dir: Path, name: str, report: Path | None = None) -> ExpertView:
    check_name(name)
    _known(experts_dir, name)
    entry = load_registry(experts_dir).experts.get(name)
    versions = {v: read_version(experts_dir, name, v) for v in version_dirs(experts_dir, name)}
    card = None
    if entry is not None and (experts_dir / entry.path / CARD_MD).is_file():
        card = (experts_dir / entry.path / CARD_MD).read_text(encoding="utf-8")
    gain = eval_gain(report, experts_dir, entry) if entry and report else None
    return ExpertView(name, entry, versions, card, gain)


def eval_gain(report: Path, experts_dir: Path, entry: ExpertEntry) -> str | None:
    """One line from `selfspec eval`'s eval.json, when it measured this very version."""
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        reg = data["registry"]
        measured = reg["experts"][entry.name]["version"]
        comp = data["comparisons"]["expert_vs_base"][entry.name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if reg.get("experts_dir") and Path(reg["experts_dir"]) != experts_dir.resolve():
        return None  # another registry's expert of the same name
    if measured != entry.version:
        return f"not measured for v{entry.version} ({report} measured v{measured})"
    if comp.get("diff") is None:
        return None
    lo, hi = comp["ci"]
    return (f"{comp['diff']:+.3f} score over base on {comp['domain']} (95% CI {lo:+.3f} to "
            f"{hi:+.3f}; {report}, {data.get('created', '?')})")


def format_expert(view: ExpertView, experts_dir: Path) -> str:
    e = view.entry
    lines = []
    if e is None:
        lines.append(f"{view.name}: not in the registry (removed); restore a version with "
                     f"`selfspec experts rollback {view.name} --to vN`")
    else:
        lines += [f"{e.name} v{e.version}  ({e.lora_name} in the engine)",
                  f"  description   {e.description}",
                  f"  base model    {e.base_model} ({e.base_model_path})",
                  f"  adapter       {experts_dir / e.adapter_path}  rank {e.lora.rank}, "
                  f"alpha {e.lora.alpha}, {', '.join(e.lora.target_modules)}"]
        if e.train is not None:
            t = e.train
            loss = (f", loss {t.loss_first:.2f} -> {t.loss_last:.2f}"
                    if t.loss_first is not None and t.loss_last is not None else "")
            lines.append(f"  training      {t.examples} examples, {t.epochs:g} epochs, "
                         f"{t.rounds} round(s){loss}")
        else:
            lines.append(f"  training      outside selfspec; added from {e.source}")
        lines += [f"  exemplars     {len(e.exemplars)} routing queries",
                  # measured after training on the domain's validation split (specialize/gain.py)
                  "  measured gain " + (e.gain.describe() if e.gain else "not measured"),
                  f"  eval gain     {view.eval_gain or 'none in an eval report (selfspec eval)'}",
                  f"  created       {e.created:%Y-%m-%d %H:%M} UTC"]
    lines.append("  versions      " + ", ".join(
        f"v{v}{' (current)' if e and v == e.version else ''} {x.created:%Y-%m-%d}"
        for v, x in view.versions.items()))
    lines.append("")
    lines.append(view.data_card.rstrip() if view.data_card else "no data card")
    return "\n".join(lines)
