"""Host -> device copies that never stall the host.

`torch.tensor(values, device="cuda")` copies synchronously: the host waits for the GPU stream to
drain, so an index tensor built after launching a forward would wait for the whole forward. Building
on the host and copying with non_blocking=True from pageable memory stages the data immediately and
returns, keeping the one device -> host transfer per execute() as the only wait.
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D (or nested-list) tensor of `values` on `device`, copied without a host sync."""
    host = torch.tensor(values, dtype=dtype)
    return host if host.device == device else host.to(device, non_blocking=True)
