"""The device half of an engine step, as one function: `step_forward(model, kv, buffer, layout)`.

    buffer  [layout.size] int64 on the device: the packed step (workers.packing), one upload
    layout  workers.step_layout.StepLayout: every shape and flag, static per bucket
    returns values [2, R] float64 (token ids, probabilities; [4 + 2K, R] with layout.logprobs: workers.reads),
            logits [R, V] float32, and the kept logits [D, V] float32 of the deferred read rows
            (layout.deferred_reads: their reads are made later, by ModelRunner.finish_reads)

Between the input copy and the output copy nothing waits for the host (style rule 12): the arrays are
views of the buffer, attention is workers.attention.StepAttention, the reads workers.reads. The
function runs eagerly in the runner and compiles with torch.compile(fullgraph=True)
(tests/workers/test_step_compile.py), which is what a per-bucket CUDA graph capture needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.attention import StepAttention
from workers.kv_cache import PagedKVCache
from workers.reads import ReadParams, apply_token_bitmask, compute_reads
from workers.step_layout import FLOAT_FIELDS, READ_FIELDS, StepLayout


class StepArrays(NamedTuple):
    """Device views of the packed buffer (field meanings: workers.step_layout)."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    seq_index: torch.Tensor  # [T]
    query_index: torch.Tensor  # [T]
    branch_start: torch.Tensor  # [T]
    query_start: torch.Tensor  # [B]
    query_len: torch.Tensor  # [B]
    context_len: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, NB]
    read_rows: torch.Tensor  # [R]
    reads: ReadParams  # each [R]
    token_bitmask: torch.Tensor  # [R, W] int64 (W = layout.mask_words; [R, 0] when no row is constrained)
    bias_ids: torch.Tensor  # [R, L] int64 (L = layout.bias_width; [R, 0] when no segment has a logit bias)
    bias_values: torch.Tensor  # [R, L] float64
    deferred_rows: torch.Tensor  # [D] read rows whose logits are kept (D = layout.deferred_reads, may be 0)
    group_seqs: torch.Tensor  # [B] sequences in attention-group order ([0] without layout.attention_groups)


def step_arrays(buffer: torch.Tensor, layout: StepLayout) -> StepArrays:
    """Slice the packed buffer into named views (float fields bit-cast to float64)."""
    views = {}
    for name, (start, end) in layout.offsets().items():
        view = buffer[start:end]
        views[name] = view.view(torch.float64) if name in FLOAT_FIELDS else view
    del views["bias_kind"], views["bias_penalty"]  # (the runner's, for fed-back tokens: ModelRunner.launch)
    views["block_tables"] = views["block_tables"].view(layout.num_seqs, layout.max_blocks)
    views["token_bitmask"] = views["token_bitmask"].view(layout.num_reads, layout.mask_words)
    for name in ("bias_ids", "bias_values"):
        views[name] = views[name].view(layout.num_reads, layout.bias_width)
    reads = ReadParams(**{("position" if f == "read_position" else f): views.pop(f)
                          for f in READ_FIELDS if f != "read_rows"})
    return StepArrays(reads=reads, **views)


def step_forward(model, kv: PagedKVCache, buffer: torch.Tensor, layout: StepLayout,
                 attention_cls=StepAttention, kernels=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed step on the device: forward of every token, K/V written to their slots, reads of
    every read row. model: workers.model.Qwen3 (or anything with cfg, hidden(), logits()).
    attention_cls: StepAttention (gathers context; portable) or workers.attention_flex.FlexStepAttention
    (reads the paged cache in place). kernels: workers.layer_kernels.LayerKernels for the work around attention
    (None: eager; workers.layer_kernels.compiled_kernels(): fused by torch.compile). Returns (values [2, R]
    float64, or [4 + 2K, R] with layout.logprobs; logits [R, V] float32; kept logits [D, V] float32: the
    deferred rows' logits before any bitmask, whose values rows hold unconstrained reads until
    ModelRunner.finish_reads replaces them); R == 0 skips the LM head."""
    a = step_arrays(buffer, layout)
    cfg = model.cfg
    attention = attention_cls(kv, a, layout, cfg.num_heads // cfg.num_kv_heads)
    hidden = model.hidden(a.token_ids, a.positions, attention, kernels)  # [T, hidden]
    if layout.num_reads == 0:
        empty = torch.empty((0, cfg.vocab_size), dtype=torch.float32, device=buffer.device)
        return torch.empty((2, 0), dtype=torch.float64, device=buffer.device), empty, empty
    logits = model.logits(hidden.index_select(0, a.read_rows))  # [R, V] float32
    kept = logits.index_select(0, a.deferred_rows)  # [D, V] (D = 0: empty)
    if layout.mask_words:  # grammar-constrained rows (Segment.token_bitmask)
        logits = apply_token_bitmask(logits, a.token_bitmask)
    bias = (a.bias_ids, a.bias_values) if layout.bias_width else None
    return compute_reads(logits, a.reads, layout.needs_noise, layout.needs_sort, layout.logprobs, bias,
                         layout.ranks), logits, kept
