"""The expert registry: the one contract between `specialize/` (writer) and `router/` + `serve/`.

Layout under the experts dir (default `experts/`):

    registry.json                     this schema, rewritten atomically on every publish
    .versions/<name>/v<N>/            immutable published versions: adapter/ data/ expert.json
    <name> -> .versions/<name>/v<N>   convenience symlink to the current version
    .lock                             held while a publisher rewrites registry.json
    .revisions/r<N>.json              revision N as its writer claimed it (see commit_registry)

Visibility is defined by `registry.json` alone: a version directory is complete before the
registry names it, and the registry file is replaced with `os.replace`, so a crash at any point
leaves either the old or the new registry, never a half-written expert (a revision claimed by a
writer killed before it rewrote registry.json is written by the next change). Paths inside the registry
are relative to the experts dir, so the folder can be moved or mounted elsewhere (a Ray cluster's
shared volume) as a unit.

This module imports nothing heavy: the router and the serving ingress read it without torch/vLLM.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ExpertNotFoundError, RegistryError
from core.jsonl import fsync_dir

FORMAT_VERSION = 1
REGISTRY_FILE = "registry.json"
LOCK_FILE = ".lock"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Names an expert can never take: they mean something else in the serving `model` field, or
# name a folder beside the registry (the router index lives in <experts>/router/).
RESERVED_NAMES = frozenset({"auto", "base", "none", "router"})


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name in RESERVED_NAMES:
        raise RegistryError(
            f"invalid expert name {name!r}: use 1-64 lowercase letters, digits, '-' or '_' "
            f"(starting with a letter or digit), not one of {sorted(RESERVED_NAMES)}"
        )
    return name


class LoraInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int
    alpha: int
    target_modules: list[str]


class TrainInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: int
    epochs: float
    loss_first: float | None = None
    loss_last: float | None = None
    rounds: int = 1


class GainInfo(BaseModel):
    """The expert against its base model on its domain's validation split (seeds/<domain>/
    validation.jsonl, which `selfspec eval` never reads), measured right after training
    (specialize/gain.py). `auto` routes only to experts whose gain helps (`router.require_gain`)."""

    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="what one item scores, e.g. validation_score (0/1)")
    expert: float
    base: float
    diff: float = Field(description="expert - base, mean over the same items")
    ci: list[float] = Field(description="95% paired bootstrap interval of diff")
    p_not_better: float = Field(description="share of bootstrap resamples with diff <= 0")
    n: int = Field(ge=1, description="validation items scored")

    def helps(self, max_p: float = 1.0) -> bool:
        return self.diff > 0 and self.p_not_better <= max_p

    def describe(self) -> str:
        lo, hi = self.ci
        return (f"{self.diff:+.3f} vs base on validation (95% CI {lo:+.3f}..{hi:+.3f}, "
                f"p {self.p_not_better:.2f}, n {self.n})")


def gain_refusal(gain: GainInfo | None, require_gain: str, max_p: float = 1.0) -> str:
    """Why `auto` must not send a query to an expert with this gain ("" when it may).
    require_gain: "off" (any expert), "on" (a measured gain must help; an unmeasured expert -
    an old registry, `selfspec experts add` - is given the benefit of the doubt), "strict" (only
    experts measured to help)."""
    if require_gain == "off":
        return ""
    if gain is None:
        return "its gain over the base model is not measured" if require_gain == "strict" else ""
    if gain.helps(max_p):
        return ""
    if gain.diff > 0:
        return f"its gain is not significant ({gain.describe()}; needs p <= {max_p:g})"
    return f"it did not beat the base model ({gain.describe()})"


class ExpertEntry(BaseModel):
    """One published expert version. `expert.json` in the version folder holds the same object."""

    model_config = ConfigDict(extra="forbid")
    name: str
    version: int = Field(ge=1)
    description: str
    base_model: str = Field(description="what the user passed: alias, hub id or folder")
    base_model_path: str = Field(description="the resolved local folder vLLM and PEFT loaded")
    path: str = Field(description="version folder, relative to the experts dir")
    lora: LoraInfo
    # None: an adapter trained elsewhere and added with `selfspec experts add` (see `source`).
    train: TrainInfo | None = None
    source: str | None = Field(None, description="the folder `selfspec experts add` copied the "
                               "adapter from; None for an expert made by `selfspec specialize`")
    # What the router indexes: seed instructions plus a sample of kept generated instructions.
    exemplars: list[str]
    created: datetime
    # None: not measured (a registry written before gains were, `experts add`, no validation
    # split, or `specialize --no-gain`).
    gain: GainInfo | None = None

    _check_name = field_validator("name")(lambda cls, v: check_name(v))

    @property
    def adapter_path(self) -> str:
        return f"{self.path}/adapter"

    @property
    def lora_name(self) -> str:
        """Name the engine uses: vLLM keys its prefix cache by adapter name, so versions differ."""
        return f"{self.name}@v{self.version}"


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    # Bumped on every publish; derived artifacts (the router index) record the one they saw.
    revision: int = 0
    updated: datetime | None = None
    experts: dict[str, ExpertEntry] = Field(default_factory=dict)

    def get(self, name: str) -> ExpertEntry:
        if name not in self.experts:
            known = ", ".join(sorted(self.experts)) or "none"
            raise ExpertNotFoundError(f"no expert named {name!r} in the registry (experts: {known})")
        return self.experts[name]


def version_dirs(experts_dir: str | os.PathLike, name: str) -> dict[int, Path]:
    """The published versions of `name` on disk (kept after a rollback or a remove), by number."""
    root = Path(experts_dir) / ".versions" / name
    found = {}
    for p in root.glob("v*"):
        if p.name[1:].isdigit() and (p / "expert.json").is_file():
            found[int(p.name[1:])] = p
    return dict(sorted(found.items()))


def read_version(experts_dir: str | os.PathLike, name: str, version: int) -> ExpertEntry:
    """The registry entry a version folder was published with (its expert.json)."""
    path = Path(experts_dir) / ".versions" / name / f"v{version}" / "expert.json"
    try:
        return ExpertEntry.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as e:
        raise RegistryError(f"cannot read {path}: {e}") from e


def load_registry(experts_dir: str | os.PathLike) -> Registry:
    """Read the registry; an absent file is an empty registry (a fresh experts dir)."""
    path = Path(experts_dir) / REGISTRY_FILE
    if not path.exists():
        return Registry()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RegistryError(f"cannot read {path}: {e}") from e
    found = raw.get("format_version") if isinstance(raw, dict) else None
    if found != FORMAT_VERSION:
        raise RegistryError(
            f"{path} has format_version {found!r}; this selfspec reads {FORMAT_VERSION}. "
            "Re-publish the experts with this version (selfspec specialize ...)."
        )
    try:
        return Registry.model_validate(raw)
    except ValidationError as e:
        raise RegistryError(f"{path} does not match the registry schema: {e}") from e


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; readers (a server) may be other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_locking(experts_dir: Path) -> None:
    """Fail now if the experts dir's filesystem has no `flock` (some NFS mounts, FUSE): the
    publish at the end of a run would otherwise fail after hours of work."""
    try:
        with open(experts_dir / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another publisher holds it: locking works
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as e:
        raise RegistryError(_no_lock(experts_dir, e)) from e


def _no_lock(experts_dir: Path, e: OSError) -> str:
    return (f"experts dir {experts_dir} does not support file locks (flock: "
            f"{e.strerror or e}): publishing there is not safe; use a local folder or a mount "
            "with locking (NFS without nolock/local_lock)")


_held = threading.local()  # the experts dirs whose lock this thread holds


@contextlib.contextmanager
def locked(experts_dir: Path) -> Iterator[None]:
    """Serialize registry read-modify-write across processes (parallel publishers on one volume).
    On storage where the lock is node-local it does not exclude; `commit_registry` stays correct
    there, the lock only saves it retries. Re-entrant in one thread (a caller that holds it
    can call commit_registry): a second flock from the same process would wait forever."""
    key = os.path.realpath(experts_dir)
    held = _held.__dict__.setdefault("dirs", set())
    if key in held:
        yield
        return
    with open(experts_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            raise RegistryError(_no_lock(experts_dir, e)) from e
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_registry(experts_dir: Path, registry: Registry) -> None:
    """Replace registry.json as it is. Publishers use `commit_registry`, which also claims the
    revision; this is for a fresh registry (tests, fixtures) and hand edits."""
    atomic_write_text(experts_dir / REGISTRY_FILE, registry.model_dump_json(indent=2) + "\n")


# --- the revision compare-and-swap -------------------------------------------------------------
# Every change claims revision N+1 by creating `.revisions/r<N+1>.json` (the whole new registry)
# with link(2), which fails when the name exists on every POSIX filesystem and on NFS, lock or
# no lock. Exactly one writer gets each revision, and it built its registry on revision N, so
# no change is lost; registry.json is then brought up to the newest claim and re-read to check
# that a slower writer did not put an older one back.

CLAIMS_DIR = ".revisions"
CLAIM_RE = re.compile(r"^r(\d+)\.json$")
# Older claims are removed (each is also in every revision after it), once both this many
# revisions behind and this old: a writer that claims a removed number was stalled that long
# between reading its base and claiming, and _claim refuses it.
CLAIMS_KEPT = 64
CLAIMS_KEPT_S = 3600.0
CLAIM_TRIES = 1000


def _claims(experts_dir: Path) -> dict[int, Path]:
    folder = experts_dir / CLAIMS_DIR
    if not folder.is_dir():
        return {}
    found = {int(m[1]): folder / n for n in os.listdir(folder) if (m := CLAIM_RE.match(n))}
    return dict(sorted(found.items()))


def _read_claim(path: Path) -> Registry:
    try:
        return Registry.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as e:
        raise RegistryError(f"cannot read the registry revision {path}: {e}") from e


def newest_registry(experts_dir: Path) -> Registry:
    """registry.json, or the newest claimed revision when a writer has claimed one and not yet
    written registry.json (or was killed in between: its version is complete on disk)."""
    registry = load_registry(experts_dir)
    claims = _claims(experts_dir)
    if claims and max(claims) > registry.revision:
        return _read_claim(claims[max(claims)])
    return registry


def _claim(experts_dir: Path, registry: Registry) -> bool:
    """Create the claim for `registry.revision`; False when another writer holds it."""
    folder = experts_dir / CLAIMS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"r{registry.revision}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".claim-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(registry.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; servers may be other users
        try:
            os.link(tmp, path)  # atomic and exclusive, unlike a rename
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    fsync_dir(folder)
    base = registry.revision - 1
    if base > 0 and not (folder / f"r{base}.json").exists() and _revision(experts_dir) != base:
        # the base was pruned: this writer stalled for an hour between reading and claiming
        path.unlink(missing_ok=True)
        return False
    return True


def _revision(experts_dir: Path) -> int:
    try:
        return load_registry(experts_dir).revision
    except RegistryError:
        return -1  # unreadable: the newest claim replaces it


def _settle(experts_dir: Path) -> None:
    """Bring registry.json up to the newest claim, and check by reading it back: another writer
    may replace it with an older revision at any moment until every writer has settled."""
    for _ in range(CLAIM_TRIES):
        claims = _claims(experts_dir)
        newest = max(claims)
        if _revision(experts_dir) >= newest:
            break
        atomic_write_text(experts_dir / REGISTRY_FILE, claims[newest].read_text(encoding="utf-8"))
        fsync_dir(experts_dir)
    for n in [n for n in claims if n <= newest - CLAIMS_KEPT]:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - claims[n].stat().st_mtime > CLAIMS_KEPT_S:
                claims[n].unlink()


def commit_registry(experts_dir: Path, change: Callable[[Registry], None]) -> Registry:
    """Apply `change` to the newest registry and write it as the next revision; returns what was
    written. `change` may run more than once (on a newer registry each time another writer
    claimed the revision first), so it must only edit the registry it is given."""
    with locked(experts_dir):
        for _ in range(CLAIM_TRIES):
            base = newest_registry(experts_dir)
            registry = base.model_copy(deep=True)
            change(registry)
            registry.revision = base.revision + 1
            registry.updated = utcnow()
            if _claim(experts_dir, registry):
                break
        else:
            raise RegistryError(f"could not claim a registry revision in {experts_dir} after "
                                f"{CLAIM_TRIES} tries: too many writers at once")
        _settle(experts_dir)
    return registry

