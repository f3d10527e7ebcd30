"""What the compiled layer functions launch on a CUDA GPU, found without one: inductor lowers
workers.layer_kernels.KERNELS_TO_COMPILE (what `compile_layers` compiles) for an sm_90 GPU on fake CUDA tensors,
and this prints the device work of each function's generated wrapper: Triton kernels, cuBLAS GEMMs, and
addmm calls (a GEMM whose [T, hidden] input ATen first copies into the output: one more launch).

    python bench/layer_kernels.py                      # 8B shape, 1 and 128 tokens
    python bench/layer_kernels.py --config small --tokens 16 --json out.json

Launch counts are what the wrapper calls; cuBLAS may add a split-K reduce kernel to a GEMM at run time
(the H200 profile's `splitKreduce_kernel`), which only a GPU shows. Shapes are static here (compile_layers
compiles them with a symbolic token count; the kernels are the same functions of it).

How, without a GPU: a CPU build of torch makes CUDA tensors under FakeTensorMode; the few questions
inductor asks the device (capability, SM count, Triton's target) get an H100/H200's answers, patched in
this process only. Uses inductor's internals (GraphLowering, post_grad_passes) as torch 2.13 has them;
run it in a process of its own (tests/workers/test_layer_compile.py does): the patches are never undone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_args import positive_ints, writable_file  # noqa: E402
from bench.forward_latency import CONFIGS  # noqa: E402
from workers.layer_kernels import KERNELS_TO_COMPILE  # noqa: E402

H200 = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, warp_size=32,
                             total_memory=141 * 2**30, regs_per_multiprocessor=65536,
                             max_threads_per_multi_processor=2048, shared_memory_per_block_optin=232448,
                             L2_cache_size=50 * 2**20, gcnArchName="")


def pretend_h200() -> None:
    """Answer inductor's device questions as an H200 would (this process only; never undone)."""
    import torch.utils._triton as torch_triton
    from triton.backends.compiler import GPUTarget

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda *args, **kwargs: H200
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    backend = types.SimpleNamespace(target=GPUTarget("cuda", 90, 32), hash=lambda: "h200")
    torch_triton.triton_backend = lambda: backend
    torch_triton.triton_hash_with_backend = lambda: "h200"


def cuda_launches(fn, shapes: list[tuple[int, ...]], *scalars, dtype=torch.bfloat16) -> list[str]:
    """The device calls of inductor's CUDA wrapper for fn(*tensors of `shapes`, *scalars), in order:
    "triton <kernel name>", "mm", "addmm", ... (extern kernels by their ATen name)."""
    from torch._inductor.debug import DebugContext
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    fake = FakeTensorMode()
    with fake:
        tensors = [torch.empty(shape, dtype=dtype, device="cuda") for shape in shapes]
        graph = make_fx(lambda *t: fn(*t, *scalars), decomposition_table=select_decomp_table())(*tensors)
    with V.set_fake_mode(fake), fake:
        post_grad_passes(graph, True)
        lowering = GraphLowering(graph, example_inputs=tensors, shape_env=None)
        with V.set_graph_handler(lowering), V.set_debug_handler(DebugContext()):
            lowering.run(*tensors)
            code = lowering.codegen()
    source = code[0] if isinstance(code, tuple) else code
    source = getattr(source, "value", source)
    body = source[source.index("def call("):]
    calls = []
    for line in body.splitlines():
        if found := re.search(r"extern_kernels\.(\w+)\(", line):
            calls.append(found.group(1))
        elif found := re.search(r"(triton_\w+)\.run\(", line):
            calls.append(f"triton {found.group(1)}")
    return calls


def layer_functions(cfg, tokens: int) -> dict[str, tuple]:
    """name -> (function, tensor shapes, scalars) for the compiled functions at `tokens` query tokens."""
    t, h, d, hq, hkv, inter = (tokens, cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                               cfg.intermediate_size)
    inputs = [(h,), ((hq + 2 * hkv) * d, h), (d,), (d,), (t, d), (t, d)]
    return {
        "first_attention_inputs": (KERNELS_TO_COMPILE.first_attention_inputs, [(t, h)] + inputs,
                                   (cfg.rms_norm_eps, hq, hkv)),
        "attention_inputs": (KERNELS_TO_COMPILE.attention_inputs, [(t, h), (t, h)] + inputs,
                             (cfg.rms_norm_eps, hq, hkv)),
        "attention_output_mlp": (KERNELS_TO_COMPILE.attention_output_mlp,
                                 [(t, h), (t, hq * d), (h, hq * d), (h,), (2 * inter, h), (h, inter)],
                                 (cfg.rms_norm_eps,)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="8b")
    parser.add_argument("--tokens", type=positive_ints, default=[1, 128], help="query tokens, comma-separated")
    parser.add_argument("--json", type=writable_file, help="also write the rows here")
    args = parser.parse_args(argv)
    pretend_h200()
    rows = []
    for tokens in args.tokens:
        for name, (fn, shapes, scalars) in layer_functions(CONFIGS[args.config], tokens).items():
            calls = cuda_launches(fn, shapes, *scalars)
            gemms = sum(not c.startswith("triton") for c in calls)
            addmm = calls.count("addmm")
            rows.append({"function": name, "tokens": tokens, "calls": calls, "triton": len(calls) - gemms,
                         "gemms": gemms, "addmm": addmm, "launches": len(calls) + addmm})
    print(f"torch {torch.__version__}, config {args.config}, bf16, inductor's CUDA wrapper for sm_90 (no GPU)\n")
    print("| function | tokens | Triton kernels | GEMMs | of them addmm (+1 copy each) | launches |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['function']} | {r['tokens']} | {r['triton']} | {r['gemms']} | {r['addmm']} | {r['launches']} |")
    for r in rows:
        print(f"\n{r['function']}, {r['tokens']} tokens: " + ", ".join(r["calls"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
