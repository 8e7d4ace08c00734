"""GPU tier: the training path on CUDA (bf16). Skipped on machines without a GPU, such as CI."""

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_train_adapter_on_gpu(tmp_path):
    from specialize.config import TrainConfig
    from specialize.train import train_adapter
    from tests.integration.tiny_model import build_tiny_llama

    base = build_tiny_llama(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} it is."})
                            + "\n" for i in range(16)))
    res = train_adapter(base, TrainConfig(epochs=2, batch_size=4), data, tmp_path / "out")
    assert res["steps"] == 8 and res["loss_last"] < res["loss_first"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
