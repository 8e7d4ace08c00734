"""The grouped CPU LoRA ops (selfspec_vllm_cpu/lora.py) against a per-token reference, on every path:
one adapter, dense (decode-sized), looped (prefill-sized), base tokens (-1) mixed in."""

import pytest
import torch

from selfspec_vllm_cpu import lora, plugin
from selfspec_vllm_cpu.state import STATE


def reference(x, weights, indices):  # y[t] = W[slot(t)] @ x[t], zero for index -1
    w = weights.squeeze(1)
    return torch.stack([w[i] @ x[t] if i >= 0 else torch.zeros(w.shape[1], dtype=x.dtype)
                        for t, i in enumerate(indices.tolist())])


pytestmark = pytest.mark.usefixtures("fresh_state")


@pytest.mark.parametrize("tokens", [5, 64, 3000])  # 3000 x 4 slots: over the limit set below
@pytest.mark.parametrize("kind", ["single", "mixed", "with_base", "all_base"])
def test_shrink_then_expand_matches_per_token_reference(tokens, kind, monkeypatch):
    monkeypatch.setattr(lora, "DENSE_MAX_TOKEN_SLOTS", 8192)  # the looped path too
    g = torch.Generator().manual_seed(tokens)
    slots, rank, fan_in, width = 4, 8, 48, 80
    a = torch.randn(slots, 1, rank, fan_in, generator=g, dtype=torch.float64)
    b = torch.randn(slots, 1, width, rank, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, fan_in, generator=g, dtype=torch.float64)
    idx = {"single": torch.full((tokens,), 2),
           "mixed": torch.randint(0, slots, (tokens,), generator=g),
           "with_base": torch.randint(-1, slots, (tokens,), generator=g),
           "all_base": torch.full((tokens,), -1)}[kind]
    lora.note_step(idx, [1, 2, 3, 4])  # what update_metadata does once per engine step
    buf = torch.zeros(tokens, rank, dtype=torch.float64)
    y = torch.ones(tokens, width, dtype=torch.float64)
    lora.bgmv_shrink(x, a, buf, idx, 0.5)
    lora.bgmv_expand(buf, b, y, idx, add_inputs=True)
    want_buf = 0.5 * reference(x, a, idx)
    torch.testing.assert_close(buf, want_buf)
    torch.testing.assert_close(y, 1 + reference(want_buf, b, idx))
    assert (y[idx < 0] == 1).all()  # base tokens get nothing, whatever sits in the last slot


def test_expand_slice_writes_only_its_columns():
    slots, rank, width = 3, 4, 6
    b = torch.randn(slots, 1, width, rank, dtype=torch.float64)
    buf = torch.randn(10, rank, dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])
    y = torch.zeros(10, 20, dtype=torch.float64)
    lora.bgmv_expand_slice(buf, b, y, idx, 7, width, add_inputs=True)
    torch.testing.assert_close(y[:, 7:13], reference(buf, b, idx))
    assert (y[:, :7] == 0).all() and (y[:, 13:] == 0).all()


def test_new_adapter_in_a_slot_drops_the_cached_expand_weights():
    b = torch.randn(2, 1, 6, 4, dtype=torch.float64)
    buf = torch.randn(4, 4, dtype=torch.float64)
    idx = torch.tensor([0, 1, 0, 1])
    lora.note_step(idx, [1, 2])
    y1 = torch.zeros(4, 6, dtype=torch.float64)
    lora.bgmv_expand(buf, b, y1, idx, add_inputs=False)
    b[1] = torch.randn(1, 6, 4, dtype=torch.float64)  # vLLM loads adapter 3 into slot 1 in place
    lora.note_step(idx, [1, 3])
    y2 = torch.zeros(4, 6, dtype=torch.float64)
    lora.bgmv_expand(buf, b, y2, idx, add_inputs=False)
    torch.testing.assert_close(y2, reference(buf, b, idx))


def test_register_is_off_when_disabled(monkeypatch):
    monkeypatch.setenv("SELFSPEC_CPU_LORA", "0")
    monkeypatch.setattr(STATE, "patched", False)
    plugin.register()
    assert STATE.patched is False


def test_sgmv_runs_expand_to_the_steps_token_indices():
    # vLLM V1 always calls the sgmv ops: slots per run of equal adapters plus run lengths.
    slots, rank, fan_in = 3, 4, 10
    a = torch.randn(slots, 1, rank, fan_in, dtype=torch.float64)
    per_run, lengths = torch.tensor([1, -1, 0, 2]), torch.tensor([3, 2, 1, 4])
    tokens = torch.repeat_interleave(per_run, lengths)
    x = torch.randn(10, fan_in, dtype=torch.float64)
    for noted in (False, True):  # with and without the per-step metadata
        if noted:
            lora.note_step(tokens, [1, 2, 3], per_run)
        buf = torch.zeros(10, rank, dtype=torch.float64)
        lora.sgmv_shrink(x, a, buf, None, lengths, per_run, 4, 4, 10, 2.0)
        torch.testing.assert_close(buf, 2.0 * reference(x, a, tokens))
    assert lora._token_indices(per_run, lengths) is tokens


def test_dense_path_over_a_few_of_many_slots():
    slots, rank, fan_in, width = 16, 8, 32, 40
    a = torch.randn(slots, 1, rank, fan_in, dtype=torch.float64)
    b = torch.randn(slots, 1, width, rank, dtype=torch.float64)
    x = torch.randn(50, fan_in, dtype=torch.float64)
    idx = torch.tensor([3, 9, -1, 9, 3] * 10)
    lora.note_step(idx, list(range(1, 17)))
    assert lora._grouping(idx).active == [3, 9]
    buf = torch.zeros(50, rank, dtype=torch.float64)
    y = torch.zeros(50, width, dtype=torch.float64)
    lora.bgmv_shrink(x, a, buf, idx, 1.0)
    lora.bgmv_expand(buf, b, y, idx, add_inputs=True)
    torch.testing.assert_close(y, reference(reference(x, a, idx), b, idx))
