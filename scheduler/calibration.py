"""Start-up calibration: forward latency as a function of packed query tokens on the actual device."""

from __future__ import annotations

import time

from scheduler.routing import CostCurve
from workers.batch import Read, ReadKind, Segment

CALIBRATION_SEQ = "__engine_calibration__"


def calibrate(runner, token_counts: tuple[int, ...], repeats: int = 2, max_tokens: int | None = None) -> CostCurve:
    """Time runner.execute on a scratch sequence for each packed-token count (minimum of `repeats`
    runs after one warm-up); the scratch sequence keeps no KV and is freed afterwards.

    Counts above `max_tokens` (the engine's token budget) are clipped: the engine never packs more.
    """
    counts = sorted({min(n, max_tokens or n) for n in token_counts})
    filler = _filler_token(runner)
    points: list[tuple[int, float]] = []
    try:
        runner.execute([_scratch_segment(counts[0], filler)])  # warm-up (allocations, kernels)
        for n in counts:
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                runner.execute([_scratch_segment(n, filler)])
                best = min(best, time.perf_counter() - start)
            points.append((n, max(best, 1e-6)))
    finally:
        runner.free(CALIBRATION_SEQ)
    return CostCurve(points)


def _scratch_segment(num_tokens: int, filler: int) -> Segment:
    # [num_tokens] query tokens, all dropped, an argmax read on every row: the shape of a decode step
    # (an AR step reads its one row, a ReFusion plan or verify step reads every row it feeds), so the
    # LM head and the read of each row are part of the measured cost.
    return Segment(
        seq_id=CALIBRATION_SEQ,
        context_len=0,
        token_ids=[filler] * num_tokens,
        positions=list(range(num_tokens)),
        keep=[False] * num_tokens,
        reads=[Read(row, ReadKind.ARGMAX) for row in range(num_tokens)],
    )


def _filler_token(runner) -> int:
    info = getattr(runner, "info", None)
    mask = getattr(info, "mask_token_id", None)
    return int(mask) if mask is not None and mask >= 0 else 0
