"""The states of the AR decoder (decoding/ar.py): PREFILL -> DECODE -> FINISHED."""

from __future__ import annotations

from enum import Enum


class ARPhase(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"
