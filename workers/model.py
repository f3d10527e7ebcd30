"""The project's Qwen3 causal LM, written for packed forwards.

All query tokens of a step are one flat sequence of T rows ([T, hidden]); the model never sees a
batch dimension. Attention is delegated to a callable (workers.attention.StepAttention) that knows
which rows belong to which sequence, what each may see, and where K/V go in the paged cache. No
autograd context is set here: callers run steps under torch.inference_mode (workers.runner), and
torch.compile traces `hidden` and `logits` as plain code (workers.step).

Parameter names mirror the HF checkpoint ("model.layers.3.self_attn.q_proj.weight"), so weights load
with `load_state_dict(..., assign=True)` from a model built on the meta device.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from workers.layer_kernels import (EAGER_KERNELS, KERNELS_TO_COMPILE, RECOMPILE_LIMIT, LayerKernels, apply_rope,
                                   compiled_kernels, rms_norm, rope_cos_sin)
from workers.loader import ModelConfig

# The layer kernels are re-exported: tests, benchmarks and docs name them here (their home is
# workers/layer_kernels.py)
__all__ = ["EAGER_KERNELS", "KERNELS_TO_COMPILE", "RECOMPILE_LIMIT", "AttentionFn", "LayerKernels", "Qwen3",
           "build_model", "compiled_kernels", "random_model"]


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) -> attention output [T, Hq, D]."""


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """QKV projections, per-head q/k RMSNorm, RoPE; the attention itself is the backend's."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv_proj: nn.Linear | None = None  # q/k/v merged by Qwen3.fuse_projections (serving)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """Separate projections (training); merged ones run as `attention_inputs` (DecoderLayer.merged_forward)."""
        if self.qkv_proj is not None:
            raise RuntimeError("projections are merged (Qwen3.fuse_projections): DecoderLayer.merged_forward runs them")
        t, d, hq, hkv = x.shape[0], self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(t, hq, d))  # [T, Hq, D]
        k = self.k_norm(k.view(t, hkv, d))  # [T, Hkv, D]
        v = v.view(t, hkv, d)  # [T, Hkv, D]
        out = attend(self.layer, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # gate/up merged by Qwen3.fuse_projections (serving)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Separate projections (training); merged ones run in `attention_output_mlp`."""
        if self.gate_up_proj is not None:
            raise RuntimeError("projections are merged (Qwen3.fuse_projections): DecoderLayer.merged_forward runs them")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden], module by module (separate projections: training, checkpoint tests);
        merged ones run through `merged_forward`."""
        if self.self_attn.qkv_proj is not None:
            raise RuntimeError("projections are merged (Qwen3.fuse_projections): DecoderLayer.merged_forward runs them")
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def merged_forward(self, x: torch.Tensor, delta: torch.Tensor | None, cos, sin, attend: AttentionFn,
                       kernels: LayerKernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged projections (Qwen3.fuse_projections: serving), the work around attention as two `kernels`
        calls (EAGER_KERNELS unless given compiled ones). The residual stream crosses the layer boundary
        unadded, as vLLM's fused add + RMSNorm does: x [T, hidden] is the residual stream and delta
        [T, hidden] (None before the first layer) the previous layer's MLP output, added here in the same
        kernel as the input RMSNorm. Returns this layer's (residual stream, MLP output); their sum is the
        layer's output, which `forward` returns."""
        attn, mlp, cfg = self.self_attn, self.mlp, self.self_attn.cfg
        kernels = kernels or EAGER_KERNELS
        weights = (self.input_layernorm.weight, attn.qkv_proj.weight, attn.q_norm.weight, attn.k_norm.weight)
        rest = (cos, sin, cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads)
        if delta is None:
            q, k, v, x = kernels.first_attention_inputs(x, *weights, *rest)
        else:
            q, k, v, x = kernels.attention_inputs(x, delta, *weights, *rest)
        out = attend(attn.layer, q, k, v)  # [T, Hq, D]
        return kernels.attention_output_mlp(x, out.reshape(x.shape[0], -1), attn.o_proj.weight,
                                            self.post_attention_layernorm.weight, mlp.gate_up_proj.weight,
                                            mlp.down_proj.weight, cfg.rms_norm_eps)


class Backbone(nn.Module):
    """Embeddings, decoder layers, final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3(nn.Module):
    """Qwen3ForCausalLM over packed rows. `hidden()` runs every row; `logits()` only the rows asked for."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Serving: merge each layer's q/k/v weights into one qkv_proj and gate/up into one gate_up_proj
        (one GEMM instead of three and two: fewer launches, larger tiles at small batch). The separate
        weights are dropped, so memory stays the same; state_dict names change, so training and
        checkpoint writing use the unfused model. Idempotent."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is not None:  # fused already (a second runner over the same model)
                continue
            attn.qkv_proj = _merged(attn.q_proj, attn.k_proj, attn.v_proj)
            mlp.gate_up_proj = _merged(mlp.gate_proj, mlp.up_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj

    def unfused_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the checkpoint's names whether or not the projections are fused: fused
        weights appear as row slices (views, no copy) named q_proj/k_proj/v_proj and gate_proj/up_proj."""
        state = dict(self.state_dict())
        cfg, d = self.cfg, self.cfg.head_dim
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}."
            if layer.self_attn.qkv_proj is not None:
                q, k, v = state.pop(prefix + "self_attn.qkv_proj.weight").split(
                    (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d))
                state.update({prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                              prefix + "self_attn.v_proj.weight": v})
            if layer.mlp.gate_up_proj is not None:
                gate, up = state.pop(prefix + "mlp.gate_up_proj.weight").chunk(2)
                state.update({prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up})
        return state

    def hidden(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn,
               kernels: LayerKernels | None = None) -> torch.Tensor:
        """token_ids, positions [T] -> last hidden states [T, hidden] before the final norm. kernels: the
        per-layer functions around attention (DecoderLayer.merged_forward); default EAGER_KERNELS. Merged
        projections carry each layer's MLP output into the next layer's first kernel; the last one is
        added here."""
        x = self.model.embed_tokens(token_ids)  # [T, H]
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if self.model.layers[0].self_attn.qkv_proj is None:  # unmerged (training, checkpoint tests)
            for layer in self.model.layers:
                x = layer(x, cos, sin, attend)
            return x
        delta = None
        for layer in self.model.layers:
            x, delta = layer.merged_forward(x, delta, cos, sin, attend, kernels)
        return x + delta

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """hidden rows [R, H] -> float32 logits [R, vocab] (final norm + LM head on those rows only)."""
        return self.lm_head(self.model.norm(hidden_rows)).float()


def _merged(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output rows are the given Linears' rows, in order."""
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    merged = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    merged.weight = nn.Parameter(weight, requires_grad=False)
    return merged


def build_model(cfg: ModelConfig, weights: dict, *, dtype, device) -> Qwen3:
    """A Qwen3 holding `weights` (names as in the checkpoint) without allocating any other memory."""
    with torch.device("meta"):
        model = Qwen3(cfg)
    if cfg.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def random_model(cfg: ModelConfig, *, dtype, device, seed: int = 0, std: float = 0.02) -> Qwen3:
    """A random-weight Qwen3 allocated directly on `device` in `dtype` (benchmarks; an 8B shape in bf16
    never touches host memory). Linear/embedding weights ~ N(0, std), norm weights 1."""
    with torch.device("meta"):
        model = Qwen3(cfg).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)
    model.tie_weights()
    return model.eval()
