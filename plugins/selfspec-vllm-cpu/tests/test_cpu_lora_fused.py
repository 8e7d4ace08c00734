"""Whole-layer LoRA on CPU (selfspec_vllm_cpu/lora_fused.py) against a per-token, per-slice reference:
qkv-like layers (3 slices of different widths), row-parallel shrink-then-expand through the
buffer, one adapter, mixed adapters, base tokens, and the fall-back for batches too big to fuse."""

from types import SimpleNamespace

import pytest
import torch

from selfspec_vllm_cpu import lora, lora_fused
from selfspec_vllm_cpu.state import STATE

SLOTS, RANK, FAN_IN = 4, 8, 32
WIDTHS = (48, 16, 16)


def per_token(x, a, b, indices, scale=1.0):
    """sum over slices of scale * B_s[slot] @ A_s[slot] @ x, placed in slice s's columns."""
    out = torch.zeros(x.shape[0], sum(b_.shape[2] for b_ in b), dtype=x.dtype)
    for t, slot in enumerate(indices.tolist()):
        if slot < 0:
            continue
        col = 0
        for a_s, b_s in zip(a, b):
            width = b_s.shape[2]
            out[t, col:col + width] = scale * (b_s[slot, 0] @ (a_s[slot, 0] @ x[t]))
            col += width
    return out


def never(*args, **kwargs):
    raise AssertionError("the fused path should have handled this step")


pytestmark = pytest.mark.usefixtures("fresh_state")


def layer(seed, slices=WIDTHS):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, FAN_IN, generator=g, dtype=torch.float64)
              for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, w, RANK, generator=g, dtype=torch.float64) for w in slices)
    return a, b


