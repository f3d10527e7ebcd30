"""Token healing's constraint (decoding/healing.py): the tokens allowed while healed blanks are unwritten
(the detokenizer's column rule, tabs included), and the AR decoder's masked reads, serial and planned ahead.

A break-test found the client reading "import _name()" where the model wrote "import_name()": the prompt's
trailing space was left out of the prompt, and nothing made the model write it."""

from __future__ import annotations

import numpy as np
import pytest

from decoding.ar import ARDecoder
from decoding.healing import Healing, HealingVocab
from decoding.params import DecodeParams
from scheduler.detokenizer import Healer
from workers.batch import SegmentResult

EOS, MASK = 0, 2
# token id k's text; "" stands for a special token (it decodes to nothing with skip_special_tokens)
PIECES = ["", "x", "", " ", "  ", "   ", "    ", "     ", "\t", " \t", "  \t", " x", "  x", "   x", "    x",
          "\tx", "\n", " \n", "x ", "  \t x", "\t\t"]
VOCAB_SIZE = 24  # the model's logits are wider than the tokenizer's vocabulary: ids 21..23 never come


class PieceTokenizer:
    """Token id k decodes to PIECES[k] (special ids 0 and 2 to "")."""

    def __len__(self):
        return len(PIECES)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids)


def allowed(mask: bytes) -> set[str]:
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
    return {PIECES[t] if t < len(PIECES) else f"<{t}>" for t in np.flatnonzero(bits)} - {""} | (
        {"<eos>"} if bits[EOS] else set())


@pytest.fixture
def vocab():
    return HealingVocab(PieceTokenizer(), VOCAB_SIZE, never=(MASK,))


def test_a_token_is_allowed_iff_its_leading_blanks_land_on_the_healed_width(vocab):
    ends = frozenset({EOS})
    # one space healed: a token writing it, whatever follows (an extra blank is the model's own)
    assert allowed(vocab.bitmask(1, 0, ends)) == {"<eos>", " ", "  ", "   ", "    ", "     ", " \t", "  \t", " x",
                                                  "  x", "   x", "    x", " \n", "  \t x"}
    # four columns from column 0: four spaces, or a tab, or spaces then a tab reaching column 4; blanks
    # alone short of it (the next read goes on); never a tab past it nor any other character first
    assert allowed(vocab.bitmask(4, 0, ends)) == {
        "<eos>", " ", "  ", "   ", "    ", "     ", "\t", " \t", "  \t", "    x", "\tx", "  \t x", "\t\t"}
    # from column 2 of 4: a tab reaches 4 as two spaces do; "   " lands on 4 after two of its spaces (the
    # third is the model's own); " x" stops at column 3
    assert allowed(vocab.bitmask(4, 2, ends)) == {
        "<eos>", " ", "  ", "   ", "    ", "     ", "\t", " \t", "  \t", "  x", "   x", "    x", "\tx", "  \t x", "\t\t"}
    # two columns: a tab from column 0 jumps to 4, past them (the Healer keeps it: the client would read it
    # after its own blanks)
    assert "\t" not in allowed(vocab.bitmask(2, 0, ends)) and "  \t" in allowed(vocab.bitmask(2, 0, ends))
    # the ends are the request's; the mask token, special tokens and ids past the tokenizer's never
    assert allowed(vocab.bitmask(1, 0, frozenset())) == allowed(vocab.bitmask(1, 0, ends)) - {"<eos>"}
    assert len(vocab.bitmask(1, 0, ends)) == 3  # ceil(24 / 8) bytes
    never = HealingVocab(PieceTokenizer(), VOCAB_SIZE, never=(MASK, PIECES.index(" ")))
    assert allowed(never.bitmask(1, 0, ends)) == allowed(vocab.bitmask(1, 0, ends)) - {" "}


