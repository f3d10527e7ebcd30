"""The attention part of bench/gpu_check.py: one layer's attention alone, per backend, at the step shapes
the engine runs, so that a GPU session learns what the paged kernel gains over the gather + SDPA path
and which of its tile settings to keep, without the rest of the forward in the way.

Per case (sequences n, query tokens q per sequence, cached tokens per sequence): one layer of the model's
attention shape (bench.cfg: on CUDA the 8B one, 32 query and 8 KV heads of 128) over a paged cache of
random K/V with every sequence's blocks its own, a packed step built as the runner builds it
(workers.packing.pack_step, padded), random q/k/v. Timed on CUDA as the engine runs a step: REPLAYS
calls captured in one CUDA graph (launch gaps included, host launch cost excluded), per call the median
of ROUNDS replays; on the CPU by the clock (a dry run: the numbers say nothing about a GPU). Backends:
`sdpa` (workers.attention.StepAttention) and, where it can run, `paged` (workers.attention_paged) at
each (BLOCK_N, num_warps) of PAGED_SETTINGS on CUDA; the row names the fastest setting and the largest
difference of the paged output from sdpa's over the real rows (in the model's dtype: bf16 on CUDA).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from gpu_check_parts import Row, Workbench
from workers import attention_paged
from workers.attention import StepAttention
from workers.attention_paged import PagedStepAttention, unavailable_reason
from workers.batch import Reads, Segment
from workers.kv_blocks import DEFAULT_BLOCK_SIZE
from workers.kv_cache import PagedKVCache
from workers.packing import pack_step
from workers.step import step_arrays

# (sequences, query tokens each, cached tokens each): AR decode at 1/8/32 requests, one request in a long
# file (context splits), a ReFusion block (32 query tokens) alone and beside 7 others
CASES = {"cuda": [(1, 1, 256), (1, 1, 4096), (8, 1, 1024), (32, 1, 1024), (1, 32, 1024), (8, 32, 1024)],
         "cpu": [(1, 1, 64), (2, 8, 32)]}
PAGED_SETTINGS = [(32, 4), (64, 4), (64, 8)]  # (BLOCK_N, num_warps) tried on CUDA
REPLAYS, ROUNDS = 20, 5


def part_attention(bench: Workbench) -> tuple[dict, list[Row]]:
    cfg, device, dtype = bench.cfg, bench.device, bench.dtype
    cuda = device.type == "cuda"
    paged_reason = unavailable_reason(device)
    settings = PAGED_SETTINGS if cuda else [(attention_paged.BLOCK_N, attention_paged.NUM_WARPS)]
    results, rows = {"block_size": DEFAULT_BLOCK_SIZE, "cases": []}, []
    for n, q, context in CASES["cuda" if cuda else "cpu"]:
        if bench.time_left() <= 0:
            rows.append(Row(f"attention, {n} x {q} tokens after {context}", "skipped: --budget-s spent"))
            continue
        kv, arrays, layout, (qt, kt, vt) = _step(cfg, device, dtype, n, q, context)
        heads_per_kv = cfg.num_heads // cfg.num_kv_heads
        case = {"sequences": n, "query_tokens": q, "context": context, "us": {}}
        case["us"]["sdpa"] = _time_us(StepAttention(kv, arrays, layout, heads_per_kv), qt, kt, vt, cuda)
        if paged_reason is None:
            for block_n, warps in settings:
                saved = attention_paged.BLOCK_N, attention_paged.NUM_WARPS
                attention_paged.BLOCK_N, attention_paged.NUM_WARPS = block_n, warps
                try:
                    attend = PagedStepAttention(kv, arrays, layout, heads_per_kv)
                    if "max_abs_diff" not in case:  # once per case: the settings change speed, not values
                        case["paged_splits"] = attend.splits
                        case["max_abs_diff"] = _max_diff(StepAttention(kv, arrays, layout, heads_per_kv),
                                                         attend, qt, kt, vt, n * q)
                    case["us"][f"paged {block_n}/{warps}"] = _time_us(attend, qt, kt, vt, cuda)
                finally:
                    attention_paged.BLOCK_N, attention_paged.NUM_WARPS = saved
        results["cases"].append(case)
        sdpa = case["us"]["sdpa"]
        paged = {k: v for k, v in case["us"].items() if k.startswith("paged")}
        text = f"sdpa {sdpa:.1f} us"
        if paged:
            best = min(paged, key=paged.get)
            text += (f"; {best} (BLOCK_N/warps, {case['paged_splits']} context split(s)) {paged[best]:.1f} us"
                     f" = {sdpa / paged[best]:.2f}x faster, max |paged - sdpa| {case['max_abs_diff']:.2g}; all paged: "
                     + ", ".join(f"{k.split()[1]} {v:.1f}" for k, v in paged.items()))
        else:
            text += f"; paged skipped: {paged_reason}"
        rows.append(Row(f"attention per layer, {n} seq x {q} tokens after {context}", text))
        del kv, arrays
    if cuda:
        torch.cuda.empty_cache()
    return results, rows


def _step(cfg, device, dtype, n: int, q: int, context: int):
    """A one-layer paged cache of random K/V, a packed step of n sequences (each its own blocks, every
    query row kept and argmax-read) on the device, and random q/k/v for its packed rows."""
    per_seq = -(-(context + q) // DEFAULT_BLOCK_SIZE)
    one_layer = dataclasses.replace(cfg, num_layers=1)
    kv = PagedKVCache(one_layer, n * per_seq + 1, DEFAULT_BLOCK_SIZE, dtype, device)  # + the scratch block
    kv.k[0].normal_()
    kv.v[0].normal_()
    segments = [Segment(f"s{i}", context, [0] * q, list(range(context, context + q)), q, Reads(argmax=tuple(range(q))))
                for i in range(n)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
    step = pack_step(segments, tables, DEFAULT_BLOCK_SIZE, n * per_seq)
    arrays = step_arrays(torch.from_numpy(step.buffer).to(device), step.layout)
    t = step.layout.num_tokens
    qkv = (torch.randn(t, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device),
           torch.randn(t, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device),
           torch.randn(t, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device))
    return kv, arrays, step.layout, qkv


def _max_diff(reference, attend, q, k, v, rows: int) -> float:
    """Largest absolute difference of the two backends' outputs over the step's real rows (the packed
    rows of the sequences; padding rows after them are never read)."""
    with torch.inference_mode():
        return (attend(0, q, k, v)[:rows].float() - reference(0, q, k, v)[:rows].float()).abs().max().item()


def _time_us(attend, q, k, v, cuda: bool) -> float:
    """Median microseconds per call of `attend(0, q, k, v)` (module docstring)."""
    with torch.inference_mode():
        for _ in range(2):  # compiles (Triton), selects kernels (cuDNN)
            attend(0, q, k, v)
        if not cuda:
            times = []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                attend(0, q, k, v)
                times.append((time.perf_counter() - start) * 1e6)
            return statistics.median(times)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPLAYS):
                attend(0, q, k, v)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(ROUNDS):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / REPLAYS)
        del graph
        return statistics.median(times)
