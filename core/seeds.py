"""Seed files: `seeds/<domain>/seeds.yaml` (+ optional `corpus/`, `eval.jsonl`, `routing.jsonl`).

The schema is the pydantic models below. Every error names the file, the item and the fix, and
validation happens before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import RegistryError, SeedError, UnknownDomainError
from core.registry import check_name

MIN_SEEDS = 8  # fewer cannot fill distinct few-shot prompts (3 for instructions, 5 for responses)
TASK_TYPES = ("qa", "yes_no", "multiple_choice", "classification", "extraction",
              "summarization", "explanation", "calculation", "drafting")


class SeedTask(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)
    type: Literal[TASK_TYPES] | None = None  # type: ignore[valid-type]
    check: str | None = None  # arithmetic expression that recomputes a calculation's answer


class SeedFile(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    domain: str
    description: str = Field(min_length=20)
    seeds: list[SeedTask]

    @field_validator("domain")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_name(v)
        except RegistryError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _enough(self) -> SeedFile:
        if len(self.seeds) < MIN_SEEDS:
            raise ValueError(f"has {len(self.seeds)} seeds; at least {MIN_SEEDS} are needed "
                             "(the paper used 80-90): add more seed tasks")
        return self


class EvalItem(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    id: str
    type: Literal["multiple_choice", "yes_no", "short_answer", "classification"]
    question: str = Field(min_length=1)
    input: str = ""
    options: list[str] | None = None
    labels: list[str] | None = None
    answer: str
    aliases: list[str] = Field(default_factory=list)
    check: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EvalItem:
        if self.type == "multiple_choice":
            if not self.options or len(self.options) < 2:
                raise ValueError("multiple_choice needs 'options' (2 or more)")
            letters = [chr(ord("A") + i) for i in range(len(self.options))]
            if self.answer not in letters:
                raise ValueError(f"answer must be one of {letters}, got {self.answer!r}")
        elif self.type == "yes_no" and self.answer.lower() not in ("yes", "no"):
            raise ValueError(f"yes_no answer must be 'yes' or 'no', got {self.answer!r}")
        elif self.type == "classification" and (not self.labels or self.answer not in self.labels):
            raise ValueError("classification needs 'labels' containing the 'answer'")
        return self


class RoutingItem(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    query: str = Field(min_length=1)
    domain: str
    style: str | None = None  # user-style sets: story, lay, keywords, exam or task


class Domain(BaseModel):
    """A loaded, validated domain folder."""

    name: str
    root: Path
    description: str
    seeds: list[SeedTask]
    corpus_dir: Path | None
    eval_items: list[EvalItem]

    @property
    def eval_path(self) -> Path:
        return self.root / "eval.jsonl"


def _where(loc: tuple) -> str:
    # ('seeds', 3, 'output') -> "seeds[3].output" (item 3, 0-based as in the file's list order)
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


_FORMATS = {
    "seed file": "fields: domain, description, seeds: [{instruction, input?, output}]",
    "EvalItem": "fields: id, type (multiple_choice|yes_no|short_answer|classification), question, "
                "answer, and options / labels / aliases by type",
    "RoutingItem": "fields: query, domain, style?",
}


def _fail(path: Path, e: ValidationError, hint: str) -> SeedError:
    lines = [f"{path}: invalid {hint}:"]
    for err in e.errors()[:10]:
        lines.append(f"  - {_where(err['loc'])}: {err['msg']}")
    if len(e.errors()) > 10:
        lines.append(f"  ... and {len(e.errors()) - 10} more")
    lines.append(f"  fix: see seeds/README.md for the format ({_FORMATS[hint]})")
    return SeedError("\n".join(lines))


def load_seed_file(path: Path) -> SeedFile:
    if not path.is_file():
        raise SeedError(f"{path}: seeds file not found: create it (see seeds/README.md)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SeedError(f"{path}: not valid YAML: {e}\n  fix: quote strings containing ': '") from e
    if not isinstance(raw, dict):
        raise SeedError(f"{path}: expected a mapping with keys domain, description, seeds")
    try:
        seed_file = SeedFile.model_validate(raw)
    except ValidationError as e:
        raise _fail(path, e, "seed file") from None
    if seed_file.domain != path.parent.name:
        raise SeedError(f"{path}: domain {seed_file.domain!r} differs from its folder name "
                        f"{path.parent.name!r}: rename one so they match")
    return seed_file


def load_jsonl(path: Path, model: type[BaseModel]) -> list:
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SeedError(f"{path}: not UTF-8: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(model.model_validate(json.loads(line)))
        except json.JSONDecodeError as e:
            raise SeedError(f"{path}:{n}: not valid JSON: {e}") from e
        except ValidationError as e:
            raise _fail(Path(f"{path}:{n}"), e, model.__name__) from None
    return items


def seeds_root() -> Path:
    """The shipped seeds folder (repo checkout) unless SELFSPEC_SEEDS_DIR points elsewhere."""
    import os
    env = os.environ.get("SELFSPEC_SEEDS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "seeds"


def available_domains(root: Path | None = None) -> list[str]:
    root = root or seeds_root()
    return sorted(p.parent.name for p in root.glob("*/seeds.yaml"))


def load_domain(name_or_path: str, root: Path | None = None) -> Domain:
    """Load a domain by name (under the seeds root) or by a folder path holding seeds.yaml."""
    root = root or seeds_root()
    folder = Path(name_or_path)
    if not (folder / "seeds.yaml").is_file():
        folder = root / name_or_path
    if not folder.is_dir():
        known = ", ".join(available_domains(root)) or "none"
        raise UnknownDomainError(f"unknown domain {name_or_path!r}: no folder {folder} "
                                 f"(domains in {root}: {known})")
    seed_file = load_seed_file(folder / "seeds.yaml")
    eval_path = folder / "eval.jsonl"
    corpus = folder / "corpus"
    return Domain(
        name=seed_file.domain,
        root=folder,
        description=seed_file.description,
        seeds=seed_file.seeds,
        corpus_dir=corpus if corpus.is_dir() and any(corpus.glob("*.md")) else None,
        eval_items=load_jsonl(eval_path, EvalItem) if eval_path.is_file() else [],
    )
