"""Attention of one packed step in one Triton kernel per layer that reads the paged KV cache in place.

The portable path (workers.attention.StepAttention) gathers each sequence's context K/V out of the cache
every layer, concatenates the step's own K/V to it, tiles a padded mask per query head, runs SDPA and
writes the new K/V with two index_copy_ calls. On the 8B shape on an H200 that glue took 1.35 ms of a
6.3 ms one-token forward (docs/benchmarks.md, the `profile` part: SDPA 0.66, gather 0.33, K/V write
0.19, concatenation 0.17). This kernel does all of it in one launch per layer, the way vLLM's and
nano-vllm's paged decode kernels read the cache through block tables. With RoPE applied before caching,
query i of sequence b sees (workers.batch, the spec's visibility rule):

    (1) the committed context: positions p < context_len[b], at slot
        block_tables[b, p // block_size] * block_size + p % block_size of the layer's cache;
    (2) the step's own new tokens j of b with branch_start[i] <= j <= i, read from the packed k/v rows
        query_start[b] + j (not from the cache: dropped rows write the scratch slot).

Grid: (sequences B, KV heads Hkv, query tiles ceil(Q / BLOCK_Q) x context splits S). One program holds
BLOCK_Q queries of its sequence for all g = Hq / Hkv query heads of its KV head (GQA folded into the
tile's rows, so each K/V tile is loaded once for the g heads), streams (1) and then (2) in tiles of
BLOCK_N keys with an online softmax in float32 (FlashAttention-2's recurrence), and writes the output
rows of its queries.
It also writes the K/V of its query rows for its KV head to their slots (slot_mapping), which replaces
the two index_copy_ calls: every real row lies in exactly one query tile, and packing padding rows (past
every sequence's query length) write only the scratch slot, so skipping them changes nothing that is
read. No host sync and static shapes per step layout: the kernel is captured in the step's CUDA graph.

Output rows that belong to no sequence (packing padding) are left as torch.empty left them; every later
op of the layer is row-local and their outputs are never read (workers.step_layout).

Needs Triton (it ships with CUDA builds of torch); on the CPU it runs only under Triton's interpreter
(TRITON_INTERPRET=1 before Triton is first imported: tests/conftest.py), which
tests/workers/test_attention_paged.py uses to check it against StepAttention. Selected with
ModelRunner(attention="paged") (issue "CUDA fast path").

Context splits (flash-decoding, `context_splits`): when the grid has fewer programs than the GPU has
SMs (a few sequences with long contexts: an editor's completion in a large file), each sequence's
context is cut into S parts run by programs of their own; each writes its normalised output and
log-sum-exp in float32, and a second kernel (merge_splits) merges them exactly:
    lse = logsumexp_s(lse_s),  out = sum_s exp(lse_s - lse) * out_s
The first split also takes the step's own tokens and writes the K/V.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from workers.kv_cache import PagedKVCache


BLOCK_N = 32  # keys per tile
NUM_WARPS = 4  # per program (Triton's default); bench/gpu_check_attention.py sweeps both on a GPU
ROWS_PER_TILE = 64  # most folded (query x head) rows per program; tl.dot needs at least 16
MIN_SPLIT_KEYS = 256  # fewest context keys per split (context_splits)
MAX_SPLITS = 16
MERGE_ROWS = 16  # (token, query head) rows per program of the splits' merge
CPU_TARGET_PROGRAMS = 1  # the interpreter runs programs one by one: no split unless a test asks for one


def unavailable_reason(device: torch.device) -> str | None:
    """Why the paged kernel cannot run on `device`, or None when it can: it needs Triton, and on a device
    other than CUDA Triton's interpreter (TRITON_INTERPRET=1 set before Triton was first imported)."""
    if importlib.util.find_spec("triton") is None:
        return "needs Triton (it ships with CUDA builds of torch); install triton or use attention 'sdpa'"
    if device.type != "cuda" and not _interpreted():
        return (f"runs on CUDA; on {device.type} only under Triton's interpreter (TRITON_INTERPRET=1); "
                "use attention 'sdpa'")
    return None


