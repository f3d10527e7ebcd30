"""What a ModelRunner runs with, resolved from its constructor options: the device and dtype
(`device_and_dtype`, `DTYPES`) and the step function (`step_function`: the attention backend of
`ATTENTION`, the layer kernels, CUDA graphs or none). Each bad option is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from workers.attention import StepAttention
from workers.attention_flex import FlexStepAttention
from workers.attention_paged import PagedStepAttention, unavailable_reason
from workers.graphs import GraphPolicy, StepGraphs
from workers.kv_blocks import DEFAULT_BLOCK_SIZE, FLEX_BLOCK_SIZES, flex_tileable
from workers.layer_kernels import compiled_kernels
from workers.step import step_forward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ATTENTION = {"sdpa": StepAttention, "flex": FlexStepAttention, "paged": PagedStepAttention}


def device_and_dtype(device: str | None, dtype: torch.dtype | str | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: cuda when available, else cpu; bfloat16 on cuda, float32 on cpu. dtype may be a name. A
    device other than cpu or cuda (whose name torch may not even know: "tpu") is a ValueError."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # torch's "Expected one of cpu, cuda, ... device type at start of device string"
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the runner runs on cpu or cuda (cuda:N for the Nth GPU)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.removeprefix("torch.")]
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def step_function(cuda_graphs: bool | dict, device: torch.device, attention: str = "sdpa",
                  compile_layers: bool = False, block_size: int = DEFAULT_BLOCK_SIZE):
    """step_forward with the chosen attention and layer kernels, under StepGraphs when cuda_graphs is set
    (True or GraphPolicy fields). Compiled flex attention on CUDA tiles the KV block (FlexStepAttention's
    BLOCK_N), so its block_size must be a power of two of at least 16 (Triton's tl.arange and tl.dot)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention: {attention!r} is not one of {sorted(ATTENTION)}")
    if attention == "flex" and device.type == "cuda" and not flex_tileable(block_size):
        raise ValueError(f"block_size: {block_size} with attention 'flex' on CUDA; its kernel tiles the KV block, "
                         f"which must then be {FLEX_BLOCK_SIZES}: change block_size, or use attention 'sdpa' or "
                         "'paged'")
    if attention == "paged" and unavailable_reason(device):
        raise ValueError(f"attention: 'paged' {unavailable_reason(device)}")
    if not isinstance(compile_layers, bool):
        raise ValueError(f"compile_layers: {compile_layers!r} is not true or false")
    step = functools.partial(step_forward, attention_cls=ATTENTION[attention],
                             kernels=compiled_kernels() if compile_layers else None)
    if cuda_graphs is False:  # a mapping, even {}, is a GraphPolicy: graphs on
        return step
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs: needs a CUDA device, the runner is on {device}; remove cuda_graphs")
    fields = cuda_graphs if isinstance(cuda_graphs, dict) else {}
    known = [f.name for f in dataclasses.fields(GraphPolicy)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"cuda_graphs.{unknown[0]}: unknown setting; known: {', '.join(known)}")
    policy = GraphPolicy(**fields)
    return StepGraphs(step, policy)
