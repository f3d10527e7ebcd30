"""OpenAI `logprobs` objects from the engine's per-token entries (scheduler.api.Delta.logprobs, one
workers.batch.TokenLogprob per generated id).

Shapes, as OpenAI documents them and vLLM returns them:
  - completions (`logprobs: N`): {"tokens": [str], "token_logprobs": [float], "top_logprobs": [{str:
    float}], "text_offset": [int]}; each top dict holds the N most likely tokens plus the chosen one ("up
    to logprobs+1 elements"), text_offset is where each token's text starts in the returned text
    (after token healing's dropped blanks: a healed token's string keeps them, its text does not),
    counted in characters of the UTF-8 decoded bytes (a token that starts inside a character split over
    several tokens gets that character's offset; special tokens, which the generated text leaves out,
    add none, but those of an echoed prompt, whose text shows them, do). With `echo` the prompt's tokens
    come first, the first with null logprob and top_logprobs (as OpenAI's and vLLM's);
  - chat (`logprobs: true, top_logprobs: N`): {"content": [{"token", "logprob", "bytes", "top_logprobs":
    [{"token", "logprob", "bytes"}] (N, best first)}], "refusal": null}.
  - vLLM's `prompt_logprobs: N` (both routes, not streamed): [None, {"token id": {"logprob", "rank",
    "decoded_token"}}, ...], one entry per prompt token (LogprobFormatter.prompt_logprobs).
A token's string is its own text (a token that ends inside a UTF-8 character shows U+FFFD there, as
its decode does); `bytes` are its exact UTF-8 bytes (byte-level BPE tokenizers: the token's own bytes).
The values are the model's log probabilities before temperature, top-k and top-p (vLLM's default
raw_logprobs; workers/batch.py, "Reads"); -9999.0 stands for a probability of 0.
"""

from __future__ import annotations

import codecs

from integrations.token_bytes import token_bytes
from scheduler.detokenizer import Healer


class LogprobFormatter:
    """Turns TokenLogprob entries into OpenAI's objects for one response (token strings cached)."""

    def __init__(self, tokenizer, num_top: int, echo_tokens: int = 0, healed: str = ""):
        """healed: the blanks token healing left out of a completions prompt (GenerationRequest.healed):
        the engine drops as much from the front of the generated text, so text_offset skips it too
        (the tokens' strings stay their own text)."""
        self.tokenizer = tokenizer
        self.num_top = num_top
        self._echo_left = echo_tokens  # completions: entries still to come of the echoed prompt
        self._healer = Healer(healed)
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._offset = 0  # completions: characters of text returned before the next token
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # bytes so far -> whole characters
        self._special = set(getattr(tokenizer, "all_special_ids", ()))  # left out of the returned text
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"  # token strings are byte-level text

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._text[token]

    def token_bytes(self, token: int) -> list[int]:
        if token not in self._bytes:
            data = token_bytes(self.tokenizer, token) if self._byte_level else None
            # a special token, or a tokenizer that is not byte-level: its decoded text
            self._bytes[token] = list(data if data is not None else self.text(token).encode("utf-8"))
        return self._bytes[token]

    def completion(self, entries) -> dict:
        """The completions object of these entries; offsets continue from the previous call's."""
        tokens, offsets = [], []
        for e in entries:
            tokens.append(self.text(e.token))
            data = bytes(self.token_bytes(e.token))
            counted = bool(self._echo_left) or e.token not in self._special  # its text is in the returned text
            pending = self._utf8.getstate()[0]  # bytes of a character not complete yet
            # A token that does not continue that character (no UTF-8 continuation byte first) starts
            # after the U+FFFD the pending bytes become: the text shows them before this token
            broken = counted and pending and not (data and 0x80 <= data[0] <= 0xBF)
            offsets.append(self._offset + (len(pending.decode("utf-8", "replace")) if broken else 0))
            if counted:
                piece = self._utf8.decode(data)
                self._offset += len(piece if self._echo_left else self._healer.feed(piece))
            if self._echo_left == 1:  # the echoed prompt's text is decoded on its own, the completion's after it
                self._offset += len(self._utf8.decode(b"", final=True))
            self._echo_left = max(0, self._echo_left - 1)
        top = [None if e.logprob is None  # an echoed prompt's first token: OpenAI's null
               else {**{self.text(t): v for t, v in e.top[:self.num_top]}, self.text(e.token): e.logprob}
               for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}

    def chat(self, entries) -> list[dict]:
        """The chat `content` list of these entries."""
        return [{**self._chat_token(e.token, e.logprob),
                 "top_logprobs": [self._chat_token(t, v) for t, v in e.top[:self.num_top]]} for e in entries]

    def _chat_token(self, token: int, logprob: float) -> dict:
        return {"token": self.text(token), "logprob": logprob, "bytes": self.token_bytes(token)}

    def prompt_logprobs(self, entries) -> list[dict | None]:
        """vLLM's `prompt_logprobs` list of a prompt scored by the engine (entries: TokenLogprob of prompt
        tokens 1 .. P-1, Delta.prompt_logprobs): None for the first token (nothing precedes it), then per
        token {"token id": {"logprob", "rank", "decoded_token"}}, the prompt's own token first, then the
        num_top most likely (ranks 1 .. num_top; a prompt token among them keeps one key), as vLLM's
        OpenAI server returns them (vllm/logprobs.py, `Logprob`): one entry per prompt token."""
        out: list[dict | None] = [None]
        for e in entries:
            position = {str(e.token): self._ranked(e.token, e.logprob, e.rank)}
            for rank, (t, v) in enumerate(e.top[:self.num_top], 1):
                position.setdefault(str(t), self._ranked(t, v, rank))
            out.append(position)
        return out

    def _ranked(self, token: int, logprob: float, rank: int | None) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.text(token)}


def merge_completion(parts: list[dict]) -> dict:
    """One completions logprobs object from consecutive ones (a non-streamed response)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [v for p in parts for v in p[k]] for k in keys}