def _interpreted() -> bool:
    """Whether Triton interprets the kernel (decided when Triton was first imported in this process)."""
    from workers.paged_kernel import paged_attention

    return type(paged_attention).__name__ == "InterpretedFunction"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tile_shape(max_query: int, heads_per_kv: int, head_dim: int, elem_bytes: int = 2) -> tuple[int, int, int]:
    """(BLOCK_Q, GROUP, BLOCK_D) for a step layout: GROUP = g rounded up to a power of two, BLOCK_D =
    head_dim rounded up to a power of two (at least 16), BLOCK_Q queries per program: a power of two,
    GROUP * BLOCK_Q folded rows, at least 16 (tl.dot) and at most what keeps the query tile within
    ROWS_PER_TILE rows of 128 bf16 values (fewer for float32 or a wider head: the kernel's shared memory
    grows with rows x BLOCK_D x element size, and float32 at 64 rows of 256 needed more than an A100
    has), unless one query's heads alone exceed that."""
    group, block_d = _pow2(heads_per_kv), max(16, _pow2(head_dim))
    rows = max(16, ROWS_PER_TILE * 128 * 2 // (block_d * elem_bytes))
    block_q = min(_pow2(max_query), max(1, rows // group))
    block_q = max(block_q, -(-16 // group))
    return block_q, group, block_d


def context_splits(programs: int, context_capacity: int, target_programs: int) -> tuple[int, int]:
    """(splits, keys per split) of the context (flash-decoding): with fewer programs than the device has
    room for (`target_programs`: its SM count on CUDA), each sequence's context is cut into up to
    MAX_SPLITS parts of at least MIN_SPLIT_KEYS keys (a multiple of BLOCK_N), run by programs of their
    own and merged through their log-sum-exps. Static per step layout (the capacity is the layout's
    max_blocks x block_size), so each layout keeps one kernel shape under its CUDA graph; a sequence
    shorter than the capacity leaves its last splits empty (log-sum-exp -inf, weight 0)."""
    if programs >= target_programs or context_capacity < 2 * max(1, MIN_SPLIT_KEYS):
        return 1, context_capacity
    splits = max(1, min(-(-target_programs // max(1, programs)), context_capacity // MIN_SPLIT_KEYS, MAX_SPLITS))
    per_split = -(-(-(-context_capacity // splits)) // BLOCK_N) * BLOCK_N  # whole key tiles
    return -(-context_capacity // per_split), per_split  # rounding up may leave fewer splits: none is always empty


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class PagedStepAttention:
    """Same contract as workers.attention.StepAttention: built once per step (nothing to derive: the
    kernel reads the packed arrays), `__call__(layer, q, k, v)` per layer."""

    def __init__(self, kv: PagedKVCache, arrays, layout, heads_per_kv: int):
        """arrays: workers.step.StepArrays (device views of the packed buffer); layout: StepLayout. Where
        the kernel cannot run (unavailable_reason) the runner refuses the backend when it is built
        (workers.runner), so nothing is checked here, per step."""
        from workers.paged_kernel import merge_splits, paged_attention

        self.kernel, self.merge, self.kv, self.a, self.g = paged_attention, merge_splits, kv, arrays, heads_per_kv
        self.b, self.q, self.page, self.nb = layout.num_seqs, layout.max_query, layout.block_size, layout.max_blocks
        self.hkv = kv.k[0].shape[2]
        self.tiles = tile_shape(self.q, heads_per_kv, kv.k[0].shape[3], kv.k[0].element_size())
        programs = self.b * self.hkv * -(-self.q // self.tiles[0])
        dev = arrays.token_ids.device
        target = _sm_count(dev) if dev.type == "cuda" else CPU_TARGET_PROGRAMS
        self.splits, self.split_len = context_splits(programs, self.nb * self.page, target)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) -> attention output [T, Hq, D] in q's dtype; writes
        the K/V of every sequence's query rows to their slots. With context splits the kernel writes float32
        partial outputs [S, T, Hq, D] and log-sum-exps [S, T, Hq], which a second kernel merges into the
        output (workers.paged_kernel.merge_splits): two launches per layer, where the same merge in torch
        was six ops (logsumexp, sub, exp, mul, sum, cast; logsumexp alone is several kernels on CUDA)."""
        a, d, splits = self.a, k.shape[2], self.splits
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kc, vc = self.kv.flat_k(layer), self.kv.flat_v(layer)  # [slots, Hkv, D], contiguous
        t, hq = q.shape[0], q.shape[1]
        out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
        parts = torch.empty((splits, t, hq, d), dtype=torch.float32, device=q.device) if splits > 1 else out
        lse = torch.empty((splits, t, hq), dtype=torch.float32, device=q.device) if splits > 1 else out
        block_q, group, block_d = self.tiles
        grid = (self.b, self.hkv, -(-self.q // block_q) * splits)
        self.kernel[grid](
            q, k, v, kc, vc, out, parts, lse, a.slot_mapping, a.query_start, a.query_len, a.context_len,
            a.block_tables, a.branch_start, d ** -0.5, self.nb, self.split_len,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kc.stride(0), kc.stride(1), out.stride(0), out.stride(1), t * hq * d, t * hq, hq,
            HEADS_PER_KV=self.g, GROUP=group, BLOCK_Q=block_q, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
            PAGE=self.page, SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=NUM_WARPS)
        if splits > 1:  # rows of no sequence hold garbage, never read
            rows = t * hq
            self.merge[(-(-rows // MERGE_ROWS),)](parts, lse, out, rows, parts.stride(0), lse.stride(0), SPLITS=splits,
                                                  HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=MERGE_ROWS, num_warps=NUM_WARPS)
        return out
