"""The exact bytes of a token of a byte-level BPE tokenizer (GPT-2's scheme, which Qwen3's and the
shipped model's tokenizers use): each byte is written as one printable character, so a token's string
maps back to its bytes even when they end inside a UTF-8 character (where decode() shows U+FFFD).
Used by /tokenize's pieces (llama.cpp) and the OpenAI logprobs' `bytes`."""

from __future__ import annotations


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's character -> byte map (the inverse of its bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The token's bytes, or None when its string is not byte-level text (a special or added token, or
    a tokenizer of another kind): the caller then uses its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str) or not all(ch in BYTE_DECODER for ch in piece):
        return None
    return bytes(BYTE_DECODER[ch] for ch in piece)
