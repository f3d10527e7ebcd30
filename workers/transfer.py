"""The one host -> device copy of a step: its packed int64 buffer (workers.packing).

On CUDA the buffer is staged in pinned host memory and copied with non_blocking=True, so the host
never waits for the GPU stream here; the step's one device -> host copy of its results is the only
wait. The pinned staging buffer is reused; an event recorded after each copy guards it (normally
already complete, because the previous step's results came back to the host before this step was
packed; it matters only after a step that failed between its upload and its results).
On CPU the device tensor is a zero-copy view of the numpy buffer.
"""

from __future__ import annotations

import numpy as np
import torch


class StepUploader:
    """Copies packed step buffers to `device` (one transfer per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pinned: torch.Tensor | None = None  # [capacity] int64, pinned (CUDA only)
        self._copied: torch.cuda.Event | None = None  # recorded after the last copy out of _pinned

    def upload(self, buffer: np.ndarray) -> torch.Tensor:
        """buffer [N] int64 on the host -> [N] int64 on the device (no host sync)."""
        host = torch.from_numpy(buffer)
        if self.device.type != "cuda":
            return host
        n = host.numel()
        if self._copied is not None:
            self._copied.synchronize()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 2 * (0 if self._pinned is None else self._pinned.numel())),
                                       dtype=torch.int64, pin_memory=True)
        staged = self._pinned[:n]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out
