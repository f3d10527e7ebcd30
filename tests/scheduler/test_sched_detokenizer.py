"""Incremental detokenization: complete characters only, stop strings across steps, deadline newline cut."""

from __future__ import annotations

import pytest
from sched_fakes import FakeTokenizer

from scheduler.detokenizer import TextStream

A, B, C, NL = 0, 1 + 26 * 1, 2 + 26 * 1, 3  # FakeTokenizer: a, b, c, newline (1 and 2 are EOS/MASK)


def feed(stream, steps, **kw):
    ids, updates = [], []
    for step in steps:
        ids += step
        updates.append(stream.update(ids, **kw))
    return updates


def test_text_streams_in_order_and_equals_full_decode():
    tok = FakeTokenizer()
    stream = TextStream(tok)
    updates = feed(stream, [[A], [B, C], [NL, A]])
    final = stream.finish()
    assert "".join(u.text for u in updates) + final.text == "abc\na"
    assert [t for u in updates for t in u.token_ids] + final.token_ids == [A, B, C, NL, A]


def test_stop_string_spanning_two_steps_is_cut_before_it_is_sent():
    stream = TextStream(FakeTokenizer(), stop=["bc"])
    first = stream.update([A, B])
    assert first.text == "a" and first.stopped is None  # "b" held back: it may start "bc"
    second = stream.update([A, B, C, A])
    assert second.stopped == "stop" and second.text == ""
    assert stream.text == "a" and stream.done
    assert stream.update([A, B, C, A, A]).text == ""  # nothing after the end


def test_only_what_may_begin_a_stop_string_is_held_back():
    """Chat's implicit "\n### " (4 characters) held back every text's last 4 characters, so streamed text
    lagged its tokens at every step; now only a tail that is a proper prefix of a stop string waits."""
    stream = TextStream(FakeTokenizer(), stop=["\nab\n", "cc"])
    first = stream.update([A, B, B])
    assert first.text == "abb"  # nothing here can begin a stop string
    second = stream.update([A, B, B, NL, A])
    assert second.text == ""  # "\na" may begin "\nab\n"
    third = stream.update([A, B, B, NL, A, C])
    assert third.text == "\na"  # "\nac" cannot; the "c" may begin "cc"
    fourth = stream.update([A, B, B, NL, A, C, C])
    assert fourth.stopped == "stop" and fourth.text == "" and stream.text == "abb\na"


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(FakeTokenizer(), stop=["c", "\n"])
    assert stream.stop_word is None
    update = stream.update([A, B, NL, C])
    assert update.stopped == "stop" and update.text == "ab"
    assert update.token_ids == [A, B, NL]  # through the stop string's tokens (generated, counted)
    assert stream.stop_word == "\n"  # the string that ended it (llama.cpp's stopping_word)


def test_stop_string_ids_do_not_depend_on_how_the_tokens_arrived():
    """AR releases one id per step while the text is held back for a possible stop string; ReFusion may
    bring the same ids in one step. Both end with the same ids: through the stop string's last token."""
    one_step = TextStream(FakeTokenizer(), stop=["bc"])
    together = one_step.update([A, A, B, C, A])
    per_step = TextStream(FakeTokenizer(), stop=["bc"])
    updates = feed(per_step, [[A], [A], [B], [C], [A]])
    assert together.text == "".join(u.text for u in updates) == "aa"
    assert together.token_ids == [t for u in updates for t in u.token_ids] == [A, A, B, C]


def test_min_tokens_keeps_a_stop_string_that_ends_inside_the_min_tokens_th_token():
    """vLLM's rule: a stop string counts when it ends inside or after the min_tokens-th token's text, even
    when it starts before it ("bc" across the 2nd and 3rd tokens with min_tokens 3); one that ends
    before it is passed over."""
    stream = TextStream(FakeTokenizer(), stop=["bc"], min_tokens=3)
    update = stream.update([A, B, C, A])
    assert (update.stopped, update.text, update.token_ids) == ("stop", "a", [A, B, C])
    early = TextStream(FakeTokenizer(), stop=["ab"], min_tokens=3)
    assert [u.stopped for u in feed(early, [[A, B], [C], [A, B]])] == [None, None, "stop"]
    assert early.text == "abc"


