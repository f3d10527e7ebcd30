"""integrations/openai_logprobs.py on the shipped tokenizer: OpenAI's completions and chat shapes, the
chosen token always in a completions top dict, text offsets continuing across streamed chunks, and a
token's exact bytes where its text alone is not valid UTF-8."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations.openai_logprobs import LogprobFormatter
from workers.batch import TokenLogprob

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED)


def test_completion_shape_offsets_and_the_chosen_token(tokenizer):
    ids = tokenizer.encode("def add(a, b):\n    return a + b", add_special_tokens=False)
    entries = [TokenLogprob(t, -0.5, ((t, -0.5), (ids[0], -1.5))) for t in ids]
    entries[2] = TokenLogprob(ids[2], -3.0, ((ids[0], -0.1), (ids[1], -0.2)))  # sampled: not among the top
    formatter = LogprobFormatter(tokenizer, 1)
    first, second = formatter.completion(entries[:3]), formatter.completion(entries[3:])
    tokens = first["tokens"] + second["tokens"]
    assert "".join(tokens) == tokenizer.decode(ids)
    assert first["text_offset"] + second["text_offset"] == [len("".join(tokens[:i])) for i in range(len(ids))]
    top = first["top_logprobs"][2]  # N = 1 most likely, plus the chosen token (OpenAI: up to N + 1)
    assert top == {tokenizer.decode([ids[0]]): -0.1, tokenizer.decode([ids[2]]): -3.0}
    assert first["token_logprobs"] == [-0.5, -0.5, -3.0]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_text_offsets_skip_the_healed_blanks(tokenizer, split):
    """A healed prompt ("def f():\n" + "    " left out): the model writes the indentation itself and the
    engine drops it from the text (scheduler.detokenizer.Healer). The tokens keep their own strings, and
    text_offset counts the text the client gets, however the chunks split the tokens."""
    written = "    return a + b"
    ids = tokenizer.encode(written, add_special_tokens=False)
    assert tokenizer.decode(ids[:1]).startswith(" ")
    entries = [TokenLogprob(t, -0.5, ()) for t in ids]
    formatter = LogprobFormatter(tokenizer, 0, healed="    ")
    parts = [formatter.completion(entries[:split]), formatter.completion(entries[split:])]
    tokens = [t for p in parts for t in p["tokens"]]
    offsets = [o for p in parts for o in p["text_offset"]]
    assert "".join(tokens) == written
    text = written[4:]
    assert offsets == [max(0, len("".join(tokens[:i])) - 4) for i in range(len(ids))]
    assert text.startswith("return") and offsets[-1] == text.rindex(tokens[-1])


def test_text_offsets_count_characters_of_the_bytes_not_token_strings(tokenizer):
    """A character split over byte tokens is one character of the text: the tokens that carry its
    bytes start at its offset, and later tokens are not shifted by the U+FFFD their strings show;
    a special token (left out of the text) takes no room."""
    text = "naïve → 日本 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    ids = ids[:3] + [eos] + ids[3:]
    formatter = LogprobFormatter(tokenizer, 0)
    offsets = [o for k in range(0, len(ids), 3) for o in formatter.completion(
        [TokenLogprob(t, -1.0) for t in ids[k:k + 3]])["text_offset"]]
    raw = [b"" if t == eos else bytes(formatter.token_bytes(t)) for t in ids]
    want = [len(b"".join(raw[:k]).decode("utf-8", "ignore")) for k in range(len(ids))]
    assert offsets == want and any("\ufffd" in formatter.text(t) for t in ids)
    assert offsets[-1] < len(text)


def test_text_offsets_after_a_broken_character(tokenizer):
    """A lone UTF-8 lead byte followed by a token that does not continue it shows as U+FFFD in the text:
    the next token starts after it; and an echoed prompt that ends inside a character is decoded on its
    own (the echoed text shows U+FFFD there), so the completion's tokens start after it too."""
    lead = next(t for t in range(len(tokenizer)) if bytes(LogprobFormatter(tokenizer, 0).token_bytes(t)) == b"\xc3")
    x = tokenizer.encode("x", add_special_tokens=False)[0]
    formatter = LogprobFormatter(tokenizer, 0)
    assert formatter.completion([TokenLogprob(t, -1.0) for t in (lead, x, lead, lead)])["text_offset"] == [0, 1, 2, 3]
    echoed = LogprobFormatter(tokenizer, 0, echo_tokens=2)
    offsets = echoed.completion([TokenLogprob(x, None), TokenLogprob(lead, -1.0)])["text_offset"]
    offsets += echoed.completion([TokenLogprob(x, -1.0)])["text_offset"]  # the completion: "x" after "x\ufffd"
    assert offsets == [0, 1, 2]


def test_chat_entries_carry_exact_bytes(tokenizer):
    ids = tokenizer.encode("naïve → 日本", add_special_tokens=False)
    partial = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert partial  # the shipped vocabulary splits some of these characters into byte tokens
    formatter = LogprobFormatter(tokenizer, 2)
    content = formatter.chat([TokenLogprob(t, -1.0, ((t, -1.0),)) for t in ids])
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8") == "naïve → 日本"
    for entry in content:
        assert entry["top_logprobs"] == [{"token": entry["token"], "logprob": -1.0, "bytes": entry["bytes"]}]
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    [eos] = formatter.chat([TokenLogprob(special, -2.0)])
    assert eos["token"] == tokenizer.eos_token and bytes(eos["bytes"]).decode() == tokenizer.eos_token
    assert eos["top_logprobs"] == []
