"""Attention of one packed step over the paged KV cache: one SDPA per layer, no host sync.

Per step (once, shared by every layer) `StepAttention` derives from the packed arrays
(workers.step_layout) everything as device tensors of static shape:
  - cell_rows [B*Q]: the packed row of query i of sequence b (cells past the sequence's query length,
    and padding sequences, point at row 0; their outputs are never used);
  - out_cells [T]: the cell b*Q + i of each packed row (padding rows: cell 0), to gather outputs back;
  - ctx_slots [B, C] with C = NB * block_size: every slot of the sequence's first NB blocks;
  - mask [B, 1, g*Q, C+Q] bool: context column c is visible iff c < context_len[b]; new column j is
    visible to query i iff branch_start[i] <= j <= i (workers.batch). For real rows j <= i < q_len, so
    padding columns are never seen; padding rows always see their own column (the diagonal), so no row
    is fully masked and SDPA produces no NaN.
Per layer: gather context K/V through the block tables and the step's own new K/V by cell, fold the
g = Hq / Hkv query heads sharing a KV head into the query axis (GQA without copying K/V per head; the
mask is tiled g times), one SDPA, gather outputs back to packed rows, then write the K/V of every row
to its slot with one fixed-shape index_copy_ (dropped rows and padding write the scratch block).
No boolean-mask indexing, nonzero, .item() or data-dependent shapes: the step can be captured as a
CUDA graph per bucket.

Cost: per layer the gathered context is 2 * B * C * Hkv * D elements (K and V; for an 8B model in
bf16 that is 4 KiB per context token, so 64 sequences x 2048 tokens = 512 MiB), held twice while the
step's own K/V are concatenated to it (~1 GiB transient per layer, freed before the next layer); the
mask is B * g*Q * (C+Q) bytes, and every sequence is padded to the step's longest query, so a step
mixing one long prefill with many decodes would do B*Q cells of work over the longest context: such a
step is packed in attention groups (workers.attention_groups), each attended at its own
shapes (a 434-token prompt chunk beside 63 decode steps: 6.0 s -> 0.14 s on a 2-core CPU with the
shipped model; docs/benchmarks.md, "Attention groups"). This is the portable path (CPU,
tests, CUDA fallback); the CUDA fast path replaces this class in place with paged attention over the
block tables (flex_attention with a block mask, or FlashInfer), which reads the cache where it lies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from workers.kv_cache import PagedKVCache


class StepCells(NamedTuple):
    """Where each sequence's queries sit in the packed rows, and what each sees of the step's own tokens."""

    cell_rows: torch.Tensor  # [B*Q] packed row of query i of sequence b (padding cells: row 0)
    out_cells: torch.Tensor  # [T] cell b*Q + i of each packed row
    new_visible: torch.Tensor  # [B, Q, Q] bool: query i sees new token j iff branch_start[i] <= j <= i


def step_cells(arrays, max_query: int) -> StepCells:
    """The per-step cell layout shared by the attention backends (arrays: workers.step.StepArrays)."""
    q = max_query
    i = torch.arange(q, device=arrays.token_ids.device)
    valid = i[None, :] < arrays.query_len[:, None]  # [B, Q]
    rows = torch.where(valid, arrays.query_start[:, None] + i[None, :], 0)  # [B, Q]
    branch_start = torch.where(valid, arrays.branch_start[rows], 0)  # [B, Q]
    new_visible = (i[None, None, :] >= branch_start[:, :, None]) & (i[None, None, :] <= i[None, :, None])
    return StepCells(rows.reshape(-1), arrays.seq_index * q + arrays.query_index, new_visible)


class _Group(NamedTuple):
    """One attention group's gathers and mask: `count` sequences at query length `q` (see StepAttention)."""

    count: int
    q: int
    cell_rows: torch.Tensor  # [count * q] packed row of each query cell
    ctx_slots: torch.Tensor  # [count, C_g] context slots
    mask: torch.Tensor  # [count, 1, g * q, C_g + q] bool


