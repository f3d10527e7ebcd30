"""Packing a step into one int64 buffer (numpy only): slots, runs, padding, buckets, read parameters."""

from __future__ import annotations

import numpy as np
import pytest

from workers.batch import Reads, Sampling, Segment
from workers.packing import pack_step
from workers.step_layout import bucket
from workers.validation import SegmentError

BS, SCRATCH = 4, 99


def _step():
    a = Segment("a", 5, [10, 11, 12], [5, 6, 9], 2, Reads(argmax=(2,), prob=(0,), prob_tokens=(11,)),
                sampling=Sampling(temperature=0.5, top_k=3, seed=7, step=2, gumbel=True))
    b = Segment("b", 0, [20, 21, 22, 23, 24], [0, 1, 2, 4, 5], 0, Reads(sample=(4,), logits=(1,)), [3, 2],
                Sampling(temperature=1.0, top_p=0.5, seed=8))
    return pack_step([a, b], [[3, 8], []], BS, SCRATCH)


def test_tokens_slots_and_runs():
    step = _step()
    t = step.num_tokens
    assert step.layout.num_tokens == 16 and t == 8
    assert step.view("token_ids")[:t].tolist() == [10, 11, 12, 20, 21, 22, 23, 24]
    # a keeps 2 tokens at cache positions 5, 6 -> block 8 (table[1]), offsets 1, 2; the rest: scratch
    assert step.view("slot_mapping").tolist() == [8 * BS + 1, 8 * BS + 2] + [SCRATCH * BS] * 14
    assert step.view("seq_index")[:t].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert step.view("query_index")[:t].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert step.view("branch_start")[:t].tolist() == [0, 0, 0, 0, 0, 0, 3, 3]


def test_sequences_and_block_tables_padded_to_buckets():
    step = _step()
    lay = step.layout
    assert (lay.num_seqs, lay.max_query, lay.max_blocks) == (4, 8, 4)  # 2 -> 4 sequences, 5 -> 8 queries
    assert step.view("query_start").tolist() == [0, 3, 0, 0]
    assert step.view("query_len").tolist() == [3, 5, 0, 0]
    assert step.view("context_len").tolist() == [5, 0, 0, 0]
    tables = step.view("block_tables").reshape(4, 4)
    assert tables[0].tolist() == [3, 8, SCRATCH, SCRATCH] and (tables[1:] == SCRATCH).all()


def test_read_rows_in_result_order_with_their_parameters():
    step = _step()
    r = step.num_reads
    assert step.layout.num_reads == 8 and r == 4
    assert step.read_starts.tolist() == [0, 2, 4] and step.num_token_reads.tolist() == [2, 1]
    assert step.view("read_rows")[:r].tolist() == [2, 0, 7, 4]  # a: argmax 2, prob 0; b: sample 4, logits 1
    assert step.view("read_position")[:r].tolist() == [9, 5, 5, 1]
    assert step.view("given").tolist() == [-1, 11, -1, -1] + [-1] * 4
    assert step.view("gumbel")[:r].tolist() == [1, 0, 0, 0] and step.view("sample")[:r].tolist() == [0, 0, 1, 0]
    assert step.view("temperature")[:r].tolist() == [0.5, 0.5, 1.0, 1.0]  # float64 bit-cast in the buffer
    assert step.view("top_k")[:r].tolist() == [3, 0, 0, 0]  # top-k/top-p on drawing rows: the Gumbel draft, samples
    assert step.view("top_p").tolist() == [1.0, 1.0, 0.5, 1.0] + [1.0] * 4
    assert step.view("seed")[:r].tolist() == [7, 7, 8, 8]
    assert step.layout.needs_noise and step.layout.needs_sort


