"""CUDA attention backend: segments batched into padded groups, one SDPA per group per layer.

Packing every segment into one [T, C_total + T] masked attention would make each query scan every
other sequence's context (a decode batch of 64 would do 64x the work). Instead segments are grouped by
query length (powers of two), and each group runs as a padded batch [B, Q_max] x [B, C_max + Q_max]:
work and memory stay within 2x of the real query counts and proportional to each group's contexts.

GQA without copying K/V per query head: the g = Hq / Hkv query heads sharing a KV head are folded into
the query axis ([B, Hkv, g * Q_max, D]) and the mask is tiled g times, so SDPA sees plain multi-head
attention over Hkv heads, which its fused masked kernels accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention import AttentionPlan, _Backend
from workers.kv_cache import PagedKVCache
from workers.transfer import to_device


@dataclass
class _Group:
    """Device tensors of one padded group of B segments."""

    rows: torch.Tensor  # [B, Qm] packed row of each (segment, query); padding repeats a real row
    ctx_slots: torch.Tensor  # [B, Cm] flat cache slots; padding points at slot 0 (masked out)
    mask: torch.Tensor  # [B, 1, g * Qm, Cm + Qm] bool
    valid: torch.Tensor  # [B, Qm] bool: real query rows
    out_rows: torch.Tensor  # [N] packed rows of the real queries, in valid order


def _group_segments(plan: AttentionPlan) -> list[list[int]]:
    """Segment indices grouped by query-length bucket (next power of two)."""
    buckets: dict[int, list[int]] = {}
    for i, (s, e) in enumerate(plan.rows):
        buckets.setdefault((e - s - 1).bit_length(), []).append(i)
    return [buckets[k] for k in sorted(buckets)]


def _build_group(plan: AttentionPlan, members: list[int], heads_per_kv: int, device) -> _Group:
    """Host-side padding of one group, then one copy of each tensor to the device."""
    q_max = max(plan.rows[i][1] - plan.rows[i][0] for i in members)
    c_max = max(len(plan.host_slots[i]) for i in members)
    b = len(members)
    rows = torch.zeros((b, q_max), dtype=torch.long)
    slots = torch.zeros((b, max(c_max, 0)), dtype=torch.long)
    mask = torch.zeros((b, q_max, c_max + q_max), dtype=torch.bool)
    valid = torch.zeros((b, q_max), dtype=torch.bool)
    for j, i in enumerate(members):
        start, end = plan.rows[i]
        q, c = end - start, len(plan.host_slots[i])
        rows[j] = torch.arange(start, start + q_max).clamp(max=end - 1)
        slots[j, :c] = torch.tensor(plan.host_slots[i], dtype=torch.long)
        mask[j, :q, :c] = True
        mask[j, :q, c_max:c_max + q] = plan.among[i]
        mask[j, q:, :] = True  # padding rows see everything (no all-masked rows; outputs are dropped)
        valid[j, :q] = True
    tiled = mask.repeat(1, heads_per_kv, 1)[:, None]  # [B, 1, g * Qm, Cm + Qm]; row gi * Qm + q = mask[q]
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return _Group(move(rows), move(slots), move(tiled), move(valid), move(rows[valid]))


class BatchedSDPA(_Backend):
    """One padded, batched SDPA per query-length group per layer, over gathered pages + new K/V."""

    def __init__(self, cache: PagedKVCache, plan: AttentionPlan):
        super().__init__(cache, plan)
        self._groups: list[_Group] | None = None  # built on the first layer, once heads are known

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_kv, head_dim = k.shape[1], k.shape[2]
        g = q.shape[1] // num_kv
        if self._groups is None:
            self._groups = [_build_group(self.plan, m, g, q.device) for m in _group_segments(self.plan)]
        kc, vc = self.cache.flat_k(layer), self.cache.flat_v(layer)
        out = torch.empty_like(q)  # [T, Hq, D]
        for grp in self._groups:
            b, q_max = grp.rows.shape
            # [B, Hkv, g * Qm, D]: query heads of one KV head folded into the query axis.
            qg = q[grp.rows].view(b, q_max, num_kv, g, head_dim).permute(0, 2, 3, 1, 4).reshape(b, num_kv, -1, head_dim)
            keys = torch.cat((kc[grp.ctx_slots], k[grp.rows]), dim=1).transpose(1, 2)  # [B, Hkv, Cm + Qm, D]
            values = torch.cat((vc[grp.ctx_slots], v[grp.rows]), dim=1).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=grp.mask)  # [B, Hkv, g * Qm, D]
            o = o.view(b, num_kv, g, q_max, head_dim).permute(0, 3, 1, 2, 4).reshape(b, q_max, -1, head_dim)
            out[grp.out_rows] = o[grp.valid]  # [N, Hq, D]
        self._write(layer, k, v)
        return out
