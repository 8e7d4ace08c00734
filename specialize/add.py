"""`selfspec experts add`: an existing PEFT LoRA adapter becomes an expert.

Everything is checked before anything is written: the adapter's recorded base model and the
shape of every LoRA matrix against the registry's base checkpoint, vLLM's LoRA rules
(core/lora.py), and the routing exemplars. Then it is published the way `selfspec specialize`
publishes (publish.py): a complete version folder renamed into place, then the next registry
revision claimed, each retried on a newer number when another publisher took it first.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.base_model import DEFAULT_BASE_MODEL, resolve_base_model
from core.errors import (
    AdapterError,
    ConfigError,
    SeedError,
)
from core.jsonl import fsync_tree, write_json
from core.lora import validate_adapter
from core.registry import (
    ExpertEntry,
    LoraInfo,
    Registry,
    check_name,
    newest_registry,
    utcnow,
)
from core.seeds import SeedFile
from specialize.datacard import CARD_MD
from specialize.manage import Change
from specialize.publish import claim_version, ensure_writable, register

DEFAULT_MAX_LORA_RANK = 16  # vLLM's default, the least a server asks for (serve/adapters.py)
# The router calibrates each expert's threshold on 5 folds of held-out exemplars
# (router/calibrate.py): fewer than one exemplar per fold leaves a fold without positives.
MIN_EXEMPLARS = 5
QUERY_KEYS = ("query", "instruction", "text", "prompt")
# The serving engine never wraps these for LoRA (serve/adapters.py NEVER_TARGETS: vLLM's CPU
# logits wrapper breaks prompt logprobs), so an adapter that trains them is not servable.
UNSERVABLE_TARGETS = frozenset({"lm_head", "embed_tokens"})
# PEFT saves `base_model.model.<module>.lora_A.weight` (older versions keep the adapter name
# before `.weight`); the base checkpoint holds `<module>.weight`.
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?"
                      r"\.weight$")


class AddConfig(BaseModel):
    """`selfspec experts add`, validated before the adapter or the base model is read."""

    model_config = ConfigDict(extra="forbid")
    name: str
    adapter: Path
    experts_dir: Path = Path("experts")
    seeds: Path | None = None
    exemplars: Path | None = None
    description: str | None = Field(None, min_length=20)
    base_model: str | None = None  # None: the base the registry's experts use
    max_lora_rank: int | None = Field(None, ge=1)  # None: what a server of this registry uses
    data_card: Path | None = None

    _check_name = field_validator("name")(lambda cls, v: check_name(v))


def build_add_config(**kwargs) -> AddConfig:
    try:
        cfg = AddConfig(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "add"
        raise ConfigError(f"experts add: {where}: {err['msg'].removeprefix('Value error, ')}") \
            from None
    if cfg.seeds and cfg.exemplars:
        raise ConfigError("experts add: pass --seeds or --exemplars, not both")
    return cfg


# --- add -----------------------------------------------------------------------------------

def add_expert(cfg: AddConfig) -> Change:
    ensure_writable(cfg.experts_dir)
    registry = newest_registry(cfg.experts_dir)
    # Cheap checks first: resolving the base may convert a model (minutes, once).
    exemplars, description = routing_exemplars(cfg, registry)
    if cfg.data_card is not None and not cfg.data_card.is_file():
        raise ConfigError(f"experts add: --data-card {cfg.data_card} is not a file")
    base_spec, base_path = registry_base(registry, cfg.base_model)
    adapter_cfg = read_adapter_config(cfg.adapter)
    check_recorded_base(cfg.adapter, adapter_cfg, base_spec, base_path)
    check_shapes(cfg.adapter, base_spec, base_path)
    max_rank = cfg.max_lora_rank or max([DEFAULT_MAX_LORA_RANK] +
                                        [e.lora.rank for e in registry.experts.values()])
    facts = validate_adapter(cfg.adapter, base_path, max_rank)
    never = sorted(UNSERVABLE_TARGETS & set(facts["target_modules"]))
    if never:
        raise AdapterError(f"{cfg.adapter} trains {never}, which the server never wraps for "
                           "LoRA: retrain with target_modules on the linear layers only")

    versions = cfg.experts_dir / ".versions" / cfg.name
    versions.mkdir(parents=True, exist_ok=True)
    staging = versions / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        (staging / "adapter").mkdir(parents=True)
        for f in sorted(cfg.adapter.iterdir()):  # a PEFT adapter is flat: no checkpoints
            if f.is_file():
                shutil.copy2(f, staging / "adapter" / f.name)
        (staging / "data").mkdir()
        (staging / "data" / "exemplars.jsonl").write_text(
            "".join(json.dumps({"query": q}) + "\n" for q in exemplars), encoding="utf-8")
        if cfg.data_card is not None:
            shutil.copy2(cfg.data_card, staging / CARD_MD)
        write_json(staging / "config.json", {"command": "selfspec experts add",
                                             **cfg.model_dump(mode="json")})
        fsync_tree(staging)  # on disk before the registry names it
        # The same path as `selfspec specialize` (publish.py): the rename claims the version
        # number and commit_registry the revision, each retried when another publisher took it
        # first, so a lock that excludes nothing (NFS with local_lock) loses neither version.
        entry = claim_version(cfg.experts_dir, cfg.name, staging, lambda version: ExpertEntry(
            name=cfg.name, version=version, description=description,
            base_model=base_spec, base_model_path=str(base_path),
            path=f".versions/{cfg.name}/v{version}", lora=LoraInfo(**facts), train=None,
            source=str(cfg.adapter.resolve()), exemplars=exemplars, created=utcnow()))
        written = register(cfg.experts_dir, entry)
        return Change(cfg.name, registry.experts.get(cfg.name), entry, written.revision)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def registry_base(registry: Registry, requested: str | None) -> tuple[str, Path]:
    """The base model an added adapter must fit: the one a server of this registry loads."""
    counts = Counter((e.base_model, e.base_model_path) for e in registry.experts.values())
    if requested is not None:
        path = resolve_base_model(requested)
        if counts and not any(spec == requested or _same_dir(p, path) for spec, p in counts):
            have = ", ".join(sorted({spec for spec, _ in counts}))
            raise AdapterError(f"the registry's experts are on base model {have}; a server "
                               f"loads one base, so an expert on {requested!r} would not be "
                               "served: drop --base-model, or use another --experts-dir")
        return requested, path
    if not counts:
        return DEFAULT_BASE_MODEL, resolve_base_model(DEFAULT_BASE_MODEL)
    # The same choice as the server (serve/adapters.py choose_base): the most used base.
    (spec, path), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return spec, Path(path) if (Path(path) / "config.json").is_file() else \
        resolve_base_model(spec)


def read_adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adapter}: no adapter_config.json: point --adapter at a PEFT LoRA "
                           "folder (what save_pretrained wrote)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return cfg


def check_recorded_base(adapter: Path, cfg: dict, base_spec: str, base_path: Path) -> None:
    """The base the adapter says it was trained on must name the registry's base. Names differ
    across machines (a hub id, a cache snapshot, our converted folder), so they are compared
    by model name; the shapes check decides when the adapter records none."""
    recorded = cfg.get("base_model_name_or_path")
    if not recorded:
        return
    if _same_dir(recorded, base_path):
        return
    if _model_name(recorded) in {_model_name(base_spec), _model_name(str(base_path))}:
        return
    raise AdapterError(
        f"{adapter} was trained on {recorded!r} but the registry's base model is {base_spec!r} "
        f"({base_path}): retrain the adapter on that base (or, if {recorded!r} is the same "
        f"model under another name, set base_model_name_or_path to {base_spec!r} in "
        "adapter_config.json)")


def check_shapes(adapter: Path, base_spec: str, base_path: Path) -> None:
    """Every LoRA A/B matrix must fit the base weight it adapts (a same-named model of another
    size fails here, before vLLM would fail on the first request)."""
    lora = _tensor_shapes(adapter, adapter_weights=True)
    base = _tensor_shapes(base_path, adapter_weights=False)
    problems, seen = [], 0
    for key, shape in lora.items():
        m = LORA_KEY.match(key)
        if not m:
            continue
        seen += 1
        module, ab = m["module"], m["ab"]
        weight = base.get(f"{module}.weight")
        if weight is None:
            problems.append(f"{module} is not in the base model")
        elif len(shape) != 2 or len(weight) != 2:
            problems.append(f"{key} has shape {list(shape)}, not a matrix")
        elif ab == "A" and shape[1] != weight[1]:
            problems.append(f"{key} takes {shape[1]} inputs where the base's {module} takes "
                            f"{weight[1]}")
        elif ab == "B" and shape[0] != weight[0]:
            problems.append(f"{key} gives {shape[0]} outputs where the base's {module} gives "
                            f"{weight[0]}")
    if not seen:
        problems.append("no LoRA A/B weights in it")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"{adapter} does not fit base model {base_spec!r} ({base_path}): "
                           f"{problems[0]}{more}; retrain the adapter on that base")


def _tensor_shapes(folder: Path, adapter_weights: bool) -> dict[str, tuple[int, ...]]:
    files = sorted(folder.glob("adapter_model.safetensors" if adapter_weights else
                               "*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        if files:
            from safetensors import safe_open

            for f in files:
                with safe_open(f, framework="pt") as st:
                    for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                        shapes[key] = tuple(st.get_slice(key).get_shape())
        elif adapter_weights and (folder / "adapter_model.bin").is_file():
            import torch

            state = torch.load(folder / "adapter_model.bin", map_location="cpu",
                               weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
    except Exception as e:  # safetensors and torch raise many kinds on a bad file
        raise AdapterError(f"cannot read the weights in {folder}: {e}") from e
    if not shapes:
        what = "adapter_model.safetensors/.bin" if adapter_weights else "*.safetensors weights"
        raise AdapterError(f"{folder}: no {what}")
    return shapes


def _same_dir(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).expanduser().is_dir() and Path(a).expanduser().resolve() == b.resolve()
    except OSError:
        return False


def _model_name(spec: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct', '/x/smollm2-135m-instruct' and a hub cache
    snapshot '.../models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/<sha>' all give
    'smollm2-135m-instruct'."""
    parts = Path(spec.rstrip("/")).parts
    for part in parts:
        if part.startswith("models--"):
            return part.split("--")[-1].lower()
    return (parts[-1] if parts else spec).lower()


