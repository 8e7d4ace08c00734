"""The typed config of `selfspec ablate` and its named generation settings: what the command line
parses and validates before any model loads. Kept apart from the runner (`specialize/ablation.py`)
so that building the CLI imports no numpy, encoder or engine."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from specialize.config import FilterConfig, _Config

# Each setting changes one thing; "paper" pins the values the others are measured against, so a
# report stays comparable after the defaults move.
PAPER = {"focus": "none", "prompt_format": "list", "temperature": 1.0}
SETTINGS: dict[str, dict] = {
    "paper": {},
    "default": {},
    "subtopic": {"focus": "subtopic"},
    "passage": {"focus": "passage"},
    "unfocused": {"focus": "none"},
    "chat": {"prompt_format": "chat"},
    "list": {"prompt_format": "list"},
    "t0.7": {"temperature": 0.7},
    "t1.0": {"temperature": 1.0},
}
# Settings of stage 3 (`RespondConfig`): they change the answers, not the instructions, so only
# `--train-eval` can see them; a setting that differs from another only here reuses that
# setting's instructions (specialize/ablation.py).
RESPOND_SETTINGS: dict[str, dict] = {
    "sc4": {"self_consistency": 4},  # closed-form answers kept only when 4 samples back them
    "src": {"grounding": "source"},  # answers grounded on the passage the task was written from
}


def resolve_setting(name: str) -> dict:
    """"passage+t0.7" -> the GenerateConfig fields it sets. Unknown parts are a ConfigError."""
    parts = [p.strip() for p in name.split("+")]
    unknown = [p for p in parts if p not in SETTINGS and p not in RESPOND_SETTINGS]
    if unknown or not name.strip():
        raise ConfigError(f"unknown ablation setting {unknown[0] if unknown else name!r}: use "
                          f"{', '.join([*SETTINGS, *RESPOND_SETTINGS])}, or several joined with "
                          "'+' (passage+t0.7)")
    changes = {} if parts[0] == "default" else dict(PAPER)
    for p in parts:
        changes.update(SETTINGS.get(p, {}))
    return changes


def respond_changes(name: str) -> dict:
    """"default+sc4" -> the RespondConfig fields it sets ({} for a generation-only setting)."""
    resolve_setting(name)  # the same check of every part
    changes: dict = {}
    for p in name.split("+"):
        changes.update(RESPOND_SETTINGS.get(p.strip(), {}))
    return changes


class AblationConfig(_Config):
    domains: list[str] = Field(min_length=1)
    settings: list[str] = Field(["paper", "subtopic", "passage", "chat", "t0.7"], min_length=1)
    num_instructions: int = Field(48, ge=1, description="kept instructions per domain and setting")
    base_model: str = "smollm2-135m-instruct"
    out: Path = Path("reports/ablation")
    train_eval: bool = False  # also answer, train, publish and score each setting's experts
    filter: FilterConfig = FilterConfig()  # the same filters for every setting: the pipeline's
    seed: int = 0
    # With train_eval: each setting's expert is trained once per seed (train.seed) on the same
    # answers, and its eval gain is pooled over them (specialize/ablation.py says why).
    train_seeds: list[int] = Field([0], min_length=1)

    @field_validator("settings")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            resolve_setting(name)
        return list(dict.fromkeys(v))

    @field_validator("train_seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if bad := [s for s in v if s < 0]:
            raise ConfigError(f"--train-seeds: {bad[0]} is negative: training seeds are 0 or more")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _answers_need_training(self) -> AblationConfig:
        if not self.train_eval and (names := [s for s in self.settings if respond_changes(s)]):
            raise ConfigError(f"ablation setting {names[0]!r} changes only the answers: add "
                              "--train-eval, which answers, trains and scores each setting")
        return self

    @model_validator(mode="after")
    def _seeds_need_training(self) -> AblationConfig:
        if not self.train_eval and len(self.train_seeds) > 1:
            raise ConfigError(f"--train-seeds {','.join(map(str, self.train_seeds))} trains each "
                              "setting once per seed: add --train-eval, which answers, trains "
                              "and scores each setting")
        return self


def build_ablation_config(**kwargs) -> AblationConfig:
    try:
        return AblationConfig.model_validate({k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        msgs = [f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                for err in e.errors()]
        raise ConfigError("invalid ablation arguments: " + "; ".join(msgs)) from None
