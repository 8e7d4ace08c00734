"""Grouped LoRA matmuls for vLLM's CPU backend, installed as a vLLM general plugin.

vLLM's PyTorch-native punica ops (`vllm.lora.ops.torch_ops`, the ones its CPU backend uses) gather
a private copy of the adapter weights for every token, `weights[indices]` -> [tokens, out, rank],
then contract with einsum. For a 64-token decode step that is cheap; for a prefill of 2,000 tokens
through a 1,536-wide projection it copies ~200 MB per LoRA layer, and a model has hundreds of LoRA
layers. That is why, on the embedded 135M model, vLLM-CPU generated 770 tok/s without an adapter
and 66 tok/s with one.

The GPU kernels instead group tokens by adapter: one small matmul per adapter in the batch. This
does the same with plain torch: for each distinct adapter slot among the tokens, `x[rows] @ W.T`
(and one matmul with no indexing at all in the common case of a single adapter). Tokens with index
-1 (no adapter, the base model) get no LoRA contribution, as on the GPU path; the gathering ops
index slot -1, i.e. the last slot, which is only harmless while that slot is empty.

plugin.py installs these in vLLM (the `vllm.general_plugins` entry point of this package);
`VLLM_PLUGINS` (vLLM's own allow-list) or `SELFSPEC_CPU_LORA=0` turns them off, which
`selfspec bench serving` uses to measure both.
"""

from __future__ import annotations

import logging

import torch

from selfspec_vllm_cpu.state import STATE

log = logging.getLogger(__name__)

FUSED = True  # whole LoRA layers in a few ops (lora_fused.py); False: op by op

# One matmul against the weights of every adapter in the step (extra FLOPs on masked-off blocks)
# beat a loop over the adapters (index gathers and scatters) at every size measured on the
# embedded model, up to a 3,200-token prefill over 16 adapters: 3.6 ms against 17 ms for
# gate_up_proj on one thread. The loop is only kept for batches past this many token-slot pairs.
DENSE_MAX_TOKEN_SLOTS = 1 << 20


class _Grouping:
    """How one step's tokens map to adapter slots. Every LoRA layer of a forward pass sees the
    same indices, so this is computed once per step (in update_metadata), not once per layer.
    The dense path works over the slots present in the step (`active`), not every slot: its
    cost then grows with the adapters in the batch, not with `max_loras`."""

    def __init__(self, indices: torch.Tensor):
        self.n = indices.shape[0]
        self.indices = indices
        present = indices.unique().tolist() if self.n else []
        self.active = [s for s in present if s >= 0]
        self.single = self.active[0] if present == self.active and len(self.active) == 1 else None
        self.rows = torch.arange(self.n, device=indices.device)
        lut = torch.zeros(max(self.active, default=0) + 1, dtype=torch.long,
                          device=indices.device)
        lut[self.active] = torch.arange(len(self.active), device=indices.device)
        self.local = lut[indices.clamp(min=0)]  # position of each token's slot in `active`
        self.active_t = torch.tensor(self.active, dtype=torch.long, device=indices.device)
        self._keep_mask = indices >= 0
        self._keep: dict[torch.dtype, torch.Tensor] = {}
        self._place: dict[torch.dtype, torch.Tensor] = {}
        self.cache: dict[tuple, torch.Tensor] = {}  # per-step masks of lora_fused.py

    def keep(self, dtype: torch.dtype) -> torch.Tensor:  # 1 for adapter tokens, 0 for base ones
        if dtype not in self._keep:
            self._keep[dtype] = self._keep_mask.to(dtype).unsqueeze(1)
        return self._keep[dtype]

    def place(self, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, active, 1]: 1 at each adapter token's slot, 0 elsewhere and for base ones."""
        if dtype not in self._place:
            hot = torch.nn.functional.one_hot(self.local, len(self.active)).to(dtype)
            self._place[dtype] = (hot * self.keep(dtype)).unsqueeze(2)
        return self._place[dtype]