def routing_exemplars(cfg: AddConfig, registry: Registry) -> tuple[list[str], str]:
    """(exemplars, description) for the router: a seed file's instructions, a file of example
    queries, or, for a new version of an existing expert, the ones it has."""
    current = registry.experts.get(cfg.name)
    description = cfg.description
    if cfg.seeds is not None:
        seed_file = read_seed_file(cfg.seeds)
        exemplars = [s.instruction for s in seed_file.seeds]
        description = description or seed_file.description
    elif cfg.exemplars is not None:
        exemplars = read_exemplars(cfg.exemplars)
    elif current is not None:
        exemplars = current.exemplars
    else:
        raise ConfigError(f"experts add: {cfg.name!r} is a new expert: pass --seeds FILE (a "
                          "seeds.yaml) or --exemplars FILE (example queries) so the router "
                          "can send it requests")
    if len(exemplars) < MIN_EXEMPLARS:
        source = cfg.seeds or cfg.exemplars
        raise SeedError(f"{source}: {len(exemplars)} distinct queries; the router needs at "
                        f"least {MIN_EXEMPLARS} to calibrate: add more")
    description = description or (current.description if current else None)
    if not description:
        raise ConfigError(f"experts add: {cfg.name!r} is a new expert: pass --description "
                          "'<a sentence on what it knows>' (the router indexes it too)")
    return exemplars, description


def read_seed_file(path: Path) -> SeedFile:
    if not path.is_file():
        raise SeedError(f"{path}: seeds file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return SeedFile.model_validate(raw)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SeedError(f"{path}: not valid YAML ({e.__class__.__name__})") from e
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise SeedError(f"{path}: invalid seed file at {where}: {err['msg']} (format: "
                        "seeds/README.md)") from None


def read_exemplars(path: Path) -> list[str]:
    """One query a line: plain text, or JSONL of strings or objects with a query field."""
    if not path.is_file():
        raise SeedError(f"{path}: exemplars file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SeedError(f"{path}: not UTF-8 ({e.reason})") from e
    queries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            queries.append(line.strip())
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if isinstance(item, dict):
            item = next((item[k] for k in QUERY_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str) or not item.strip():
            raise SeedError(f"{path}:{n}: no query: write a JSON string or an object with one "
                            f"of the fields {', '.join(QUERY_KEYS)}")
        queries.append(item.strip())
    return list(dict.fromkeys(queries))