def test_newline_cut_ends_after_the_newline():
    stream = TextStream(FakeTokenizer())
    stream.update([A, B])
    update = stream.update([A, B, C, NL, A, B], newline_cut=True)
    assert update.stopped == "newline" and update.text == "c\n"
    assert stream.text == "abc\n" and update.token_ids == [C, NL]


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_the_backend_decoder_gives_what_the_tokenizer_decode_gives(bpe_tokenizer):
    # TextStream calls the tokenizers library directly (transformers' wrapper cost 8x the decode); the
    # text must be the same, special tokens and byte pieces cut inside a character included
    import random

    from scheduler.detokenizer import fast_decoder

    decode = fast_decoder(bpe_tokenizer)
    assert decode is not None and bpe_tokenizer.clean_up_tokenization_spaces is False
    rng = random.Random(0)
    specials = bpe_tokenizer.all_special_ids
    for _ in range(3000):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(bpe_tokenizer))
               for _ in range(rng.randrange(12))]
        assert decode(ids, skip_special_tokens=True) == bpe_tokenizer.decode(ids, skip_special_tokens=True), ids
    ids = bpe_tokenizer.encode("naïve → ✓ done")
    assert all(decode(ids[:k], skip_special_tokens=True) == bpe_tokenizer.decode(ids[:k], skip_special_tokens=True)
               for k in range(len(ids) + 1))
    # a tokenizer that cleans up tokenization spaces keeps transformers' decode
    bpe_tokenizer.clean_up_tokenization_spaces = True
    try:
        assert fast_decoder(bpe_tokenizer) is None
    finally:
        bpe_tokenizer.clean_up_tokenization_spaces = False
    assert fast_decoder(FakeTokenizer()) is None