def test_every_allowed_token_agrees_with_the_healer(vocab):
    """What the mask allows is what keeps client prompt + text equal to the model's text in columns: fed
    a token it allows and then "y", the Healer drops exactly the healed width (or the text is blank only)."""
    for healed in (" ", "  ", "    ", "\t", " \t", "  \t "):
        healing = Healing(vocab, healed, frozenset({EOS}))
        for token in range(len(PIECES)):
            c = healing.constraint()
            bits = np.unpackbits(np.frombuffer(c.bitmask(), dtype=np.uint8), bitorder="little")
            text = PIECES[token]
            if not bits[token] or token == EOS:
                continue
            c.consume(token)
            healer = Healer(healed)
            rest = healer.feed(text + "y")
            assert healer.column == healer.width or (c.pending and rest == "y" and healer.column == c.column), (
                healed, text)
            assert c.pending == (healer.column < healer.width)


def test_the_constraint_follows_blanks_written_over_several_tokens(vocab):
    c = Healing(vocab, "    ", frozenset({EOS})).constraint()
    c.consume(PIECES.index("  "))
    assert c.pending and c.column == 2
    assert allowed(c.bitmask()) == allowed(vocab.bitmask(4, 2, frozenset({EOS})))
    c.consume(PIECES.index(" x"))  # column 3, then "x": the rule broken (read without the mask): healing ends
    assert not c.pending
    done = Healing(vocab, "\t", frozenset({EOS})).constraint()
    done.consume(PIECES.index("   "))
    done.consume(PIECES.index(" x"))
    assert not done.pending
    with pytest.raises(RuntimeError, match="written"):
        done.bitmask()


def _params(**kw) -> DecodeParams:
    return DecodeParams(eos_token_id=EOS, mask_token_id=MASK, **({"gen_length": 16, "slot_size": 4,
                                                                  "serial_num_blocks": 4} | kw))


def _answer(decoder, segment, token):
    decoder.absorb(SegmentResult(segment.seq_id, [token], [0.9]))


def test_ar_reads_are_masked_until_the_blanks_are_written(vocab):
    healing = Healing(vocab, "    ", frozenset({EOS}))
    d = ARDecoder("a", [1, 1], _params(), healing=healing.constraint())  # blocks of 4 tokens
    first = d.next_segment(100)
    assert first.token_bitmask == vocab.bitmask(4, 0, frozenset({EOS}))
    assert d.healing_pending
    _answer(d, first, PIECES.index("  "))
    step = d.next_segment(100)
    assert step.token_bitmask == vocab.bitmask(4, 2, frozenset({EOS}))
    _answer(d, step, PIECES.index("   "))  # lands on column 4 after two of its spaces
    assert not d.healing_pending
    for _ in range(2):
        step = d.next_segment(100)
        assert step.token_bitmask is None
        _answer(d, step, PIECES.index("x"))
    assert d.at_block_boundary()  # 4 of 16 generated: the router may move it to ReFusion now


def test_no_block_boundary_nor_handoff_while_blanks_are_unwritten(vocab):
    d = ARDecoder("a", [1, 1], _params(), healing=Healing(vocab, "\t\t\t\t\t", frozenset({EOS})).constraint())
    for _ in range(4):  # 20 columns, written one space a token: still pending at the block boundary
        _answer(d, d.next_segment(100), PIECES.index(" "))
    assert d.healing_pending and not d.at_block_boundary()
    with pytest.raises(RuntimeError, match="healed blanks"):
        d.handoff()


def test_a_step_planned_ahead_gets_its_mask_after_launch(vocab):
    """Under asynchronous scheduling the step after the one in flight is stated before that step's token is
    known: its mask is deferred (Segment.deferred_mask) and given from the state that token leaves."""
    healing = Healing(vocab, "    ", frozenset({EOS}))
    d = ARDecoder("a", [1, 1], _params(), healing=healing.constraint())
    first = d.next_segment(100)
    ahead = d.plan_ahead()
    assert ahead.deferred_mask and ahead.token_bitmask is None
    _answer(d, first, PIECES.index(" "))
    assert d.deferred_bitmask(ahead) == vocab.bitmask(4, 1, frozenset({EOS}))  # three columns to go
    after = d.plan_ahead()
    assert after.deferred_mask  # (planned while pending: the token in flight may write the rest, or not)
    _answer(d, ahead, PIECES.index("   "))
    assert d.deferred_bitmask(after) is None  # that token wrote them: every token
    _answer(d, after, PIECES.index("x"))
    assert d.next_segment(100).token_bitmask is None
    assert not d.plan_ahead().deferred_mask  # planned once they are written: no mask at all
