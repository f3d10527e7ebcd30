"""The paged KV tensors on the device and how many blocks fit in a memory budget.

The runner allocates the blocks a budget buys for the KV owner (`num_kv_blocks`) plus one scratch block
(index num_kv_blocks) that dropped query tokens and padding write into; the scratch block comes on top
of the budget.
"""

from __future__ import annotations

import torch

from workers.loader import ModelConfig

DEFAULT_CPU_KV_TOKENS = 16384  # CPU default: room for this many tokens ...
DEFAULT_CPU_KV_MAX_BYTES = 512 * 2**20  # ... but never more than this (tests build many runners)
DEFAULT_CUDA_KV_FRACTION = 0.5  # of the GPU memory free after loading weights


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def blocks_for_budget(cfg: ModelConfig, block_size: int, dtype, device: torch.device,
                      num_blocks: int | None, kv_memory_bytes: int | None) -> int:
    """Blocks for the KV owner: num_blocks if given, else as many blocks as kv_memory_bytes holds, else a device default
    (CUDA: half the free memory after weights; CPU: 16k tokens, at most 512 MiB)."""
    if num_blocks is not None and kv_memory_bytes is not None:
        raise ValueError("num_blocks and kv_memory_bytes: give at most one of them")
    if num_blocks is not None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        return int(num_blocks)
    per_block = bytes_per_block(cfg, block_size, dtype)
    if kv_memory_bytes is None:
        if device.type == "cuda":
            kv_memory_bytes = int(torch.cuda.mem_get_info(device)[0] * DEFAULT_CUDA_KV_FRACTION)
        else:
            kv_memory_bytes = min(DEFAULT_CPU_KV_MAX_BYTES, -(-DEFAULT_CPU_KV_TOKENS // block_size) * per_block)
    if kv_memory_bytes < per_block:
        raise ValueError(f"kv_memory_bytes {kv_memory_bytes} holds no block; one block needs {per_block} bytes")
    return int(kv_memory_bytes // per_block)


class PagedKVCache:
    """Per layer K and V, each [num_blocks, block_size, num_kv_heads, head_dim], on the device.

    Attention addresses tokens by flat slot = block * block_size + offset, through `flat_k(layer)`
    / `flat_v(layer)` views of shape [num_blocks * block_size, num_kv_heads, head_dim].
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device):
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self._flat = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)

    def flat_k(self, layer: int) -> torch.Tensor:
        return self.k[layer].view(self._flat)

    def flat_v(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(self._flat)
