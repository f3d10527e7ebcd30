"""The per-layer math of workers/model.py outside attention: RMSNorm, RoPE, and a decoder layer's work
around attention as plain functions over merged weights (attention_inputs before it, attention_output_mlp
after it), eager or under torch.compile (compiled_kernels: inductor fuses the element-wise work into a few
kernels per layer). Tensors are packed rows: [T, hidden], heads [T, H, D]; docs/architecture.md,
"Fused work per layer", says why the functions are cut where they are."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] / rms(x) * weight [N]; the normalisation in float32, as HF Qwen3RMSNorm."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for logical positions [T] (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, D]."""
    first, second = x.chunk(2, dim=-1)  # (split and unsqueeze, not indexing: a test traces this on fake
    rotated = torch.cat((-second, first), dim=-1)  # CUDA tensors, where indexing needs a CUDA build)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def attention_inputs(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, qkv_weight: torch.Tensor,
                     q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float, num_heads: int, num_kv_heads: int):
    """Everything of a layer before attention, merged projections: the residual add of the previous layer's
    MLP output (delta, None at the first layer), input RMSNorm, one QKV GEMM (qkv_weight
    [(Hq + 2 Hkv) * D, hidden]), per-head q/k RMSNorm, RoPE (cos/sin [T, D]).
    x, delta [T, hidden] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] and the residual stream x + delta
    [T, hidden] (HF Qwen3DecoderLayer's and Qwen3Attention's order of operations). q and k are normed and
    rotated as one [T, Hq + Hkv, D] tensor, each head with its weight (q_norm's or k_norm's), so inductor
    makes one kernel of both (two when apart, on CUDA); they come back as views of it (row stride
    (Hq + Hkv) * D), v as a view of the GEMM's output."""
    if delta is not None:
        x = x + delta
    t, d = x.shape[0], q_norm_weight.shape[0]
    qk, v = F.linear(rms_norm(x, norm_weight, eps), qkv_weight).split(
        ((num_heads + num_kv_heads) * d, num_kv_heads * d), dim=-1)
    head_weights = torch.cat((q_norm_weight.expand(num_heads, d), k_norm_weight.expand(num_kv_heads, d)))
    qk = apply_rope(rms_norm(qk.view(t, num_heads + num_kv_heads, d), head_weights, eps), cos, sin)
    q, k = qk.split((num_heads, num_kv_heads), dim=1)
    return q, k, v.view(t, num_kv_heads, d), x


def first_attention_inputs(x: torch.Tensor, norm_weight: torch.Tensor, qkv_weight: torch.Tensor,
                           q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, eps: float, num_heads: int, num_kv_heads: int):
    """attention_inputs of the first layer, which has no previous MLP output to add. A function of its own
    so that its compile keeps its own dynamo cache: dynamo counts recompiles per function, and a
    `delta is None` guard would spend two of attention_inputs' entries per dtype, where fullgraph=True
    makes passing torch._dynamo's recompile_limit (8) an error, not a fallback."""
    return attention_inputs(x, None, norm_weight, qkv_weight, q_norm_weight, k_norm_weight, cos, sin, eps,
                            num_heads, num_kv_heads)


def attention_output_mlp(x: torch.Tensor, attn_out: torch.Tensor, o_weight: torch.Tensor, norm_weight: torch.Tensor,
                         gate_up_weight: torch.Tensor, down_weight: torch.Tensor, eps: float,
                         float32_add: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of a layer after attention: o_proj and the residual add, post-attention RMSNorm, SwiGLU
    on one gate/up GEMM (gate_up_weight [2 * intermediate, hidden]) and down_proj, whose residual add is
    left to the next layer's attention_inputs (or Qwen3.hidden after the last layer), so it shares that
    layer's RMSNorm kernel. x [T, hidden], attn_out [T, Hq * D] -> (residual stream, MLP output), both
    [T, hidden]; the layer's output is their sum.

    float32_add (the compiled kernels): the o_proj residual add written in float32 and rounded back, the
    same values as the half-precision add (PyTorch adds bf16/fp16 in float32 and rounds once) but not
    inductor's `x + mm` pattern. On CUDA inductor turns that pattern into an addmm whose full [T, hidden]
    input cuBLAS needs copied into the output first (the "Memcpy DtoD" and beta-1 GEMMs of the H200
    profile, docs/benchmarks.md); written so, the add joins the RMSNorm kernel (bench/layer_kernels.py
    lists the launches; tests/workers/test_layer_compile.py runs it). Eager, it would be three more ops
    per layer, so EAGER_KERNELS keep the plain add."""
    o = F.linear(attn_out, o_weight)
    x = (o.float() + x.float()).to(x.dtype) if float32_add else x + o
    gate, up = F.linear(rms_norm(x, norm_weight, eps), gate_up_weight).chunk(2, dim=-1)
    return x, F.linear(F.silu(gate) * up, down_weight)


def compiled_attention_output_mlp(x: torch.Tensor, attn_out: torch.Tensor, o_weight: torch.Tensor,
                                  norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
                                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_output_mlp with float32_add, the form compiled_kernels compiles; a function of its own, not
    a functools.partial, because dynamo keeps a compiled partial's cache entries on a wrapper that every
    compiled partial shares."""
    return attention_output_mlp(x, attn_out, o_weight, norm_weight, gate_up_weight, down_weight, eps, float32_add=True)


class LayerKernels(NamedTuple):
    """The per-layer functions around attention (DecoderLayer.merged_forward), eager or compiled."""

    first_attention_inputs: Callable
    attention_inputs: Callable
    attention_output_mlp: Callable


EAGER_KERNELS = LayerKernels(first_attention_inputs, attention_inputs, attention_output_mlp)
KERNELS_TO_COMPILE = LayerKernels(first_attention_inputs, attention_inputs, compiled_attention_output_mlp)


RECOMPILE_LIMIT = 64  # compiled entries per function: (model shape, dtype) pairs in one process


@functools.cache
def compiled_kernels() -> LayerKernels:
    """KERNELS_TO_COMPILE (EAGER_KERNELS' functions, the o_proj residual add written for fusion) under
    torch.compile (fullgraph, dynamic token count): inductor fuses each RMSNorm
    with the residual add before it, the q/k norms with RoPE and SiLU with the gate/up product, leaving
    the GEMMs to the BLAS library: per layer a handful of kernels instead of ~40 small ones (the issue's
    "fused work per layer"; vLLM and SGLang fuse the same ops with custom kernels). One compile per
    process serves every layer and every runner (weights are arguments, not captured); the first steps
    pay the compile (seconds on a GPU machine). Packed steps have at least 16 tokens (workers.step_layout),
    so dynamo's specialisation of sizes 0 and 1 never applies; if the first token count equals a model
    dimension (hidden size, head dim) dynamo treats the two as one fixed size and compiles once more,
    symbolically, at the next count. Compiled functions capture in CUDA graphs (workers.graphs).

    Weights are parameters, whose shapes dynamo keeps static, so each model shape and dtype a process
    runs is one more compiled entry of each function; past torch._dynamo's recompile_limit (8) a
    fullgraph compile fails hard, which a process that builds runners for several models (tests/gpu, a
    benchmark) reached. The limit is raised to RECOMPILE_LIMIT (SGLang raises the same limits for its
    compiled model)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    compile = functools.partial(torch.compile, fullgraph=True, dynamic=True)
    return LayerKernels(*map(compile, KERNELS_TO_COMPILE))