def test_multibyte_characters_are_never_split(bpe_tokenizer):
    text = "naïve → ✓ done"
    ids = bpe_tokenizer.encode(text)
    assert any("\ufffd" in bpe_tokenizer.decode(ids[:k]) for k in range(1, len(ids)))  # the tokenizer does split
    stream = TextStream(bpe_tokenizer)
    pieces = [stream.update(ids[:k]).text for k in range(1, len(ids) + 1)]
    pieces.append(stream.finish().text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_a_stop_string_ending_in_a_multibyte_character_counts_all_its_byte_tokens(bpe_tokenizer):
    """The ids run through the stop string's last byte (helper-150: "本" is three byte tokens, and the
    first one decodes as U+FFFD, a character long: usage said 4 tokens for 6 generated)."""
    ids = bpe_tokenizer.encode("日本語")
    upto = next(k for k in range(1, len(ids) + 1) if bpe_tokenizer.decode(ids[:k]) == "日本")
    assert len(bpe_tokenizer.decode(ids[:upto - 1])) == 2  # "日" and a U+FFFD: as long as "日本"
    for steps in ([ids], [[i] for i in ids]):  # one step (ReFusion) or one id per step (AR)
        stream = TextStream(bpe_tokenizer, stop=["本"])
        updates = feed(stream, steps)
        assert "".join(u.text for u in updates) == "日"
        assert [t for u in updates for t in u.token_ids] == ids[:upto]


# ---- token healing (GenerationRequest.healed) ----------------------------------------------------------

class PieceTokenizer:
    """Token id k decodes to pieces[k]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def healed_stream(pieces, healed, **kw):
    """Each piece one token, released one per step; the updates and the closing one."""
    stream = TextStream(PieceTokenizer(pieces), healed=healed, **kw)
    updates = [stream.update(list(range(k + 1))) for k in range(len(pieces))]
    return updates + [stream.finish()]


@pytest.mark.parametrize("pieces, healed, expected", [
    (["   ", " return x"], "    ", "return x"),      # the blanks split across tokens
    (["", "  ", "", "  y"], "    ", "y"),            # empty tokens on the way
    (["      y"], "    ", "  y"),                    # never more than the healed amount
    (["  ", "\n    y"], "    ", "\n    y"),          # a newline ends the dropping
    ([" 1", " 2"], " ", "1 2"),                      # only the front of the text
    (["  ", "  return"], "  \t", "return"),          # mixed: "  \t" is 4 columns, as the 4 spaces written
    (["\treturn"], "  ", "\treturn"),                # a tab past the healed 2 columns is the model's own
    (["\t", "x"], "\t", "x"),
    (["   ", " "], "    ", ""),                      # only blanks: nothing to send, every id released
    (["     x"], " \t", " x"),                      # a tab reaches the next tab stop: " \t" is 4 columns
])
def test_healed_blanks_are_dropped_however_the_tokens_split_them(pieces, healed, expected):
    from scheduler.detokenizer import Healer

    updates = healed_stream(pieces, healed)
    assert "".join(u.text for u in updates) == expected == Healer(healed).feed("".join(pieces))
    assert [t for u in updates for t in u.token_ids] == list(range(len(pieces)))  # ids untouched


def test_stop_strings_are_matched_on_the_text_after_the_healed_blanks():
    """OpenAI's stop strings never match the prompt: the healed blanks are the client's prompt, so a stop
    string that the model's text matches only together with them does not end the text (it did: " r"
    in "    return" cut the text at once, and the client got nothing)."""
    pieces = ["   ", " return", " x", "\n"]
    updates = healed_stream(pieces, "    ", stop=[" r"])
    assert "".join(u.text for u in updates) == "return x\n" and not any(u.stopped for u in updates[:-1])
    updates = healed_stream(pieces, "    ", stop=["re", " x"])  # both inside the text the client reads
    stopped = [u for u in updates if u.stopped]
    assert stopped[0].stopped == "stop" and "".join(u.text for u in updates) == ""
    assert [t for u in updates for t in u.token_ids] == [0, 1]  # through the stop string's tokens


def test_min_tokens_counts_the_healed_text_from_the_client_s_start():
    """vLLM's min_tokens: a stop string counts only if it ends inside or after the min_tokens-th token's
    text; with healing, that text is found in the text after the dropped blanks."""
    updates = healed_stream(["    ", "ab", "cb"], "    ", stop=["b"], min_tokens=3)
    assert "".join(u.text for u in updates) == "abc"
    assert any(u.stopped == "stop" for u in updates)


def test_bytes_that_are_no_utf8_stream_on_and_an_incomplete_character_waits(bpe_tokenizer):
    """A run of lone UTF-8 continuation bytes (each its own token: no character, ever) streams with a
    lag of one token instead of being held until the request ends (vLLM's rule, while the text ends
    with U+FFFD), and a character whose bytes are still arriving waits, however they interleave."""
    from integrations.token_bytes import BYTE_DECODER

    byte_id = {b: bpe_tokenizer.convert_tokens_to_ids(c) for c, b in BYTE_DECODER.items()}
    lone = [byte_id[0xAF]] * 6
    stream = TextStream(bpe_tokenizer)
    pieces = [stream.update(lone[:k]).text for k in range(1, len(lone) + 1)]
    assert pieces == [""] + ["\ufffd"] * 5 and stream.finish().text == "\ufffd"
    # "本" (E6 9C AC) one byte per step after two lone bytes: the bytes stream, the character waits whole
    mixed = [byte_id[0xAF], byte_id[0xAF], byte_id[0xE6], byte_id[0x9C], byte_id[0xAC], byte_id[ord("!")]]
    stream = TextStream(bpe_tokenizer)
    pieces = [stream.update(mixed[:k]).text for k in range(1, len(mixed) + 1)]
    assert "".join(pieces) + stream.finish().text == "\ufffd\ufffd本!" == bpe_tokenizer.decode(mixed)
    assert all(p in ("", "\ufffd", "本", "本!", "!") for p in pieces) and "本" in "".join(pieces[:5])


def test_a_character_split_by_a_skipped_special_token_is_not_released_early(bpe_tokenizer):
    """A special token (decoded as "" under skip_special_tokens) between a character's bytes: the
    byte-level decoder still joins them, so the held ids must have text of their own before the text
    before them is released (helper-160: "a\\ufffdb" streamed where the whole decode is "a😀b")."""
    from integrations.token_bytes import BYTE_DECODER

    byte_id = {b: bpe_tokenizer.convert_tokens_to_ids(c) for c, b in BYTE_DECODER.items()}
    special = bpe_tokenizer.all_special_ids[0]
    ids = [byte_id[ord("a")], byte_id[0xF0], byte_id[0x9F], byte_id[0x98], special, byte_id[0x80], byte_id[ord("b")]]
    stream = TextStream(bpe_tokenizer)
    pieces = [stream.update(ids[:k]).text for k in range(1, len(ids) + 1)]
    assert "".join(pieces) + stream.finish().text == bpe_tokenizer.decode(ids, skip_special_tokens=True) == "a😀b"
    assert all("\ufffd" not in p for p in pieces)


def test_a_character_missing_its_last_byte_holds_back_its_three_ids_only(bpe_tokenizer):
    """The text before a 4-byte character whose first 3 bytes came (3 ids: MAX_HELD_IDS) is released at
    once; the character waits for its last byte."""
    from integrations.token_bytes import BYTE_DECODER

    byte_id = {b: bpe_tokenizer.convert_tokens_to_ids(c) for c, b in BYTE_DECODER.items()}
    ids = [byte_id[ord("a")], byte_id[0xF0], byte_id[0x9F], byte_id[0x98]]
    stream = TextStream(bpe_tokenizer)
    assert stream.update(ids).text == "a"
    assert stream.update(ids + [byte_id[0x80]]).text == "😀"
