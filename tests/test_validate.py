import json

import pytest
import torch
from safetensors.torch import save_file

from core.errors import AdapterError
from core.lora import validate_adapter


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
               "model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2)},
              str(d / "model.safetensors"))
    return d


def adapter(tmp_path, **overrides):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"],
           "bias": "none", "use_dora": False, "modules_to_save": None, **overrides}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes(b"x")
    return d


def test_good_adapter_passes(tmp_path, base):
    assert validate_adapter(adapter(tmp_path), base, 16) == {
        "rank": 8, "alpha": 16, "target_modules": ["down_proj", "q_proj"]}


@pytest.mark.parametrize("overrides, message", [
    ({"r": 12}, "rank 12 is not one of vLLM's"),
    ({"r": 32}, "rank 32 > max_lora_rank 16: pass --max-lora-rank 32"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": ["q_proj", "c_attn"]}, "['c_attn'] do not exist"),
])
def test_vllm_would_reject(tmp_path, base, overrides, message):
    with pytest.raises(AdapterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_adapter(adapter(tmp_path, **overrides), base, 16)


def test_missing_weights(tmp_path, base):
    d = adapter(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model"):
        validate_adapter(d, base, 16)
