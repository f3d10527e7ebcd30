"""Start-up calibration: forward latency as a function of packed query tokens on the actual device."""

from __future__ import annotations

import time

from scheduler.routing import CostCurve
from workers.batch import Reads, Segment

CALIBRATION_SEQ = "__engine_calibration__"


def calibrate(runner, token_counts: tuple[int, ...], repeats: int = 2, max_tokens: int | None = None) -> CostCurve:
    """Time runner.execute on a scratch sequence for each packed-token count (minimum of `repeats`
    runs after one warm-up). The scratch step keeps no KV, so it needs no blocks (empty block table).

    Counts above `max_tokens` (the engine's token budget) are clipped: the engine never packs more.
    """
    counts = sorted({min(n, max_tokens or n) for n in token_counts})
    filler = max(0, int(runner.info.mask_token_id))
    points: list[tuple[int, float]] = []
    runner.execute([_scratch_segment(counts[0], filler)], [[]])  # warm-up (allocations, kernels)
    for n in counts:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            runner.execute([_scratch_segment(n, filler)], [[]])
            best = min(best, time.perf_counter() - start)
        points.append((n, max(best, 1e-6)))
    return CostCurve(points)


def _scratch_segment(num_tokens: int, filler: int) -> Segment:
    # [num_tokens] query tokens, all dropped, an argmax read on every row: the shape of a decode step
    # (an AR step reads its one row, a ReFusion plan or verify step reads every row it feeds), so the
    # LM head and the read of each row are part of the measured cost.
    return Segment(CALIBRATION_SEQ, 0, [filler] * num_tokens, list(range(num_tokens)), 0,
                   Reads(argmax=tuple(range(num_tokens))))
