"""`selfspec specialize`'s config from its sources, through the real parser: the config models'
defaults < a --config file < explicit flags < each --set; every field reachable; a bad file, key
or value is one line naming it, exit 2, before anything starts."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import BaseModel

from selfspec.cli import build_parser, main
from specialize import pipeline
from specialize.cli import CONFIG_FLAGS, flag_settings
from specialize.config import SpecializeConfig, resolve_config
from tests.conftest import seeds_dir


@pytest.fixture
def seeds(tmp_path, monkeypatch):
    return seeds_dir(tmp_path, monkeypatch, names=("demo",))


@pytest.fixture
def ran(monkeypatch):
    """The config the CLI would run the pipeline with (the pipeline itself does not run)."""
    seen = {}

    def fake_specialize(domains, cfg, **kw):
        seen.update(cfg=cfg, kw=kw)
        return []

    monkeypatch.setattr(pipeline, "specialize", fake_specialize)
    return seen


def cli_config(argv: list[str]) -> SpecializeConfig:
    args = build_parser().parse_args(["specialize", "demo", *argv])
    return resolve_config(args.config, flag_settings(args), args.set)


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = field.annotation
        keys += leaf_keys(sub, key + ".") if isinstance(sub, type) and \
            issubclass(sub, BaseModel) else [key]
    return keys


def test_no_flag_repeats_a_default_the_config_models_hold():
    args = build_parser().parse_args(["specialize", "demo"])
    assert CONFIG_FLAGS and all(getattr(args, dest) is None for dest in CONFIG_FLAGS)
    assert flag_settings(args) == {}
    assert cli_config([]) == SpecializeConfig()


def test_help_shows_the_config_models_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["specialize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "target kept instructions per domain (paper: ~5000) (default: 96)" in text
    assert "sampling temperature for instructions (default: 0.7)" in text
    assert "LoRA alpha (default: 2 x rank)" in text


def test_flags_set_their_fields():
    cfg = cli_config(["--num-instructions", "12", "--seed", "7", "--rank", "16",
                      "--max-lora-rank", "32", "--no-gain", "--corpus", "none",
                      "--instruction-temperature", "0.9", "--packing"])
    assert cfg.generate.num_instructions == 12 and cfg.generate.temperature == 0.9
    assert cfg.engine.seed == cfg.train.seed == 7
    assert cfg.train.rank == 16 and cfg.train.alpha == 32  # alpha follows rank unless given
    assert cfg.validate_.max_lora_rank == 32 and cfg.gain.enabled is False
    assert cfg.respond.retrieval == "none" and cfg.respond.corpus is None
    assert cfg.train.packing is True and cfg.train.gradient_checkpointing is False


def test_precedence_defaults_file_flags_set(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "generate": {"temperature": 0.9, "top_p": 0.9},
        "filter": {"relevance": False},
        "train": {"rank": 16, "epochs": 3},
        "validate": {"max_lora_rank": 16}}))
    cfg = cli_config(["--config", str(run), "--instruction-temperature", "0.8",
                      "--epochs", "1", "--set", "generate.temperature=0.5",
                      "--set", "filter.min_words=6"])
    assert cfg.generate.temperature == 0.5  # --set over the flag over the file
    assert cfg.generate.top_p == 0.9 and cfg.filter.relevance is False  # the file's
    assert cfg.train.epochs == 1.0  # the flag over the file
    assert cfg.train.rank == 16 and cfg.train.alpha == 32  # the file's, alpha following it
    assert cfg.filter.min_words == 6 and cfg.filter.max_words == 150  # a section in part
    assert cfg.generate.num_instructions == 96 and cfg.respond.retrieval == "bm25"  # defaults


def test_a_saved_config_json_is_a_config_file(tmp_path):
    """What a run saves (prepare_run's config.json) reproduces the run's config."""
    cfg = cli_config(["--rank", "16", "--max-lora-rank", "16", "--set", "engine.kv_cache_gib=3",
                      "--set", "filter.blacklist=[image, video]", "--corpus", str(tmp_path)])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.model_dump(mode="json", by_alias=True)))
    assert cli_config(["--config", str(saved)]) == cfg
    assert cfg.filter.blacklist == ("image", "video") and cfg.engine.kv_cache_gib == 3


def test_set_reaches_every_config_field():
    defaults = SpecializeConfig().model_dump(mode="json", by_alias=True)
    keys = leaf_keys(SpecializeConfig)
    assert {"engine.tensor_parallel_size", "filter.max_perplexity_ratio", "responses.min_chars",
            "train.target_modules", "gain.resamples", "validate.max_lora_rank"} <= set(keys)
    for key in keys:
        value = defaults
        for part in key.split("."):
            value = value[part]
        # Setting each field to its own default (as JSON, which --set reads as YAML) is valid
        # and changes nothing: the key is reachable and its value parsed to the field's type.
        assert cli_config(["--set", f"{key}={json.dumps(value)}"]) == SpecializeConfig(), key
    cfg = cli_config(["--set", "filter.max_perplexity_ratio=null", "--set",
                      "responses.drop_truncated=false", "--set", "engine.dtype=float32",
                      "--set", "train.target_modules=[q_proj, v_proj]"])
    assert cfg.filter.max_perplexity_ratio is None and cfg.responses.drop_truncated is False
    assert cfg.engine.dtype == "float32" and cfg.train.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv, message", [
    (["--set", "generate.temprature=0.7"],
     "--set generate.temprature: generate has no setting 'temprature'; it has focus,"),
    (["--set", "nope=1"], "--set nope: the config has no setting 'nope'"),
    (["--set", "train.rank.size=1"], "--set train.rank.size: train.rank is a value, not a section"),
    (["--set", "generate.temperature"], "--set 'generate.temperature': expected KEY=VALUE"),
    (["--set", "generate.temperature=-1"],
     "invalid configuration: generate.temperature: Input should be greater than or equal to 0"),
    (["--set", "engine.dtype=fp8"], "invalid configuration: engine.dtype: Input should be"),
    (["--config", "{dir}/missing.yaml"], "--config {dir}/missing.yaml: cannot read it"),
    (["--config", "{dir}/list.yaml"], "--config {dir}/list.yaml: expected a mapping"),
    (["--config", "{dir}/typo.yaml"], "invalid configuration: generate.temprature: Extra inputs"),
])
def test_a_bad_setting_is_one_line_exit_2_and_nothing_starts(tmp_path, seeds, ran, capsys,
                                                              argv, message):
    (tmp_path / "list.yaml").write_text("- generate\n")
    (tmp_path / "typo.yaml").write_text("generate:\n  temprature: 0.7\n")
    experts = tmp_path / "experts"
    argv = [a.format(dir=tmp_path) for a in argv]
    code = main(["specialize", "demo", "--experts-dir", str(experts), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err == f"selfspec: error: {err[len('selfspec: error: '):]}"
    assert message.format(dir=tmp_path) in err and err.count("\n") == 1, err
    assert "cfg" not in ran and not experts.exists()


def test_the_cli_runs_the_resolved_config(tmp_path, seeds, ran):
    experts = tmp_path / "experts"
    assert main(["specialize", "demo", "--experts-dir", str(experts), "--stop-after", "filter",
                 "--set", "generate.max_tokens=64", "--retrieval", "dense"]) == 0
    cfg = ran["cfg"]
    assert cfg.experts_dir == experts and cfg.generate.max_tokens == 64
    assert ran["kw"]["stop_after"] == "filter" and ran["kw"]["make_encoder"] is not None