def test_buckets_and_int64_overflow():
    assert [bucket(n, 4) for n in (0, 1, 4, 5, 64, 65)] == [4, 4, 4, 8, 64, 128]
    seg = Segment("big", 0, [2**70], [0], 1)
    with pytest.raises(SegmentError) as err:
        pack_step([seg], [[0]], BS, SCRATCH)
    assert (err.value.seq_id, err.value.field) == ("big", "token_ids")
    assert pack_step([Segment("x", 0, [1], [0], 0)], [[]], BS, SCRATCH).layout.num_reads == 0
    assert isinstance(_step().buffer, np.ndarray) and _step().buffer.dtype == np.int64


def test_token_bitmask_rows_per_read_kind():
    import dataclasses

    step = _step()
    assert step.layout.mask_words == 0 and "token_bitmask" not in dict(s for s in step.layout.sizes() if s[1])
    a = Segment("a", 5, [10, 11, 12], [5, 6, 9], 2, Reads(argmax=(2,), prob=(0,), prob_tokens=(11,)))
    b = Segment("b", 0, [20, 21], [0, 1], 0, Reads(sample=(1,), logits=(0,)), sampling=Sampling(temperature=1.0))
    c = Segment("c", 0, [30], [0], 0, Reads(argmax=(0,)))
    mask = bytes(range(1, 10))  # 9 bytes -> 2 int64 words, zero-padded
    step = pack_step([a, dataclasses.replace(b, token_bitmask=mask), c], [[3, 8], [], []], BS, SCRATCH)
    assert step.layout.mask_words == 2
    words = step.view("token_bitmask").reshape(step.layout.num_reads, 2)
    expected = np.frombuffer(mask + bytes(7), dtype="<i8").tolist()
    # reads in result order: a argmax, a prob, b sample, b logits, c argmax, then padding rows
    assert words[2].tolist() == expected  # b's sample row is masked
    for row in (0, 1, 3, 4, 5, 6, 7):  # unconstrained segments, b's logits-only row, padding: everything allowed
        assert words[row].tolist() == [-1, -1]
    assert step.layout != pack_step([a, b, c], [[3, 8], [], []], BS, SCRATCH).layout  # its own graph key


def test_an_unpadded_step_has_its_exact_shapes_and_the_same_fields():
    """pad=False (an eager CPU runner: every padding row would be computed) packs the step at its exact
    sizes, at least 1 each; the real rows' fields are the padded step's."""
    a = Segment("a", 5, [10, 11, 12], [5, 6, 9], 2, Reads(argmax=(2,), prob=(0,), prob_tokens=(11,)))
    b = Segment("b", 0, [20, 21], [0, 1], 0, Reads())
    padded = pack_step([a, b], [[3, 8], []], BS, SCRATCH)
    exact = pack_step([a, b], [[3, 8], []], BS, SCRATCH, pad=False)
    lay = exact.layout
    assert (lay.num_tokens, lay.num_seqs, lay.max_query, lay.max_blocks, lay.num_reads) == (5, 2, 3, 2, 2)
    assert (padded.layout.num_tokens, padded.layout.num_seqs, padded.layout.num_reads) == (16, 4, 8)
    for name in ("token_ids", "positions", "slot_mapping", "seq_index", "query_index"):
        assert exact.view(name).tolist() == padded.view(name)[:5].tolist(), name
    assert exact.view("read_rows").tolist() == padded.view("read_rows")[:2].tolist()
    no_context = pack_step([b], [[]], BS, SCRATCH, pad=False).layout
    assert (no_context.max_blocks, no_context.num_reads) == (1, 0)  # no context, no reads: still one block column


def test_the_runner_pads_only_where_shapes_are_keyed_on(tiny_model_dir):
    """An eager CPU runner packs exact shapes (a 1-token step ran 16 rows through every layer, twice the
    time); compiled layers and CUDA graphs (and any GPU) keep the buckets they key on."""
    from workers.runner import ModelRunner

    runner = ModelRunner(str(tiny_model_dir), device="cpu", num_blocks=8)
    assert not runner.pad_steps
    assert runner.pack([Segment("x", 0, [5], [0], 0, Reads(argmax=(0,)))], [[]]).layout.num_tokens == 1
    runner.compile_layers = True
    assert runner.pad_steps
