"""Attention of one packed step over the paged KV cache: one SDPA per layer, no host sync.

Per step (once, shared by every layer) `StepAttention` derives from the packed arrays
(workers.packing) everything as device tensors of static shape:
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
mixing one long prefill with many decodes does B*Q cells of work. This is the portable path (CPU,
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


class StepAttention:
    """Per-step indices and mask (see module docstring); `__call__(layer, q, k, v)` per layer."""

    def __init__(self, kv: PagedKVCache, arrays, layout, heads_per_kv: int):
        """arrays: workers.step.StepArrays (device views of the packed buffer); layout: StepLayout."""
        b, q, bs, g = layout.num_seqs, layout.max_query, layout.block_size, heads_per_kv
        c = layout.max_blocks * bs
        dev = arrays.token_ids.device
        self.kv, self.b, self.q, self.g = kv, b, q, g
        self.slot_mapping = arrays.slot_mapping  # [T]
        self.cell_rows, self.out_cells, new_visible = step_cells(arrays, q)
        offsets = torch.arange(bs, device=dev)
        self.ctx_slots = (arrays.block_tables[:, :, None] * bs + offsets).reshape(b, c)  # [B, C]
        ctx_visible = torch.arange(c, device=dev)[None, None, :] < arrays.context_len[:, None, None]  # [B, 1, C]
        mask = torch.cat((ctx_visible.expand(b, q, c), new_visible), dim=-1)  # [B, Q, C+Q]
        # Row gi * Q + i of the folded query axis is query i of head group gi: tile the mask g times.
        self.mask = mask[:, None].expand(b, g, q, c + q).reshape(b, 1, g * q, c + q)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) -> attention output [T, Hq, D]; writes K/V."""
        b, nq, g = self.b, self.q, self.g
        hkv, d = k.shape[1], k.shape[2]
        kc, vc = self.kv.flat_k(layer), self.kv.flat_v(layer)  # [slots, Hkv, D]
        keys = torch.cat((kc[self.ctx_slots], k[self.cell_rows].view(b, nq, hkv, d)), dim=1)  # [B, C+Q, Hkv, D]
        values = torch.cat((vc[self.ctx_slots], v[self.cell_rows].view(b, nq, hkv, d)), dim=1)
        queries = q[self.cell_rows].view(b, nq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, d)
        out = F.scaled_dot_product_attention(queries, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=self.mask)  # [B, Hkv, g*Q, D]
        out = out.view(b, hkv, g, nq, d).permute(0, 3, 1, 2, 4).reshape(b * nq, hkv * g, d)  # [B*Q, Hq, D]
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        return out[self.out_cells]
