"""A whole LoRA layer in two or three torch ops, for vLLM's CPU backend (installed by
plugin.py with the grouped ops of lora.py).

vLLM's CPU punica wrapper applies a LoRA'd linear slice by slice: allocate an fp32 buffer, then per
slice a shrink op and an expand op, each of which casts, indexes and scales. On a small model the
matmuls are tiny and that op count is the cost: ~40 ops for `qkv_proj`, in each of ~150 LoRA
layers, every step. It also made a batch mixed over several adapters slower than one adapter,
because every extra op ran once per adapter present.

Here, over the adapters present in the step (`active`, k of them) and the layer's S slices:

    wide = x @ A_all        A_all: [in, S*k*r], every slice's and active slot's A side by side
    wide *= mask            mask:  [tokens, S*k*r], 1 on each token's own slot, 0 elsewhere and
                                   on base-model tokens (skipped when one adapter has them all)
    y   += wide @ B_all     B_all: [S*k*r, sum(out)], block-diagonal over slices, stacked slots

so a mixed batch costs one elementwise op more than a single-adapter one, whatever k is. r is
the rank the step's adapters use (`used_rank`), not vLLM's max_lora_rank: vLLM pads each adapter
with zero rows up to it, which at rank 8 under the default 16 doubled these matmuls. The
masked-off blocks are extra FLOPs: at rank 8 and decode-sized batches they are far cheaper than
the ops they replace, and batches with more than `lora.DENSE_MAX_TOKEN_SLOTS` token-slot
pairs (long prefills over many adapters) keep the per-slice path.

`o_proj` and `down_proj` (row-parallel) call shrink and expand separately through a buffer, so
those two get the same treatment in two halves, the masked product carried from one to the other.
"""

from __future__ import annotations

import torch

from selfspec_vllm_cpu import lora
from selfspec_vllm_cpu.state import STATE

# Each adapter combination seen in a step gets every layer's A_all / B_all (up to ~1 MB a layer
# with 8 adapters); keep the most recent few, so a long-running server with many adapters does
# not accumulate every subset of them.
MAX_SLOT_SETS = 16


def _tensor_parallel() -> int:
    if STATE.tp is None:
        try:
            from vllm.distributed import get_tensor_model_parallel_world_size
            STATE.tp = get_tensor_model_parallel_world_size()
        except Exception:  # noqa: BLE001 - no parallel state (tests): write the buffer, safe
            return 2
    return STATE.tp


def _fusable(g: lora._Grouping) -> bool:
    return bool(g.active) and (g.single is not None
                               or g.n * len(g.active) <= lora.DENSE_MAX_TOKEN_SLOTS)


def _slots(g: lora._Grouping) -> list[int]:
    return [g.single] if g.single is not None else g.active


def _cached(slots: list[int], key: tuple, build):
    if STATE.loaded is None:  # tests and odd callers: no step announced, nothing to trust
        return build()
    if STATE.fused_for != STATE.loaded:  # a slot now holds another adapter
        STATE.fused.clear()
        STATE.fused_for = STATE.loaded
    per = STATE.fused.get(tuple(slots))
    if per is None:
        per = STATE.fused[tuple(slots)] = {}
        if len(STATE.fused) > MAX_SLOT_SETS:
            STATE.fused.popitem(last=False)
    else:
        STATE.fused.move_to_end(tuple(slots))
    hit = per.get(key)
    if hit is None:
        hit = per[key] = build()
    return hit


def used_rank(lora_a: tuple[torch.Tensor, ...], slots: list[int]) -> int:
    """The rank rows these slots' adapters use in this layer: vLLM pads every adapter to
    max_lora_rank with zero rows (a rank-8 expert in a max_lora_rank=16 engine, or headroom kept
    for hot-added experts), and those rows are half or more of the dense matmuls' work."""
    def build():
        rows = torch.stack([(lora._weights(a)[slots] != 0).any(-1).any(0) for a in lora_a])
        nonzero = rows.any(0).nonzero()
        return int(nonzero[-1]) + 1 if len(nonzero) else 1
    return _cached(slots, ("rank", tuple(a.data_ptr() for a in lora_a)), build)


def a_all(lora_a: tuple[torch.Tensor, ...], slots: list[int], rank: int,
          dtype) -> torch.Tensor:
    """[in, S*k*rank]: column block (s, j) is slice s's A for slot j (its first `rank` rows),
    transposed."""
    def build():
        cols = [lora._weights(a)[slots][:, :rank].reshape(-1, a.shape[-1]) for a in lora_a]
        return torch.cat(cols).to(dtype).t().contiguous()
    return _cached(slots, ("a", tuple(a.data_ptr() for a in lora_a), rank, dtype), build)


def b_all(lora_b: tuple[torch.Tensor, ...], slots: list[int], widths: tuple[int, ...],
          rank: int, dtype) -> torch.Tensor:
    """[S*k*rank, sum(widths)]: slice s's rows hold its slots' B^T in its own output columns."""
    def build():
        k = len(slots)
        out = torch.zeros(len(lora_b) * k * rank, sum(widths), dtype=dtype)
        col = 0
        for s, (b, width) in enumerate(zip(lora_b, widths)):
            w = lora._weights(b)[slots][:, :width, :rank]  # [k, out, rank]
            out[s * k * rank:(s + 1) * k * rank, col:col + w.shape[1]] = (
                w.permute(0, 2, 1).reshape(k * rank, w.shape[1]))
            col += width
        return out
    key = ("b", tuple(b.data_ptr() for b in lora_b), widths, rank, dtype)
    return _cached(slots, key, build)


