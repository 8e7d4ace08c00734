"""From the registry to what the engine loads: the base model, vLLM's LoRA limits, a stable
LoRA id per expert version, and a verdict per adapter (load it, or leave it out and say why).

Pure functions over `core.registry` (no vLLM import here except inside
`validate_adapter`'s own check), so the planning is unit-tested without an engine.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import SelfspecError
from core.lora import VLLM_LORA_RANKS
from core.registry import ExpertEntry, Registry
from serve.config import ServeConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_LORA_RANK = 16  # vLLM's default; the smallest we ask for
MAX_RESIDENT_LORAS = 8  # adapters in one batch: each costs a slot of LoRA weights per layer
# Modules the engine wraps for LoRA: what the registry's adapters target plus every linear layer
# of a Llama-style block (room for hot-added experts), never lm_head. Without a target list
# vLLM also wraps lm_head's logits processor, and that wrapper breaks prompt logprobs
# (echo+logprobs, what lm-eval sends) whenever two requests share a batch: vLLM 0.32's CPU
# punica `add_lora_logits` indexes LoRAs per request, not per prompt token, and the engine dies.
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEVER_TARGETS = frozenset({"lm_head", "embed_tokens"})


@dataclass(frozen=True)
class EnginePlan:
    base_spec: str  # what selects the base model besides "base" (the registry's base_model)
    base_path: Path
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    target_modules: tuple[str, ...] = LINEAR_TARGETS

    @property
    def base_aliases(self) -> list[str]:
        return list(dict.fromkeys(["base", self.base_spec, str(self.base_path)]))


@dataclass
class AdapterVerdicts:
    ok: dict[str, ExpertEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # expert name -> why


def round_up_rank(rank: int) -> int:
    """The smallest vLLM max_lora_rank that holds `rank` (at least vLLM's default 16)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= max(rank, DEFAULT_MAX_LORA_RANK):
            return allowed
    return VLLM_LORA_RANKS[-1]


def lora_int_id(lora_name: str) -> int:
    """Stable across restarts and replicas: a hash of `name@vN` in [1, 2**31 - 1]."""
    digest = hashlib.sha256(lora_name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


def choose_base(cfg: ServeConfig, registry: Registry) -> tuple[str, Path]:
    """The base model: the configured one, else the one most experts were trained on."""
    from core.base_model import DEFAULT_BASE_MODEL, resolve_base_model

    if cfg.base_model:
        return cfg.base_model, resolve_base_model(cfg.base_model)
    if not registry.experts:
        return DEFAULT_BASE_MODEL, resolve_base_model(DEFAULT_BASE_MODEL)
    counts: dict[tuple[str, str], int] = {}
    for e in registry.experts.values():
        counts[(e.base_model, e.base_model_path)] = counts.get((e.base_model, e.base_model_path),
                                                               0) + 1
    (spec, path), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    # The registry may have moved to another machine: the recorded folder wins when present.
    return spec, Path(path) if (Path(path) / "config.json").is_file() else resolve_base_model(spec)


def plan_engine(cfg: ServeConfig, registry: Registry) -> EnginePlan:
    spec, path = choose_base(cfg, registry)
    ranks = [e.lora.rank for e in registry.experts.values() if e.lora.rank in VLLM_LORA_RANKS]
    n = len(registry.experts)
    opts = cfg.engine
    max_rank = opts.max_lora_rank or round_up_rank(max(ranks, default=DEFAULT_MAX_LORA_RANK))
    max_loras = opts.max_loras or max(1, min(n, MAX_RESIDENT_LORAS))
    max_cpu = opts.max_cpu_loras or max(n + opts.hot_add_headroom, max_loras)
    targets = {t for e in registry.experts.values() for t in e.lora.target_modules}
    targets = tuple(sorted((targets | set(LINEAR_TARGETS)) - NEVER_TARGETS))
    return EnginePlan(spec, Path(path), max_rank, max_loras, max(max_cpu, max_loras), targets)


def same_base(entry: ExpertEntry, plan: EnginePlan) -> bool:
    if entry.base_model == plan.base_spec:
        return True
    try:
        return Path(entry.base_model_path).resolve() == plan.base_path.resolve()
    except OSError:
        return False


def adapter_dir(entry: ExpertEntry, experts_dir: Path) -> Path:
    """The adapter folder, refused if the registry points outside the experts dir."""
    root = experts_dir.resolve()
    path = (root / entry.adapter_path).resolve()
    if not path.is_relative_to(root):
        raise SelfspecError(f"adapter path {entry.adapter_path!r} leaves the experts dir "
                            f"{root}: re-publish the expert")
    return path


def check_adapters(registry: Registry, experts_dir: Path, plan: EnginePlan,
                   names: list[str] | None = None) -> AdapterVerdicts:
    """Validate each adapter against the engine; a bad one is left out with its reason."""
    from core.lora import validate_adapter

    out = AdapterVerdicts()
    for name in sorted(names if names is not None else registry.experts):
        entry = registry.experts[name]
        try:
            if not same_base(entry, plan):
                raise SelfspecError(
                    f"trained on base model {entry.base_model!r} ({entry.base_model_path}) but "
                    f"the engine serves {plan.base_spec!r} ({plan.base_path}): serve it with "
                    f"base_model={entry.base_model!r}, or re-specialize it on this base")
            facts = validate_adapter(adapter_dir(entry, experts_dir), plan.base_path,
                                     plan.max_lora_rank)
            outside = sorted(set(facts["target_modules"]) - set(plan.target_modules))
            if outside:
                raise SelfspecError(
                    f"targets {outside}, which this engine does not wrap for LoRA "
                    f"({', '.join(plan.target_modules)}): lm_head/embedding adapters are not "
                    "served; others need a server restart to be picked up")
        except SelfspecError as e:
            out.skipped[name] = str(e)
            log.error("expert %s left out: %s", entry.lora_name, e)
            continue
        except Exception as e:  # one unreadable adapter must not stop the others
            # PermissionError (published under umask 077 by another user), UnicodeDecodeError,
            # a config that is JSON but not an object, a vanished folder: at start-up any of
            # these escaping would crash-loop the engine replica, at hot-add stop the sync halfway.
            out.skipped[name] = unreadable_reason(entry, e)
            log.error("expert %s left out: %s", entry.lora_name, out.skipped[name], exc_info=e)
            continue
        out.ok[name] = entry
    return out


def adapter_signature(entry: ExpertEntry, experts_dir: Path) -> tuple:
    """What changes when someone fixes an adapter's files: each file's name, size, mode, mtime
    and ctime (chmod moves ctime). A stat per file: cheap enough to check every poll."""
    try:
        folder = adapter_dir(entry, experts_dir)
        paths = [folder, *sorted(folder.rglob("*"))]
        return tuple((str(p.relative_to(folder)), st.st_size, st.st_mode, st.st_mtime_ns,
                      st.st_ctime_ns) for p in paths for st in [p.stat()])
    except (OSError, SelfspecError) as e:  # unreadable folder: its error is the signature
        return (type(e).__name__,)


def unreadable_reason(entry: ExpertEntry, e: BaseException) -> str:
    """Why an adapter could not be read, naming its folder relative to the experts dir (the
    reason is shown to clients in /health and /v1/models: no server paths)."""
    if isinstance(e, PermissionError):
        fix = "make its files readable by the server's user (chmod -R a+rX)"
    elif isinstance(e, OSError):
        fix = "check the files are there and the storage is mounted, then re-publish it"
    else:
        fix = "its files are corrupt: re-publish the expert"
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"cannot read the adapter in {entry.adapter_path} ({type(e).__name__}: {detail}): {fix}"
