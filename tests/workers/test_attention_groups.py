"""Attention groups (workers.attention_groups, run by workers.attention.StepAttention): a step
whose query lengths differ widely is attended group by group at each group's own shapes, and gives the
same logits and K/V as the same step attended whole (float32, CPU): a prompt chunk beside decode steps,
three groups with a ReFusion plan and branches among them, padded (bucketed) shapes with padding
sequences, and a shared-prefix sequence."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attention_cases import compare, runner_sessions  # noqa: E402
from hf_oracle import segment  # noqa: E402
from workers import attention_groups  # noqa: E402
from workers.packing import pack_step  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402


@pytest.fixture()
def sessions(tiny_model_dir):
    made, mask = runner_sessions(tiny_model_dir, {"sdpa": {}, "whole": {}}, seed=3, num_blocks=96)
    made["whole"].runner.group_attention = False
    return made, mask


def _groups_of(session, segments):
    runner = session.runner
    tables = [[0] * (-(-(s.context_len + len(s.token_ids)) // 4)) for s in segments]
    return pack_step(segments, tables, 4, runner.scratch_block, runner.pad_steps, runner.group_attention).layout


def _step(sessions, segments, groups: tuple):
    """Run `segments` grouped and whole; the grouped step must have split into `groups`."""
    layout = _groups_of(sessions["sdpa"], segments)
    assert layout.attention_groups == groups, layout
    assert not _groups_of(sessions["whole"], segments).attention_groups
    return compare(sessions, segments, "whole", atol=2e-5)


@pytest.mark.parametrize("pad", [False, True])
def test_groups_equal_the_whole_step(sessions, monkeypatch, pad):
    """(Steps this small stay whole when serving, GROUP_MIN_PAIRS: the policy is lifted to test the
    arithmetic.)"""
    sessions, mask = sessions
    monkeypatch.setattr(ModelRunner, "pad_steps", property(lambda self: pad))
    monkeypatch.setattr(attention_groups, "GROUP_MIN_PAIRS", 0)
    # a 40-token prompt beside three short ones: 40 | 5, 3 | 1 (bucketed: 64 | 8, 4 | 1)
    _step(sessions, [segment("long", 0, list(range(10, 50))), segment("a", 0, [5, 6, 7]), segment("b", 0, [8]),
                     segment("c", 0, [9, 10, 11, 12, 13])],
          groups=((1, 40, 1), (2, 5, 1), (1, 1, 1)) if not pad else ((1, 64, 4), (2, 8, 4), (1, 1, 4)))
    # a 40-token chunk after 40 cached tokens beside decode steps of different contexts
    _step(sessions, [segment("a", 3, [20]), segment("long", 40, list(range(60, 100))), segment("b", 1, [21]),
                     segment("c", 5, [22])],
          groups=((1, 40, 10), (3, 1, 2)) if not pad else ((1, 64, 16), (3, 1, 4)))
    # a chunk, a ReFusion plan (two kept, six masks dropped) and branches, decode steps (padded: and
    # three padding sequences in the last group)
    _step(sessions, [segment("long", 80, list(range(100, 164))),
                     segment("a", 4, [30, 31, mask, mask, mask, mask, mask, mask], keep=2),
                     segment("b", 2, [40, 41, 42, 43, 44, 45, 46, 47], keep=False, branch_lens=[4, 4]),
                     segment("c", 6, [23]), segment("d", 0, [24])],
          groups=((1, 64, 20), (2, 8, 1), (2, 1, 2)) if not pad else ((1, 64, 32), (2, 8, 4), (5, 1, 4)))


def test_groups_with_a_shared_prefix(sessions, monkeypatch):
    sessions, _ = sessions
    monkeypatch.setattr(attention_groups, "GROUP_MIN_PAIRS", 0)
    compare(sessions, [segment("p", 0, list(range(100, 140)))], "whole")
    for s in sessions.values():
        s.adopt_prefix("q", s.block_table("p")[:8], 32)
    _step(sessions, [segment("q", 32, list(range(200, 232))), segment("p", 40, [141]), segment("r", 0, [7])],
          groups=((1, 32, 8), (2, 1, 10)))


def _layout(segments, pad=True, group=True):
    tables = [[0] * (-(-(s.context_len + len(s.token_ids)) // 16)) for s in segments]
    return pack_step(segments, tables, 16, 999, pad, group)


def test_groups_are_used_only_where_they_save_work():
    """The shapes of serving: 63 decode steps at 150-token contexts beside a 434-token prompt chunk
    after 1,500 cached tokens split in two (the chunk first, padding sequences last); uniform decode
    steps, queries within GROUP_SPLIT of each other, and small steps stay whole."""
    decodes = [segment(f"d{i}", 150, [5]) for i in range(63)]
    step = _layout(decodes + [segment("long", 1500, [7] * 434)])
    assert step.layout.attention_groups == ((1, 512, 128), (63, 1, 16))
    assert list(step.view("group_seqs")) == [63] + list(range(63))
    exact = _layout(decodes[:5] + [segment("long", 1500, [7] * 434)], pad=False)
    assert exact.layout.attention_groups == ((1, 434, 94), (5, 1, 10))
    assert list(exact.view("group_seqs")) == [5, 0, 1, 2, 3, 4]
    padded = _layout(decodes[:5] + [segment("long", 1500, [7] * 434)])  # 6 sequences bucketed to 8
    assert padded.layout.attention_groups == ((1, 512, 128), (7, 1, 16))
    assert list(padded.view("group_seqs")) == [5, 0, 1, 2, 3, 4, 6, 7]
    whole = _layout(decodes + [segment("long", 1500, [7] * 434)], group=False)
    assert not whole.layout.attention_groups and "group_seqs" not in dict(whole.layout.sizes()) or \
        dict(whole.layout.sizes())["group_seqs"] == 0
    n = whole.layout.num_tokens
    assert np.array_equal(whole.buffer[:n], step.buffer[:n])  # the token fields are the same either way
    assert not _layout([segment(f"d{i}", 1500, [5]) for i in range(64)]).layout.attention_groups  # uniform
    assert not _layout([segment(f"r{i}", 1500, [5] * 16) for i in range(8)]  # 16 and 8: within GROUP_SPLIT
                       + [segment(f"s{i}", 1500, [5] * 8) for i in range(8)]).layout.attention_groups
    assert not _layout(decodes[:3] + [segment("x", 8, [5] * 8)]).layout.attention_groups  # small: launches
