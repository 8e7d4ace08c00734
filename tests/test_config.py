import pytest

from core.errors import ConfigError
from specialize.config import build_config


def test_defaults_are_valid_and_sized_for_cpu():
    cfg = build_config()
    assert cfg.train.rank == 8 and cfg.train.alpha == 16 and cfg.validate_.max_lora_rank == 16
    assert cfg.generate.temperature == 0.7 and cfg.generate.top_p == 0.98


def test_rank_not_servable():
    with pytest.raises(ConfigError, match="rank 12 is not one vLLM can serve"):
        build_config(train={"rank": 12})


def test_rank_above_max_lora_rank_says_how_to_fix():
    with pytest.raises(ConfigError, match="--max-lora-rank 32"):
        build_config(train={"rank": 32})
    assert build_config(train={"rank": 32}, validate={"max_lora_rank": 32}).train.rank == 32


def test_typo_in_config_key_fails_fast():
    with pytest.raises(ConfigError, match="ranks"):
        build_config(train={"ranks": 8})
