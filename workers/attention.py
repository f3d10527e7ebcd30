"""Attention over the paged cache for one packed forward.

`AttentionPlan` is built once per forward from the segments: which query rows belong to which
segment, the cache slots of each segment's committed context, the visibility mask (workers.batch
rules) and where kept K/V go. Each layer then calls a backend with its q/k/v:

- `SegmentSDPA` (CPU, tests, CI): one torch SDPA call per segment with an explicit boolean mask
  [Q_i, C_i + Q_i] over (gathered context K/V) + (the segment's own new K/V).
- `BatchedSDPA` (CUDA, workers/attention_batched.py): segments grouped by query length, each group one
  padded, batched SDPA per layer over gathered pages. It also runs on CPU, which is how its logic is
  tested without a GPU.

Both write kept tokens' K/V into their cache slots, in query order, in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.batch import TRUNK, Segment
from workers.kv_cache import PagedKVCache
from workers.transfer import to_device


def among_queries(segment: Segment) -> torch.Tensor:
    """Host boolean mask [Q, Q]: query i sees query j (causal, self included; branch rules if any)."""
    q = len(segment.token_ids)
    idx = torch.arange(q)
    among = idx[None, :] <= idx[:, None]
    if segment.branch is not None:
        b = torch.tensor(segment.branch)
        among &= (b[None, :] == b[:, None]) | (b[None, :] == TRUNK)
    return among


@dataclass
class AttentionPlan:
    """Per-forward metadata shared by all layers (all tensors on the device)."""

    rows: list[tuple[int, int]]  # [start, end) query rows of each segment in the packed batch
    host_slots: list[list[int]]  # per segment: flat cache slots of its committed context (C_i)
    among: list[torch.Tensor]  # per segment: host [Q_i, Q_i] bool visibility among its queries
    context_slots: list[torch.Tensor]  # per segment: [C_i] the same slots on the device
    masks: list[torch.Tensor]  # per segment: [Q_i, C_i + Q_i] bool on the device (context all visible)
    write_rows: torch.Tensor  # [W] packed rows of kept tokens, in query order
    write_slots: torch.Tensor  # [W] their flat cache slots

    @classmethod
    def build(cls, segments: list[Segment], context_slots: list[list[int]], write_slots: list[list[int]],
              device) -> AttentionPlan:
        rows, among, masks, ctx, w_rows, w_slots = [], [], [], [], [], []
        start = 0
        for seg, slots, writes in zip(segments, context_slots, write_slots):
            end = start + len(seg.token_ids)
            rows.append((start, end))
            ctx.append(to_device(slots, device))
            among.append(among_queries(seg))
            visible = torch.cat((torch.ones((end - start, len(slots)), dtype=torch.bool), among[-1]), dim=1)
            masks.append(visible.to(device, non_blocking=True))
            w_rows.extend(start + i for i, kept in enumerate(seg.keep) if kept)
            w_slots.extend(writes)
            start = end
        return cls(rows, list(context_slots), among, ctx, masks, to_device(w_rows, device), to_device(w_slots, device))


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


def backends() -> dict[str, type]:
    """Attention backends by name (the batched one lives in workers.attention_batched)."""
    from workers.attention_batched import BatchedSDPA

    return {"segment": SegmentSDPA, "batched": BatchedSDPA}


def default_backend(device: torch.device) -> str:
    """The backend picked automatically: batched on a GPU, per-segment on CPU."""
    return "batched" if device.type == "cuda" else "segment"