def _group(cell_rows, ctx_slots, context_len, new_visible, heads_per_kv: int) -> _Group:
    """cell_rows [b, q], ctx_slots [b, c], context_len [b], new_visible [b, q, q] -> the group's arrays."""
    (b, q), c, g = cell_rows.shape, ctx_slots.shape[1], heads_per_kv
    ctx_visible = torch.arange(c, device=ctx_slots.device)[None, None, :] < context_len[:, None, None]  # [b, 1, c]
    mask = torch.cat((ctx_visible.expand(b, q, c), new_visible), dim=-1)  # [b, q, c + q]
    # Row gi * q + i of the folded query axis is query i of head group gi: tile the mask g times.
    mask = mask[:, None].expand(b, g, q, c + q).reshape(b, 1, g * q, c + q)
    return _Group(b, q, cell_rows.reshape(-1), ctx_slots, mask)


class StepAttention:
    """Per-step indices and mask (see module docstring); `__call__(layer, q, k, v)` per layer.

    A step packed with attention groups (workers.attention_groups: sequences of widely
    different query lengths, such as a prompt chunk beside decode steps) runs one SDPA per group, each
    at its group's longest query and context instead of the step's (static slices of the step's
    arrays in the order of its group_seqs field: no host sync); the outputs are concatenated group
    after group and gathered back to packed rows."""

    def __init__(self, kv: PagedKVCache, arrays, layout, heads_per_kv: int):
        """arrays: workers.step.StepArrays (device views of the packed buffer); layout: StepLayout."""
        b, q, bs = layout.num_seqs, layout.max_query, layout.block_size
        c = layout.max_blocks * bs
        dev = arrays.token_ids.device
        self.kv = kv
        self.slot_mapping = arrays.slot_mapping  # [T]
        cell_rows, out_cells, new_visible = step_cells(arrays, q)
        offsets = torch.arange(bs, device=dev)
        ctx_slots = (arrays.block_tables[:, :, None] * bs + offsets).reshape(b, c)  # [B, C]
        cells = cell_rows.view(b, q)
        if not layout.attention_groups:
            self.groups = [_group(cells, ctx_slots, arrays.context_len, new_visible, heads_per_kv)]
            self.out_cells = out_cells  # [T] cell b * Q + i of each packed row
            return
        self.groups, firsts, start, base = [], [], 0, 0
        for count, group_q, group_blocks in layout.attention_groups:
            seqs = arrays.group_seqs[start:start + count]
            self.groups.append(_group(cells[seqs, :group_q], ctx_slots[seqs, :group_blocks * bs],
                                      arrays.context_len[seqs], new_visible[seqs, :group_q, :group_q], heads_per_kv))
            firsts.append(torch.arange(count, device=dev) * group_q + base)  # first output cell of each
            start, base = start + count, base + count * group_q
        position = torch.empty_like(arrays.group_seqs)  # [B] place of each sequence in group order
        position[arrays.group_seqs] = torch.arange(b, device=dev)
        first_cell = torch.cat(firsts)[position]  # [B] first output cell of each sequence
        self.out_cells = first_cell[arrays.seq_index] + arrays.query_index  # [T]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) -> attention output [T, Hq, D]; writes K/V."""
        kc, vc = self.kv.flat_k(layer), self.kv.flat_v(layer)  # [slots, Hkv, D]
        outs = [self._attend(group, kc, vc, q, k, v) for group in self.groups]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        return out[self.out_cells]

    @staticmethod
    def _attend(group: _Group, kc, vc, q, k, v) -> torch.Tensor:
        """One group's attention: [count * q_g, Hq, D], cell (sequence, query) order."""
        b, nq = group.count, group.q
        hkv, d = k.shape[1], k.shape[2]
        g = q.shape[1] // hkv
        keys = torch.cat((kc[group.ctx_slots], k[group.cell_rows].view(b, nq, hkv, d)), dim=1)  # [b, C+q, Hkv, D]
        values = torch.cat((vc[group.ctx_slots], v[group.cell_rows].view(b, nq, hkv, d)), dim=1)
        queries = q[group.cell_rows].view(b, nq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, d)
        out = F.scaled_dot_product_attention(queries, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=group.mask)  # [b, Hkv, g*q, D]
        return out.view(b, hkv, g, nq, d).permute(0, 3, 1, 2, 4).reshape(b * nq, hkv * g, d)
