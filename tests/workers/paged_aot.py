"""Compile workers/paged_kernel.py for NVIDIA GPUs without one: Triton lowers the kernel to PTX and
assembles it with the ptxas it bundles, which is everything a GPU's first step does except loading the
binary. Run as a script in a process without TRITON_INTERPRET (test_attention_paged.py does); prints
one line per compiled configuration, "ok <arch> <config> shared=<bytes>" ("over" when the kernel needs
more shared memory than that GPU gives a block), and exits non-zero on the first compile failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)

from triton import compile as triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from workers.attention_paged import BLOCK_N, MERGE_ROWS, NUM_WARPS, tile_shape  # noqa: E402
from workers.paged_kernel import merge_splits, paged_attention  # noqa: E402

STRIDES = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ct", "stride_ch",
           "stride_ot", "stride_oh", "stride_ps", "stride_ls", "stride_lt")
INDEX_ARRAYS = ("slot_ptr", "query_start_ptr", "query_len_ptr", "context_len_ptr", "tables_ptr", "branch_ptr")
# (dtype, max_query, heads per KV head, head_dim, block_size, splits): the 8B shape's decode (one split
# and sixteen), a ReFusion block and a 128-token prefill chunk; the shipped model's head ratio and
# head_dim; a head_dim that is no power of two; float32 (the IEEE dots) with small KV blocks
CONFIGS = [("bf16", 1, 4, 128, 16, 1), ("bf16", 1, 4, 128, 16, 16), ("bf16", 32, 4, 128, 16, 1),
           ("bf16", 128, 4, 128, 16, 4), ("fp16", 16, 2, 64, 16, 1), ("bf16", 8, 8, 80, 64, 2),
           ("fp32", 8, 2, 64, 4, 1), ("fp32", 64, 4, 128, 16, 1), ("fp32", 64, 1, 256, 16, 2),
           ("bf16", 64, 4, 256, 16, 1)]
# Shared memory a block may use (the opt-in maximum): an A100's and an H100/H200's. A kernel that compiles
# but needs more fails at launch; float32 at 64 rows of 256 did (205 KB) before tile_shape bounded it.
SHARED_LIMIT = {80: 166912, 90: 232448}


def compile_config(arch: int, dtype: str, max_query: int, heads_per_kv: int, head_dim: int, page: int, splits: int):
    block_q, group, block_d = tile_shape(max_query, heads_per_kv, head_dim, 4 if dtype == "fp32" else 2)
    constants = {"HEADS_PER_KV": heads_per_kv, "GROUP": group, "BLOCK_Q": block_q, "HEAD_DIM": head_dim,
                 "BLOCK_D": block_d, "BLOCK_N": BLOCK_N, "PAGE": page, "SPLITS": splits, "IEEE": dtype == "fp32"}
    signature = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "out_ptr")}
    signature |= {"part_ptr": "*fp32", "lse_ptr": "*fp32", **{name: "*i64" for name in INDEX_ARRAYS}}
    signature |= {"scale": "fp32", "max_blocks": "i32", "split_len": "i32", **{name: "i32" for name in STRIDES}}
    signature |= {name: "constexpr" for name in constants}
    names = paged_attention.arg_names
    assert sorted(names) == sorted(signature), set(names) ^ set(signature)
    source = ASTSource(fn=paged_attention, signature={n: signature[n] for n in names},
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton_compile(source, target=GPUTarget("cuda", arch, 32))

# merge_splits (dtype of the output, splits, head_dim): the 8B decode's 16 splits, a head_dim that is no
# power of two, float32 at 256
MERGE_CONFIGS = [("bf16", 16, 128), ("fp16", 3, 80), ("fp32", 2, 256)]


def compile_merge(arch: int, dtype: str, splits: int, head_dim: int):
    constants = {"SPLITS": splits, "HEAD_DIM": head_dim, "BLOCK_D": tile_shape(1, 1, head_dim)[2],
                 "BLOCK_R": MERGE_ROWS}
    signature = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dtype}", "rows": "i32", "stride_ps": "i32",
                 "stride_ls": "i32", **{name: "constexpr" for name in constants}}
    names = merge_splits.arg_names
    assert sorted(names) == sorted(signature), set(names) ^ set(signature)
    source = ASTSource(fn=merge_splits, signature={n: signature[n] for n in names},
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton_compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})


if __name__ == "__main__":
    for arch in (90, 80):  # H100/H200, A100
        for config in CONFIGS:
            if arch < 90 and config[0] == "bf16" and config[5] > 1:
                continue  # (the split path is the same code at every dtype; fewer compiles)
            shared = compile_config(arch, *config).metadata.shared
            print(f"{'ok' if shared <= SHARED_LIMIT[arch] else 'over'} sm_{arch} {config} shared={shared}", flush=True)
        for config in MERGE_CONFIGS:
            shared = compile_merge(arch, *config).metadata.shared
            print(f"{'ok' if shared <= SHARED_LIMIT[arch] else 'over'} sm_{arch} merge {config} shared={shared}",
                  flush=True)
