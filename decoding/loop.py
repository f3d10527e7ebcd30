"""A minimal solo decode loop for the CLI and tests (the scheduler's engine is the real one).

    while any decoder is unfinished:
        segments = [d.next_segment(budget) for each unfinished d]
        results  = session.execute(segments)         # prepare KV, one packed forward
        d.absorb(r) for each; session.free(d.seq_id) once d is finished
"""

from __future__ import annotations

from decoding.api import Decoder

DEFAULT_BUDGET = 8192


def decode_batch(session, decoders: list[Decoder], *, budget: int = DEFAULT_BUDGET) -> list[list[int]]:
    """Run every decoder to completion, all in the same forwards; returns each one's output_ids.

    `session` owns the KV and runs steps: `execute(segments)` and `free(seq_id)`
    (workers.session.RunnerSession over a ModelRunner). Raises ValueError for duplicate seq_ids and
    whatever the runner raises (every decoder's KV is freed first).
    """
    ids = [d.seq_id for d in decoders]
    if len(set(ids)) != len(ids):
        raise ValueError(f"decoders must have distinct seq_ids, got {ids}")
    active = list(decoders)
    try:
        while active:
            stepping = [(d, d.next_segment(budget)) for d in active]
            stepping = [(d, seg) for d, seg in stepping if seg is not None]
            if stepping:
                results = session.execute([seg for _, seg in stepping])
                for (d, _), result in zip(stepping, results):
                    d.absorb(result)
            for d in [d for d in active if d.finished]:
                session.free(d.seq_id)
            active = [d for d in active if not d.finished]
    finally:
        for d in active:  # an exception mid-way must not leak KV blocks
            session.free(d.seq_id)
    return [d.output_ids() for d in decoders]
