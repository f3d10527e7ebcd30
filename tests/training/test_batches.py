"""Sequence packing (training/batches.py): static [rows, row_len] batches, first-fit, nothing lost."""

from __future__ import annotations

import random

import pytest

from decoding.objective import IGNORE, build_example
from training.batches import PAD_SEGMENT, PackingError, pack_batches, pack_one_batch

MASK, EOS = 99, 98


def _examples(lengths, seed=0):
    rng = random.Random(seed)
    return [build_example([1, 2], list(range(10, 10 + n)), rng, mask_token_id=MASK, eos_token_id=EOS) for n in lengths]


def test_batches_have_one_shape_and_hold_every_example_once_in_order_within_rows():
    examples = _examples([5, 30, 12, 40, 3, 20, 20, 7, 50, 9])
    batches = list(pack_batches(iter(examples), rows=2, row_len=64))
    assert all(len(b.input_ids) == 2 and all(len(r) == 64 for r in b.input_ids) for b in batches)
    laid = []
    for b in batches:
        for row_ids, row_seg in zip(b.input_ids, b.segments):
            segs = [s for s in dict.fromkeys(row_seg) if s != PAD_SEGMENT]
            laid += [[t for t, s in zip(row_ids, row_seg) if s == seg] for seg in segs]
            assert row_seg == sorted(row_seg, key=lambda s: (s == PAD_SEGMENT, s))  # examples, then padding
    assert sorted(map(tuple, laid)) == sorted(tuple(e.input_ids) for e in examples)
    assert sum(b.num_examples for b in batches) == len(examples)


def test_first_fit_places_a_short_example_in_an_earlier_row():
    examples = _examples([40, 40, 10])  # 43, 43, 13 tokens in rows of 64: the third joins row 0
    (batch,) = pack_batches(examples, rows=2, row_len=64)
    assert batch.input_ids[0][43:56] == examples[2].input_ids  # segments number examples in layout order
    assert batch.segments[0][:56] == [0] * 43 + [1] * 13 and batch.segments[1][:43] == [2] * 43
    assert batch.fill == pytest.approx((43 + 43 + 13) / 128)


def test_padding_weighs_nothing_and_positions_restart_per_example():
    batch = pack_one_batch(_examples([4, 6]), row_len=32)
    (row_w,), (row_l,), (row_seg,), (row_pos,) = batch.weights, batch.labels, batch.segments, batch.position_ids
    pad = [i for i, s in enumerate(row_seg) if s == PAD_SEGMENT]
    assert pad and all(row_w[i] == 0.0 and row_l[i] == IGNORE for i in pad)
    second = row_seg.index(1)
    assert row_pos[0] == 0 and row_pos[second] == 0  # each example starts at logical position 0


def test_attention_mask_is_block_diagonal_causal():
    torch = pytest.importorskip("torch")
    batch = pack_one_batch(_examples([2, 3]), row_len=16)
    mask = batch.tensors("cpu")["attention_mask"]  # [1, 1, 16, 16]
    seg = torch.tensor(batch.segments[0])
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(mask[0, 0], (seg[i] == seg[j]) & (j <= i))
    assert bool(mask[0, 0].any(dim=1).all())  # every row, padding included, sees at least itself


def test_too_long_example_names_row_len():
    with pytest.raises(PackingError) as err:
        list(pack_batches(_examples([40]), rows=1, row_len=16))
    assert err.value.field == "row_len"
    with pytest.raises(PackingError) as err:
        list(pack_batches(_examples([4]), rows=0, row_len=16))
    assert err.value.field == "rows"
