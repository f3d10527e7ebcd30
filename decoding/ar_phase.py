"""The states of the AR decoder (decoding/ar.py): PREFILL -> DECODE -> FINISHED."""

from __future__ import annotations

from enum import Enum


class ARPhase(Enum):
    """PREFILL: prompt chunks are fed; DECODE: one token per forward; FINISHED: nothing more to run."""

    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"