def step(kind, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = {"single": torch.full((tokens,), 2),
           "mixed": torch.randint(0, SLOTS, (tokens,), generator=g),
           "with_base": torch.randint(-1, SLOTS, (tokens,), generator=g),
           "one_with_base": torch.tensor([1, -1] * (tokens // 2) + [1] * (tokens % 2))}[kind]
    lora.note_step(idx, [1, 2, 3, 4])
    return SimpleNamespace(token_lora_indices=idx), idx


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("kind", ["single", "mixed", "with_base", "one_with_base"])
def test_add_lora_linear_matches_reference(tokens, kind):
    a, b = layer(tokens)
    wrapper, idx = step(kind, tokens)
    x = torch.randn(tokens, FAN_IN, dtype=torch.float64)
    y = torch.randn(tokens, sum(WIDTHS), dtype=torch.float64)
    want = y + per_token(x, a, b, idx, 0.5)
    for _ in range(2):  # second time through the cached A_all / B_all / mask
        got = y.clone()
        lora_fused.add_lora_linear(wrapper, never, got, x, a, b, 0.5, WIDTHS)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tensor_parallel", [1, 2])  # 1: the product skips the buffer
@pytest.mark.parametrize("kind", ["single", "mixed", "with_base"])
def test_row_parallel_shrink_then_expand_matches_reference(kind, tensor_parallel, monkeypatch):
    monkeypatch.setattr(STATE, "tp", tensor_parallel)
    a, b = layer(3, slices=(40,))
    wrapper, idx = step(kind, 9)
    x = torch.randn(9, FAN_IN, dtype=torch.float64)
    buffer = torch.zeros(1, 9, RANK, dtype=torch.float64)
    lora_fused.add_shrink(wrapper, never, buffer, x, a, 1.0)
    own = torch.stack([a[0][s, 0] @ x[t] if s >= 0 else torch.zeros(RANK, dtype=x.dtype)
                       for t, s in enumerate(idx.tolist())])
    if tensor_parallel > 1:  # the buffer is what crosses ranks: it must hold the shrink
        torch.testing.assert_close(buffer[0], own)
        buffer = buffer.clone()  # as an all-reduce would return: not the carried tensor
    else:
        assert STATE.carry is not None
    y = torch.ones(9, 50, dtype=torch.float64)
    lora_fused.add_expand(wrapper, never, y, buffer, b, (40,), offset_start=5)
    torch.testing.assert_close(y[:, 5:45], 1 + per_token(x, a, b, idx))
    assert (y[:, :5] == 1).all() and (y[:, 45:] == 1).all()


def test_new_adapter_in_a_slot_is_used_at_once():
    a, b = layer(5)
    wrapper, idx = step("mixed", 16)
    x = torch.randn(16, FAN_IN, dtype=torch.float64)
    y = torch.zeros(16, sum(WIDTHS), dtype=torch.float64)
    lora_fused.add_lora_linear(wrapper, never, y, x, a, b, 1.0, WIDTHS)
    for t in a + b:  # vLLM copies adapter 7's weights into slot 0 in place
        t[0].normal_()
    lora.note_step(idx, [7, 2, 3, 4])
    y = torch.zeros(16, sum(WIDTHS), dtype=torch.float64)
    lora_fused.add_lora_linear(wrapper, never, y, x, a, b, 1.0, WIDTHS)
    torch.testing.assert_close(y, per_token(x, a, b, idx))


def test_big_mixed_batches_and_switched_off_take_the_original_path(monkeypatch):
    a, b = layer(6)
    wrapper, _ = step("mixed", 64)
    calls = []

    def original(*args, **kwargs):
        calls.append(args[0])

    y = torch.zeros(64, sum(WIDTHS), dtype=torch.float64)
    x = torch.randn(64, FAN_IN, dtype=torch.float64)
    monkeypatch.setattr(lora, "DENSE_MAX_TOKEN_SLOTS", 64)  # 64 tokens x 4 slots > 64
    lora_fused.add_lora_linear(wrapper, original, y, x, a, b, 1.0, WIDTHS)
    monkeypatch.setattr(lora, "DENSE_MAX_TOKEN_SLOTS", 8192)
    monkeypatch.setattr(lora, "FUSED", False)
    lora_fused.add_lora_linear(wrapper, original, y, x, a, b, 1.0, WIDTHS)
    assert calls == [wrapper, wrapper]


def test_base_only_step_adds_nothing():
    a, b = layer(7)
    idx = torch.full((6,), -1)
    lora.note_step(idx, [1, 2, 3, 4])
    y = torch.ones(6, sum(WIDTHS), dtype=torch.float64)
    lora_fused.add_lora_linear(SimpleNamespace(token_lora_indices=idx), never, y,
                                   torch.randn(6, FAN_IN, dtype=torch.float64), a, b, 1.0, WIDTHS)
    assert (y == 1).all()


def test_expand_refuses_a_buffer_the_shrink_did_not_fill(monkeypatch):
    monkeypatch.setattr(STATE, "tp", 1)
    a, b = layer(8, slices=(40,))
    wrapper, _ = step("mixed", 9)
    buffer = torch.zeros(1, 9, RANK, dtype=torch.float64)
    lora_fused.add_shrink(wrapper, never, buffer, torch.randn(9, FAN_IN, dtype=torch.float64),
                              a, 1.0)
    with pytest.raises(RuntimeError, match="SELFSPEC_CPU_LORA=0"):
        lora_fused.add_expand(wrapper, never, torch.zeros(9, 40, dtype=torch.float64),
                                  buffer.clone(), b, (40,))


def test_weights_are_kept_for_a_bounded_number_of_adapter_combinations(monkeypatch):
    monkeypatch.setattr(lora_fused, "MAX_SLOT_SETS", 3)
    a, b = layer(9)
    x = torch.randn(4, FAN_IN, dtype=torch.float64)
    for pair in ([0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [0, 1]):
        idx = torch.tensor(pair * 2)
        lora.note_step(idx, [1, 2, 3, 4])
        y = torch.zeros(4, sum(WIDTHS), dtype=torch.float64)
        lora_fused.add_lora_linear(SimpleNamespace(token_lora_indices=idx), never, y, x, a,
                                       b, 1.0, WIDTHS)
        torch.testing.assert_close(y, per_token(x, a, b, idx))
    assert list(STATE.fused) == [(1, 2), (1, 3), (0, 1)]  # least recent dropped


def padded(seed, ranks, slices=WIDTHS):
    """A layer whose slot j holds a rank-ranks[j] adapter padded with zero rows to RANK, the
    way vLLM stores an adapter smaller than max_lora_rank."""
    a, b = layer(seed, slices)
    for slot, r in enumerate(ranks):
        for t in a:
            t[slot, :, r:] = 0
        for t in b:
            t[slot, :, :, r:] = 0
    return a, b


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_padded_rank_rows_are_left_out_and_results_unchanged(tensor_parallel, monkeypatch):
    monkeypatch.setattr(STATE, "tp", tensor_parallel)
    a, b = padded(10, ranks=(3, 5, RANK, 2))
    idx = torch.tensor([0, 1, -1, 0, 1, 1])
    lora.note_step(idx, [1, 2, 3, 4])
    wrapper = SimpleNamespace(token_lora_indices=idx)
    assert lora_fused.used_rank(a, [0, 1]) == 5
    assert lora_fused.used_rank(a, [3]) == 2
    assert lora_fused.used_rank(a, [0, 2]) == RANK
    x = torch.randn(6, FAN_IN, dtype=torch.float64)
    y = torch.zeros(6, sum(WIDTHS), dtype=torch.float64)
    lora_fused.add_lora_linear(wrapper, never, y, x, a, b, 1.0, WIDTHS)
    torch.testing.assert_close(y, per_token(x, a, b, idx))
    # the dense matmuls ran over 3 slices x 2 adapters x 5 rows, not x RANK
    assert lora_fused.a_all(a, [0, 1], 5, x.dtype).shape == (FAN_IN, 3 * 2 * 5)

    a1, b1 = padded(11, ranks=(3, 5, RANK, 2), slices=(40,))
    buffer = torch.zeros(1, 6, RANK, dtype=torch.float64)
    lora_fused.add_shrink(wrapper, never, buffer, x, a1, 1.0)
    if tensor_parallel == 1:
        assert STATE.carry[2].shape == (6, 1 * 2 * 5)
    y = torch.zeros(6, 40, dtype=torch.float64)
    lora_fused.add_expand(wrapper, never, y, buffer, b1, (40,))
    torch.testing.assert_close(y, per_token(x, a1, b1, idx))
