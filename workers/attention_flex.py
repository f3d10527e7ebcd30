"""Attention of one packed step that reads the paged KV cache where it lies (PyTorch flex_attention).

The portable path (workers.attention.StepAttention) gathers every sequence's context K/V out of the
cache each layer (4 KiB per context token per layer at the 8B shape in bf16) and tiles a padded mask per
query head. This one does neither. With RoPE applied before caching, query i of sequence b sees

    (1) the committed context: cache positions < context_len[b], in b's blocks, wherever they lie;
    (2) the step's own new tokens j of b with branch_start[i] <= j <= i (workers.batch).

(1) is one flex_attention call over the whole cache of the layer, viewed as one long key sequence
[1, Hkv, slots, D] (no copy), with a BlockMask built once per step from the block tables: the full
blocks of each sequence are listed as full (no mask evaluated on them), its partial last block as
partial, where the mask says position < context_len. The mask function is exact everywhere
(flex_attention's eager path evaluates it on every slot): `logical[b, block]` is the block's index in
b's table, or -1, so shared prefix blocks work (each sequence has its own row).
(2) is a small dense attention in float32 over the step's new tokens ([B, Hkv, g, Q, Q] scores).
The two are merged exactly with their log-sum-exps (flash-decoding's split-K merge):
    out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse),  lse = logaddexp(lse1, lse2)
(2) always sees the query's own token, so no row is empty; a sequence without context has lse1 = -inf.
K/V of the step are then written to their slots with one fixed-shape index_copy_, as in StepAttention.

Per step the block mask costs B * blocks_in_cache int32 (the `logical` map and the index rows);
nothing here waits for the host. On CUDA flex_attention is compiled (it is a template there; eager is
a reference); on the CPU it runs eagerly (inductor's CPU flex has no log-sum-exp output), which is slow
and only for tests. Selected with ModelRunner(attention="flex"); measured only once a GPU session
runs bench/gpu_check.py (issue "CUDA fast path").
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch before AuxRequest: return_lse
    AuxRequest = None

from workers.attention import step_cells
from workers.kv_cache import PagedKVCache

Q_BLOCK = 128  # fewest query rows per block-mask tile (a sequence's queries share its context blocks)


def query_block(max_query: int, heads_per_kv: int) -> int:
    """Query rows per block-mask tile for a step of `max_query` query rows per sequence. Below 128 rows
    compiled flex_attention runs its decoding kernel, which stacks the query heads of one KV head into
    one tile of next_pow2(rows x heads_per_kv) rows and skips every config whose tile does not divide
    the mask's query block: at the 8B shape (4 query heads per KV head) a 64-row step tiled 256 rows
    against 128 and no config was left (inductor's NoValidChoicesError). A power of two at least that
    tall always divides; every query row of a sequence sees the same context blocks, so a taller tile
    changes nothing else."""
    rows = max(1, max_query) * max(1, heads_per_kv)
    return max(Q_BLOCK, 1 << (rows - 1).bit_length())


@functools.cache
def _flex(device_type: str):
    """Compiled flex_attention on CUDA. Every step bucket (B, Q) is its own static shape, so the
    recompile limit (default 8) is raised: past it dynamo would fall back to the slow eager path."""
    if device_type != "cuda":
        return flex_attention
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


class FlexStepAttention:
    """Same contract as workers.attention.StepAttention: built once per step, `__call__` per layer."""

    def __init__(self, kv: PagedKVCache, arrays, layout, heads_per_kv: int):
        b, q, bs, g = layout.num_seqs, layout.max_query, layout.block_size, heads_per_kv
        self.kv, self.b, self.q, self.g = kv, b, q, g
        self.slot_mapping = arrays.slot_mapping  # [T]
        self.cell_rows, self.out_cells, self.new_visible = step_cells(arrays, q)  # [B*Q], [T], [B, Q, Q]
        # The main kernel's KV tile (BLOCK_N) must divide the KV block: it is the block up to 64 tokens (>= 16
        # for tl.dot, a power of two: runner_options.step_function), 64 above. torch's default is 64 on an
        # H100/H200 in bf16 at head_dim 128 but 128 at head_dim 64 (inductor's h100_default_flex_config:
        # a 64-token block failed to compile there, helper-217, read only). Used on CUDA only.
        self.kernel_options = {"BLOCK_N": min(bs, 64)}
        self.block_mask = _context_block_mask(arrays.block_tables, arrays.context_len, kv.k[0].shape[0], bs, q,
                                              query_block(q, g))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) -> attention output [T, Hq, D]; writes K/V."""
        b, nq, g = self.b, self.q, self.g
        hkv, d = k.shape[1], k.shape[2]
        kc, vc = self.kv.flat_k(layer), self.kv.flat_v(layer)  # [slots, Hkv, D]
        queries = q[self.cell_rows].view(b, nq, hkv * g, d).transpose(1, 2)  # [B, Hq, Q, D]
        out1, lse1 = _flex(q.device.type)(queries, kc.permute(1, 0, 2).unsqueeze(0), vc.permute(1, 0, 2).unsqueeze(0),
                                          block_mask=self.block_mask, enable_gqa=True, kernel_options=self.kernel_options,
                                          **_WITH_LSE)
        lse1 = getattr(lse1, "lse", lse1)  # [B, Hq, Q]: AuxOutput.lse, or the tensor itself (older torch)
        out2, lse2 = self._new_tokens(queries, k[self.cell_rows], v[self.cell_rows], hkv, d)
        lse = torch.logaddexp(lse1.float(), lse2)  # [B, Hq, Q]
        out = out1.float() * torch.exp(lse1.float() - lse)[..., None] + out2 * torch.exp(lse2 - lse)[..., None]
        out = out.to(q.dtype).transpose(1, 2).reshape(b * nq, hkv * g, d)  # [B*Q, Hq, D]
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        return out[self.out_cells]

    def _new_tokens(self, queries, k_cells, v_cells, hkv: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each query over its own segment's new tokens, float32: (out [B, Hq, Q, D], lse [B, Hq, Q])."""
        b, nq, g = self.b, self.q, self.g
        qf = queries.float().view(b, hkv, g, nq, d)
        kf = k_cells.float().view(b, nq, hkv, d).permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Q, D]
        vf = v_cells.float().view(b, nq, hkv, d).permute(0, 2, 1, 3)[:, :, None]
        scores = (qf @ kf.transpose(-1, -2)) * d ** -0.5  # [B, Hkv, g, Q, Q]
        scores = scores.masked_fill(~self.new_visible[:, None, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g, Q]: finite, the diagonal is always visible
        out = torch.exp(scores - lse[..., None]) @ vf  # [B, Hkv, g, Q, D]
        return out.view(b, hkv * g, nq, d), lse.view(b, hkv * g, nq)


def _context_block_mask(tables: torch.Tensor, context_len: torch.Tensor, pool_blocks: int, bs: int,
                        max_query: int, q_block: int = Q_BLOCK) -> BlockMask:
    """The committed-context mask over the whole cache (module docstring, part 1). tables [B, NB] (padded
    with the scratch block, which is never below context_len), context_len [B]."""
    b, nb = tables.shape
    dev = tables.device
    cols = torch.arange(nb, device=dev).expand(b, nb)
    num_full = (context_len // bs).clamp(max=nb)  # [B] (clamp, not a host-made tensor: no sync, capturable)
    partial = (context_len % bs > 0) & (context_len // bs < nb)  # [B]
    logical = torch.full((b, pool_blocks), -1, dtype=torch.int64, device=dev)
    real = cols < (num_full + partial.long())[:, None]  # table entries holding committed context
    logical.scatter_(1, torch.where(real, tables, pool_blocks - 1), torch.where(real, cols, -1))
    qb = -(-max_query // q_block)
    width = torch.zeros((b, pool_blocks), dtype=torch.int32, device=dev)
    full_idx = width.clone()
    full_idx[:, : min(nb, pool_blocks)] = tables[:, :pool_blocks].int()  # columns past the pool are padding
    part_idx = width.clone()
    part_idx[:, 0] = torch.gather(tables, 1, num_full.clamp(max=nb - 1)[:, None])[:, 0].int()
    ctx = context_len

    def committed(bi, h, qi, kv):
        lb = logical[bi, kv // bs]
        return (lb >= 0) & (lb * bs + kv % bs < ctx[bi])

    return BlockMask.from_kv_blocks(
        partial.int()[:, None, None].expand(b, 1, qb).contiguous(), part_idx[:, None, None].expand(b, 1, qb, pool_blocks).contiguous(),
        num_full.int()[:, None, None].expand(b, 1, qb).contiguous(), full_idx[:, None, None].expand(b, 1, qb, pool_blocks).contiguous(),
        BLOCK_SIZE=(q_block, bs), mask_mod=committed, seq_lengths=(max_query, pool_blocks * bs), **_INFERENCE_ONLY,
    )


# The log-sum-exp output: `return_aux` where torch has it (its `return_lse` is deprecated there, and the
# deprecation's warn-once guard cost one more compile of the kernel per process), else `return_lse`.
_WITH_LSE = ({"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True})

# The query-side block indices serve only the backward pass; building them sorts a [B, qb, pool] map
# every step. The flag exists in recent torch; without it the indices are built and unused.
_INFERENCE_ONLY = ({"compute_q_blocks": False}
                   if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {})
