"""Step sequences that every attention backend must run as the portable one does (workers.attention's
StepAttention, "sdpa"), shared by test_attention_flex.py and test_attention_paged.py."""

from __future__ import annotations

import torch

from hf_oracle import result_logits, segment


def runner_sessions(tiny_model_dir, options: dict[str, dict], seed: int, num_blocks: int):
    """One RunnerSession per name in `options` (its ModelRunner keyword arguments, block_size 4) over
    one float32 random model of the tiny test model's shape with 2 layers; and the mask token id."""
    import dataclasses

    from workers.loader import read_config
    from workers.model import random_model
    from workers.runner import ModelRunner
    from workers.session import RunnerSession

    cfg = dataclasses.replace(read_config(tiny_model_dir), num_layers=2)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=seed, std=0.2)
    return {name: RunnerSession(ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4,
                                                       num_blocks=num_blocks, **kw))
            for name, kw in options.items()}, cfg.mask_token_id


def compare(sessions: dict, segments, other: str, atol: float = 1e-5):
    """Run the same step in sessions["sdpa"] and sessions[other] (RunnerSessions on the same weights);
    every logits row and every layer's cache (the scratch block aside) must agree. Returns sdpa's results."""
    out = {name: s.execute(segments) for name, s in sessions.items()}
    for a, b in zip(out["sdpa"], out[other]):
        torch.testing.assert_close(result_logits(b), result_logits(a), rtol=1e-5, atol=atol)
    ka, kb = sessions["sdpa"].runner.kv, sessions[other].runner.kv
    for layer in range(len(ka.k)):
        torch.testing.assert_close(kb.k[layer][:-1], ka.k[layer][:-1], rtol=1e-3, atol=atol)
        torch.testing.assert_close(kb.v[layer][:-1], ka.v[layer][:-1], rtol=1e-3, atol=atol)
    return out["sdpa"]


def decoding_shapes(sessions: dict, other: str, mask: int) -> None:
    """A prefill with partial blocks, decode beside a new sequence, a ReFusion plan (two kept context
    tokens, four masks dropped), a verify beside branches after nothing kept, other branches beside a
    sequence with no context."""
    both = lambda segments: compare(sessions, segments, other)  # noqa: E731
    both([segment("a", 0, [5, 6, 7, 8, 9, 10]), segment("b", 0, [20, 21, 22])])
    both([segment("a", 6, [11]), segment("b", 3, [23]), segment("c", 0, [30])])
    both([segment("a", 7, [12, 13, mask, mask, mask, mask], keep=2), segment("c", 1, [31])])
    both([segment("a", 9, [40, 41, 42, 43]), segment("b", 4, [50, 51, 52, 53], keep=False, branch_lens=[2, 2])])
    both([segment("b", 4, [54, 55, 56, 57], keep=False, branch_lens=[1, 3]), segment("d", 0, [60, 61, 62, 63, 64])])


def shared_prefix(sessions: dict, other: str) -> None:
    """A second sequence adopts the first one's two full blocks (prefix cache) and both step on."""
    compare(sessions, [segment("p", 0, list(range(100, 110)))], other)  # two full blocks of 4 and a partial one
    for s in sessions.values():
        s.adopt_prefix("q", s.block_table("p")[:2], 8)
    compare(sessions, [segment("q", 8, [200, 201, 202]), segment("p", 10, [111])], other)
    assert sessions[other].block_table("q")[:2] == sessions[other].block_table("p")[:2]