def _grouping(indices: torch.Tensor) -> _Grouping:
    if STATE.step is not None and STATE.step[0] == indices.data_ptr() and STATE.step[1] == indices.shape[0]:
        return STATE.step[2]
    return _Grouping(indices)


def _weights(w: torch.Tensor) -> torch.Tensor:
    return w.squeeze(1) if w.dim() == 4 else w  # [slots, 1, out, in] -> [slots, out, in]


def _stack_expand(w: torch.Tensor, g: _Grouping, dtype: torch.dtype) -> torch.Tensor:
    """The active slots of [slots, out, r] as [active * r, out]; cached while the loaded
    adapters stay the same."""
    key = (w.data_ptr(), tuple(g.active), dtype)
    hit = STATE.stacked.get(key)
    if hit is None:
        _, width, rank = w.shape
        hit = w[g.active_t].permute(0, 2, 1).reshape(len(g.active) * rank, width).to(dtype)
        if STATE.loaded is not None:  # only cache when update_metadata tells us what is loaded
            if len(STATE.stacked) >= 1024:  # every subset of adapters would pile up: start over
                STATE.stacked.clear()
            STATE.stacked[key] = hit
    return hit


def grouped_lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """[tokens, in] x per-token slot of [slots, out, in] -> [tokens, out]; zero where index < 0."""
    w = _weights(weights)
    _, width, fan_in = w.shape
    x = inputs.to(dtype)
    g = _grouping(indices)
    if g.n == 0:
        return x.new_zeros((x.shape[0], width))
    x = x[: g.n]
    if g.single is not None:  # one adapter for the whole batch: one plain matmul
        return x @ w[g.single].to(dtype).t()
    k = len(g.active)
    if k == 0:  # base model only
        return x.new_zeros((g.n, width))
    if g.n * k <= DENSE_MAX_TOKEN_SLOTS:
        if width <= fan_in:  # shrink ([r, in]): the active slots' projections in one matmul
            wa = w if k == w.shape[0] else w[g.active_t]
            every = x @ wa.reshape(k * width, fan_in).to(dtype).t()
            return every.view(g.n, k, width)[g.rows, g.local] * g.keep(dtype)
        # expand ([out, r]): put each token's r-vector in its slot's block, then one matmul
        blocks = x.unsqueeze(1) * g.place(dtype)  # [n, active, r], zero off-slot
        return blocks.view(g.n, k * fan_in) @ _stack_expand(w, g, dtype)
    out = x.new_zeros((g.n, width))
    for slot in g.active:
        rows = (indices == slot).nonzero().squeeze(1)
        out[rows] = x[rows] @ w[slot].to(dtype).t()
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:  # same quirk as vLLM's op
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                      slice_size, add_inputs=True):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


# vLLM V1 always takes the "prefill" (sgmv) path: per-run slots plus run lengths, which the
# torch ops expand to per-token indices with a fresh repeat_interleave in every layer. The
# per-token indices of this step are already known (update_metadata), so reuse them.
def _token_indices(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor):
    if (STATE.prefill is not None and STATE.prefill[0] == lora_indices_tensor.data_ptr()
            and STATE.prefill[1] == lora_indices_tensor.shape[0]):
        return STATE.prefill[2]
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor,
                _token_indices(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor,
                _token_indices(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                      slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      _token_indices(lora_indices_tensor, seq_len_tensor), slice_offset,
                      slice_size, add_inputs)


def note_step(indices: torch.Tensor, lora_index_to_id,
              per_run: torch.Tensor | None = None) -> None:
    """Called once per engine step: group this step's tokens (`per_run`: the sgmv path's
    per-run slot buffer, whose runs expand to `indices`), and drop the stacked expand weights if
    a slot now holds a different adapter."""
    loaded = tuple(lora_index_to_id)
    if loaded != STATE.loaded:
        STATE.stacked.clear()
        STATE.loaded = loaded
    STATE.step = (indices.data_ptr(), indices.shape[0], _Grouping(indices))
    STATE.prefill = None if per_run is None else (per_run.data_ptr(), per_run.shape[0], indices)
