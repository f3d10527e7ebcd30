"""Per-request decoding state machines (ReFusion, AR) and the ReFusion training objective.

Decoders never call the model: each engine step they state the `workers.batch.Segment` they need and
absorb the `SegmentResult` that came back. No torch at module level.
"""
