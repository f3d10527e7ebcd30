"""The ReFusion training objective on hand-made cases: exact positions, labels, weights."""

from __future__ import annotations

import random

import pytest

from decoding.objective import (
    IGNORE,
    KIND_AR,
    KIND_MDM,
    KIND_NONE,
    ObjectiveError,
    build_example,
    collate,
)

MASK, EOS = 99, 98


class ScriptedRng:
    """A stand-in for random.Random whose draws are written by the test."""

    def __init__(self, choice: int, randoms: list[float], permutation: list[int] | None = None):
        self._choice, self._randoms, self._perm = choice, list(randoms), permutation

    def choice(self, seq):
        assert self._choice in seq
        return self._choice

    def random(self) -> float:
        return self._randoms.pop(0)

    def shuffle(self, xs: list) -> None:
        if self._perm is not None:
            xs[:] = [xs[i] for i in self._perm]


def test_hand_made_case_positions_labels_weights():
    # prompt [1, 2], response [10..15] + EOS -> target of 7 tokens, S = 4 -> slots [10,11,12,13] [14,15,EOS]
    # t = 0.5 -> p = 0.999 * 0.5 + 0.001 = 0.5005; slot 0 draw 0.9 (clean), slot 1 draw 0.1 (masked)
    rng = ScriptedRng(4, [0.5, 0.9, 0.1])
    ex = build_example([1, 2], [10, 11, 12, 13, 14, 15], rng, mask_token_id=MASK, eos_token_id=EOS)
    p = 0.999 * 0.5 + 0.001
    assert ex.slot_size == 4 and ex.mask_prob == pytest.approx(p)
    assert ex.input_ids == [1, 2, 10, 11, 12, 13, MASK, MASK, MASK]
    assert ex.position_ids == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert ex.labels == [IGNORE, IGNORE, 11, 12, 13, IGNORE, 14, 15, EOS]
    assert ex.kinds == [KIND_NONE] * 2 + [KIND_AR] * 3 + [KIND_NONE] + [KIND_MDM] * 3
    mdm_w = 1 / (p * 7)  # AR rows weigh 1: their mean is pooled over the batch (training/trainer.objective_loss)
    assert ex.weights == pytest.approx([0, 0, 1, 1, 1, 0, mdm_w, mdm_w, mdm_w])


def test_clean_slots_in_shuffled_order_keep_true_positions():
    # target [20..27] + EOS = 9 tokens, S = 4 -> slots at 0, 4, 8 (the last holds only EOS)
    # p = 0.999 * 0.0 + 0.001; draws 0.5, 0.0005, 0.7 -> slot 1 masked, slots 0 and 2 clean
    # shuffle of clean [0, 2] with permutation [1, 0] -> physical order slot 2, then slot 0
    rng = ScriptedRng(4, [0.0, 0.5, 0.0005, 0.7], permutation=[1, 0])
    ex = build_example([5], list(range(20, 28)), rng, mask_token_id=MASK, eos_token_id=EOS)
    assert ex.clean_order == [2, 0] and ex.masked_slots == [1]
    assert ex.input_ids == [5, EOS, 20, 21, 22, 23, MASK, MASK, MASK, MASK]
    assert ex.position_ids == [0, 9, 1, 2, 3, 4, 5, 6, 7, 8]
    assert ex.labels == [IGNORE, IGNORE, 21, 22, 23, IGNORE, 24, 25, 26, 27]
    # A one-token slot has no AR label; slot 0's 3 labels weigh 1 each.
    mdm_w = 1 / (0.001 * 9)
    assert ex.weights == pytest.approx([0, 0, 1, 1, 1, 0] + [mdm_w] * 4)


def test_all_masked_has_no_ar_rows_and_all_clean_no_mdm_rows():
    all_masked = build_example([1], [10, 11], ScriptedRng(8, [1.0, 0.2]), mask_token_id=MASK, eos_token_id=EOS)
    assert all_masked.input_ids == [1, MASK, MASK, MASK]
    assert all_masked.position_ids == [0, 1, 2, 3]
    assert all_masked.labels == [IGNORE, 10, 11, EOS]
    assert KIND_AR not in all_masked.kinds
    assert sum(all_masked.weights) == pytest.approx(3 / (1.0 * 3))  # p = 1 -> each masked row 1/len

    all_clean = build_example([1], [10, 11], ScriptedRng(8, [0.0, 0.5]), mask_token_id=MASK, eos_token_id=EOS)
    assert all_clean.input_ids == [1, 10, 11, EOS]
    assert all_clean.labels == [IGNORE, 11, EOS, IGNORE]
    assert KIND_MDM not in all_clean.kinds
    assert all_clean.weights == [0.0, 1.0, 1.0, 0.0]


def test_random_examples_are_permutations_of_the_target():
    rng = random.Random(0)
    for n in (1, 5, 31, 64, 100):
        prompt, response = list(range(3)), list(range(100, 100 + n))
        ex = build_example(prompt, response, rng, mask_token_id=MASK, eos_token_id=EOS)
        target = response + [EOS]
        assert sorted(ex.position_ids) == list(range(3 + n + 1))
        by_pos = dict(zip(ex.position_ids, ex.input_ids))
        for pos, lab, kind in zip(ex.position_ids, ex.labels, ex.kinds):
            if kind == KIND_MDM:
                assert by_pos[pos] == MASK and lab == target[pos - 3]
            elif kind == KIND_AR:
                assert by_pos[pos] == target[pos - 3] and lab == target[pos - 2]
        assert all(w == 1.0 for w, k in zip(ex.weights, ex.kinds) if k == KIND_AR)


def test_same_seed_same_example():
    a = build_example([1, 2], list(range(10, 50)), random.Random(7), mask_token_id=MASK, eos_token_id=EOS)
    b = build_example([1, 2], list(range(10, 50)), random.Random(7), mask_token_id=MASK, eos_token_id=EOS)
    assert a == b


def test_collate_right_pads_with_zero_weight():
    rng = ScriptedRng(4, [0.5, 0.9])
    short = build_example([1], [10, 11], rng, mask_token_id=MASK, eos_token_id=EOS)  # 4 rows, all clean
    long = build_example([1, 2], [10, 11, 12, 13], ScriptedRng(4, [0.0, 0.9, 0.9]), mask_token_id=MASK, eos_token_id=EOS)
    batch = collate([short, long], pad_token_id=0)
    assert [len(r) for r in batch.input_ids] == [7, 7]
    assert batch.input_ids[0] == short.input_ids + [0, 0, 0]
    assert batch.attention_mask[0] == [1, 1, 1, 1, 0, 0, 0]
    assert batch.weights[0][4:] == [0.0, 0.0, 0.0]
    assert batch.labels[0][4:] == [IGNORE] * 3
    assert batch.position_ids[0] == [0, 1, 2, 3, 4, 5, 6]
    assert batch.attention_mask[1] == [1] * 7


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_ids=[1], response_ids=[], eos_token_id=None), "response_ids"),
        (dict(prompt_ids=[-1], response_ids=[3], eos_token_id=EOS), "prompt_ids"),
        (dict(prompt_ids=[1], response_ids=[3.5], eos_token_id=EOS), "response_ids"),
        (dict(prompt_ids=[1], response_ids=[3], eos_token_id=EOS, slot_sizes=()), "slot_sizes"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ObjectiveError) as err:
        build_example(rng=random.Random(0), mask_token_id=MASK, **kwargs)
    assert err.value.field == field


def test_collate_rejects_empty():
    with pytest.raises(ObjectiveError, match="examples"):
        collate([], pad_token_id=0)
