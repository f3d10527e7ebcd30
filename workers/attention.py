"""Attention over the paged cache for one packed forward.

`AttentionPlan` is built once per forward from the segments: which query rows belong to which
segment, the cache slots of each segment's committed context, the visibility mask (workers.batch
rules) and where kept K/V go. Each layer then calls a backend with its q/k/v:

- `SegmentSDPA` (CPU, tests, CI): one torch SDPA call per segment with an explicit boolean mask
  [Q_i, C_i + Q_i] over (gathered context K/V) + (the segment's own new K/V).
- `PackedSDPA` (CUDA): one SDPA call per layer over all segments at once: keys are every segment's
  gathered pages followed by all new K/V, with a block-structured boolean mask [T, C + T]. Correctness
  first; it also runs on CPU, which is how its logic is tested without a GPU.

Both write kept tokens' K/V into their cache slots, in query order, in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.batch import TRUNK, Segment
from workers.kv_cache import PagedKVCache
from workers.transfer import to_device


def visibility(segment: Segment, context_len: int, device) -> torch.Tensor:
    """Boolean mask [Q, context_len + Q]: the committed context, then causal/branch rules among queries."""
    q = len(segment.token_ids)
    idx = torch.arange(q, device=device)
    among = idx[None, :] <= idx[:, None]  # [Q, Q] causal, self included
    if segment.branch is not None:
        b = to_device(segment.branch, device)
        among &= (b[None, :] == b[:, None]) | (b[None, :] == TRUNK)
    ctx = torch.ones((q, context_len), dtype=torch.bool, device=device)
    return torch.cat((ctx, among), dim=1)


@dataclass
class AttentionPlan:
    """Per-forward metadata shared by all layers (all tensors on the device)."""

    rows: list[tuple[int, int]]  # [start, end) query rows of each segment in the packed batch
    context_slots: list[torch.Tensor]  # per segment: [C_i] flat cache slots of its committed context
    masks: list[torch.Tensor]  # per segment: [Q_i, C_i + Q_i] bool
    write_rows: torch.Tensor  # [W] packed rows of kept tokens, in query order
    write_slots: torch.Tensor  # [W] their flat cache slots

    @classmethod
    def build(cls, segments: list[Segment], context_slots: list[list[int]], write_slots: list[list[int]],
              device) -> AttentionPlan:
        rows, masks, ctx, w_rows, w_slots = [], [], [], [], []
        start = 0
        for seg, slots, writes in zip(segments, context_slots, write_slots):
            end = start + len(seg.token_ids)
            rows.append((start, end))
            ctx.append(to_device(slots, device))
            masks.append(visibility(seg, len(slots), device))
            w_rows.extend(start + i for i, kept in enumerate(seg.keep) if kept)
            w_slots.extend(writes)
            start = end
        return cls(rows, ctx, masks, to_device(w_rows, device), to_device(w_slots, device))


class _Backend:
    def __init__(self, cache: PagedKVCache, plan: AttentionPlan):
        self.cache, self.plan = cache, plan

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter kept rows' K/V [W, Hkv, D] into their slots (disjoint from every context slot)."""
        if self.plan.write_rows.numel():
            self.cache.flat_k(layer).index_copy_(0, self.plan.write_slots, k.index_select(0, self.plan.write_rows))
            self.cache.flat_v(layer).index_copy_(0, self.plan.write_slots, v.index_select(0, self.plan.write_rows))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [Q, Hq, D], k/v [S, Hkv, D], mask [Q, S] -> [Q, Hq, D] (GQA by head groups)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # [Hq, Q, D]
    return out.transpose(0, 1)


class SegmentSDPA(_Backend):
    """CPU backend: one SDPA per segment; memory stays linear in each segment's own size."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.flat_k(layer), self.cache.flat_v(layer)
        out = torch.empty_like(q)  # [T, Hq, D]
        for (s, e), slots, mask in zip(self.plan.rows, self.plan.context_slots, self.plan.masks):
            keys = torch.cat((kc.index_select(0, slots), k[s:e]))  # [C_i + Q_i, Hkv, D]
            values = torch.cat((vc.index_select(0, slots), v[s:e]))
            out[s:e] = _sdpa(q[s:e], keys, values, mask)
        self._write(layer, k, v)
        return out


class PackedSDPA(_Backend):
    """CUDA backend: all segments in one SDPA per layer over gathered pages + new K/V."""

    def __init__(self, cache: PagedKVCache, plan: AttentionPlan):
        super().__init__(cache, plan)
        self.all_slots = torch.cat(plan.context_slots)  # [C]
        self.mask = self._packed_mask()  # [T, C + T]

    def _packed_mask(self) -> torch.Tensor:
        plan = self.plan
        num_ctx = int(self.all_slots.shape[0])
        num_rows = plan.rows[-1][1] if plan.rows else 0
        mask = torch.zeros((num_rows, num_ctx + num_rows), dtype=torch.bool, device=self.all_slots.device)
        c0 = 0
        for (s, e), slots, seg_mask in zip(plan.rows, plan.context_slots, plan.masks):
            c = int(slots.shape[0])
            mask[s:e, c0:c0 + c] = seg_mask[:, :c]
            mask[s:e, num_ctx + s:num_ctx + e] = seg_mask[:, c:]
            c0 += c
        return mask

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        # Heads expanded explicitly ([C + T, Hq, D]): SDPA's fused masked kernels do not take GQA.
        keys = torch.cat((self.cache.flat_k(layer).index_select(0, self.all_slots), k)).repeat_interleave(group, 1)
        values = torch.cat((self.cache.flat_v(layer).index_select(0, self.all_slots), v)).repeat_interleave(group, 1)
        out = _sdpa(q, keys, values, self.mask)
        self._write(layer, k, v)
        return out


BACKENDS = {"segment": SegmentSDPA, "packed": PackedSDPA}


def default_backend(device: torch.device) -> str:
    """The backend picked automatically: packed on a GPU, per-segment on CPU."""
    return "packed" if device.type == "cuda" else "segment"