def mask(g: lora._Grouping, slices: int, rank: int, dtype) -> torch.Tensor:
    """[tokens, S*k*r] ones on each adapter token's own slot in every slice; zero rows for base."""
    key = ("mask", slices, rank, dtype)
    hit = g.cache.get(key)
    if hit is None:
        place = g.place(dtype)  # [n, k, 1]
        hit = place.unsqueeze(1).expand(g.n, slices, len(g.active), rank).reshape(g.n, -1)
        g.cache[key] = hit = hit.contiguous()
    return hit


def add_lora_linear(wrapper, original, y, x, lora_a_stacked, lora_b_stacked, scale,
                    output_slices, *, buffer=None, **kwargs):
    g = lora._grouping(wrapper.token_lora_indices)
    if g.n and not g.active:
        return None  # base model only: nothing to add (vLLM's ops would still run)
    if not lora.FUSED or not _fusable(g):
        return original(wrapper, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                        buffer=buffer, **kwargs)
    slots = _slots(g)
    rank = used_rank(lora_a_stacked, slots)
    x = x.view(-1, x.shape[-1])[: g.n].to(y.dtype)
    wide = x @ a_all(lora_a_stacked, slots, rank, y.dtype)
    if g.single is None:
        wide.mul_(mask(g, len(lora_a_stacked), rank, y.dtype))
    if scale != 1.0:
        wide.mul_(scale)
    rows = y.view(-1, y.shape[-1])[: g.n, : sum(output_slices)]
    rows.addmm_(wide, b_all(lora_b_stacked, slots, tuple(output_slices), rank, y.dtype))
    return None


def add_shrink(wrapper, original, y, x, lora_a_stacked, scale, **kwargs):
    """y[s][t] = scale * A_s[slot(t)] @ x[t] for the row-parallel layers' buffer [S, T, r].

    Without tensor parallelism the buffer goes straight from here to add_expand, so the masked
    [tokens, S*k*r] product is handed over as it is (`STATE.carry`) and the buffer is left unwritten:
    that skips narrowing each token to its own slot here only to spread it back out there."""
    g = lora._grouping(wrapper.token_lora_indices)
    if not lora.FUSED or not _fusable(g) or not isinstance(y, torch.Tensor):
        return original(wrapper, y, x, lora_a_stacked, scale, **kwargs)
    slots = _slots(g)
    slices = len(lora_a_stacked)
    # Handed over (below): only the rows the adapters use. Written to the buffer: all of them,
    # in vLLM's layout.
    carry = _tensor_parallel() == 1
    rank = used_rank(lora_a_stacked, slots) if carry else lora_a_stacked[0].shape[-2]
    x = x.view(-1, x.shape[-1])[: g.n]
    wide = x @ a_all(lora_a_stacked, slots, rank, x.dtype)  # [n, S*k*rank]
    if g.single is None:
        wide.mul_(mask(g, slices, rank, x.dtype))
    if scale != 1.0:
        wide.mul_(scale)
    if carry:
        STATE.carry = (y.data_ptr(), tuple(y.shape), wide, rank)
        return None
    STATE.carry = None
    if g.single is None:  # keep each token's own slot: [n, S, k, r] -> [n, S, r]
        wide = wide.view(g.n, slices, len(slots), rank).sum(2)
    y[:, : g.n, :rank].copy_(wide.view(g.n, slices, rank).transpose(0, 1))
    return None


def add_expand(wrapper, original, y, x, lora_b_stacked, output_slices, offset_start=0,
               add_inputs=True, **kwargs):
    """y[t, offset_s:...] += B_s[slot(t)] @ x[s][t], from the buffer add_shrink filled."""
    g = lora._grouping(wrapper.token_lora_indices)
    if (not lora.FUSED or not _fusable(g) or not isinstance(x, torch.Tensor)
            or not add_inputs):
        return original(wrapper, y, x, lora_b_stacked, output_slices, offset_start, add_inputs,
                        **kwargs)
    slots = _slots(g)
    carried, STATE.carry = STATE.carry, None
    rank = lora_b_stacked[0].shape[-1]
    if carried is not None and carried[:2] == (x.data_ptr(), tuple(x.shape)):
        wide, rank = carried[2].to(y.dtype), carried[3]
    elif carried is not None:  # the buffer add_shrink left unwritten is not this one
        raise RuntimeError("selfspec CPU LoRA: add_expand got another buffer than the one "
                           "add_shrink just skipped; this vLLM calls them differently than "
                           "0.32 did. Run with SELFSPEC_CPU_LORA=0 and report the version.")
    else:  # a buffer add_shrink wrote: back into each token's slot block, [n, S, k, r]
        wide = x[:, : g.n, :rank].transpose(0, 1).to(y.dtype)  # [n, S, r]
        if g.single is None:
            wide = wide.unsqueeze(2) * g.place(y.dtype).unsqueeze(1)
        wide = wide.reshape(g.n, -1)
    width = sum(output_slices)
    rows = y.view(-1, y.shape[-1])[: g.n, offset_start: offset_start + width]
    rows.addmm_(wide, b_all(lora_b_stacked, slots, tuple(output_slices), rank, y.dtype))
    return None
