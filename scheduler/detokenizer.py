"""Incremental detokenization of a request's final ids, with stop strings and the deadline newline cut.

Decoders expose `stream_ids()`: generated ids that are final and contiguous from the generation start,
growing monotonically (ReFusion may add several per step). `TextStream` turns that growing list into
text deltas:
  - only complete characters are released (a byte-level BPE token can end inside a UTF-8 sequence);
  - the end of the text that could be the start of a stop string (the longest suffix that is a proper
    prefix of one) is held back, so a stop string that spans two steps is cut before any of it is sent;
    other text goes out at once (vLLM holds back len(longest stop) - 1 characters whatever they are);
  - a stop string ends the text just before it; after a deadline, the text may end after a newline;
    a tab-indented or CRLF client's stop strings are matched on its view of the text (client_view.py);
  - with min_tokens (vLLM's), a stop string counts only if it ends inside or after the text of the
    min_tokens-th id: one complete before that is passed over (vLLM checks no stop string before then);
  - token healing (`healed`: the spaces/tabs a prompt ended in, left out of it so that the model writes
    them inside its next token, which AR decoding enforces: decoding/healing.py): as much leading blank
    text as they stand for is dropped (Healer)
    before anything else, so the text, stop strings and the newline cut start where the client's
    prompt ended, as OpenAI's stop strings never match the prompt.
Ids are released once their text is decoded (a token ending inside a character waits for the rest),
even while that text waits for a possible stop string; at a stop string, through the end of the stop
string (its tokens were generated: usage counts them, as vLLM's does), so every decoder gives the same
ids for the same text, whether the stop string's tokens came in one step or several.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from decoding.healing import MODEL_TAB_WIDTH, blank_end, blank_width

if TYPE_CHECKING:
    from scheduler.client_view import CrlfView, TabView

REPLACEMENT_CHAR = "\ufffd"
MAX_HELD_IDS = 3  # the most ids held back for a character not yet complete (4 bytes at most: 3 before the last)
_LEADING_SPACES = re.compile(r"^ +", re.MULTILINE)


def tabs_for_spaces(text: str) -> str:
    """Each line's leading spaces as tabs (MODEL_TAB_WIDTH a tab); a remainder stays spaces. How a
    tab-indented document writes the model's text (integrations/editor/document.py)."""
    def indent(match: re.Match) -> str:
        levels, rest = divmod(len(match.group()), MODEL_TAB_WIDTH)
        return "\t" * levels + " " * rest

    return _LEADING_SPACES.sub(indent, text)


@dataclass
class TextUpdate:
    """What to send for one step: new text and the ids newly final (`ids_start`: the index of the first
    in the stream's ids); `stopped` says why the text ended ("stop": a stop string, "newline": the
    deadline newline cut), None while it goes on."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stopped: str | None = None
    ids_start: int = 0


def held_prefix_len(text: str, markers: list[str], limit: int | None = None) -> int:
    """Length of the longest suffix of `text` (at most `limit` characters) that is a proper prefix of one
    of `markers`: text that may still become a marker once more arrives (0 when none can)."""
    longest = max((len(m) for m in markers), default=1) - 1
    for n in range(min(len(text), longest, len(text) if limit is None else limit), 0, -1):
        tail = text[len(text) - n:]
        if any(m.startswith(tail) for m in markers):
            return n
    return 0


class Healer:
    """Drops the front of generated text that the healed whitespace already stands for, piece by piece:
    leading spaces/tabs while they stay within the healed whitespace's width in columns (a tab reaches
    the next multiple of MODEL_TAB_WIDTH, counted from the healed text's start), so "  \t" (4 columns)
    absorbs the four spaces the model writes. A newline or any other character ends the dropping.
    `dropped`: characters dropped so far."""

    def __init__(self, healed: str):
        self.width = blank_width(healed)
        self.column = 0
        self.dropped = 0
        self.done = not healed

    def feed(self, text: str) -> str:
        i = 0
        while not self.done and i < len(text):
            end = blank_end(self.column, text[i]) if text[i] in " \t" else None
            if end is None or end > self.width:
                self.done = True
                break
            self.column, i = end, i + 1
        self.dropped += i
        return text[i:]


def fast_decoder(tokenizer):
    """The `tokenizers` library's decode behind a transformers fast tokenizer, when calling it gives
    what `tokenizer.decode(ids, skip_special_tokens=True)` gives: transformers then only converts the
    ids and applies `clean_up_tokenization_spaces`, so this holds when that is off (it is for Qwen's
    and the shipped tokenizers). Its wrapper cost about 8x the decode itself per streamed step
    (bench/engine_overhead.py --profile). None: use `tokenizer.decode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) is not False:
        return None
    decode = getattr(backend, "decode", None)
    return decode if callable(decode) else None


class TextStream:
    """Turns a growing list of final ids into text deltas (see module docstring). `healed`: the blanks
    token healing left out of the prompt (only spaces and tabs; "" for none)."""

    def __init__(self, tokenizer, stop: list[str] | None = None, min_tokens: int = 0, healed: str = "",
                 view: TabView | CrlfView | None = None):
        self._tokenizer = tokenizer
        self._view = view  # stop strings are matched on the text as the client reads it (client_view.py)
        self._backend_decode = fast_decoder(tokenizer)
        self._healer = Healer(healed)
        self._stop = [s for s in (stop or []) if s]
        self._min_tokens = min_tokens if self._stop else 0
        self._stops_from: int | None = None if self._min_tokens > 1 else 0  # chars of the first min_tokens - 1 ids
        self._ids: list[int] = []
        self._text = ""  # decoded text of _ids[:_read_offset], less the healer's dropped front
        self._prefix_offset = 0  # _ids[_prefix_offset:_read_offset] decode to the tail of _text
        self._read_offset = 0
        self._sent_chars = 0
        self._sent_ids = 0
        self.done = False
        self.stop_word: str | None = None  # the stop string that ended the text, if one did
        self._stop_end = 0  # where in the text that stop string ends (its tokens are counted through there)

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return self._text[: self._sent_chars]

    @property
    def sent_ids(self) -> int:
        """How many of the ids taken have gone out with the text (the ids covering a stop string's text
        at most, once one ended it)."""
        return self._sent_ids

    @property
    def ids(self) -> list[int]:
        """Every id taken so far (sent, or held back for a stop string or an incomplete character)."""
        return list(self._ids)

    def update(self, ids: list[int], *, newline_cut: bool = False) -> TextUpdate:
        """Take the decoder's current stream_ids(); return what can be sent now."""
        if self.done:
            return TextUpdate()
        self._ids = list(ids)
        self._decode_new(final=False)
        return self._release(newline_cut=newline_cut, final=False)

    def finish(self, *, newline_cut: bool = False) -> TextUpdate:
        """The request ends: release everything held back (incomplete characters included)."""
        if self.done:
            return TextUpdate()
        self._decode_new(final=True)
        return self._release(newline_cut=newline_cut, final=True)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self, final: bool) -> None:
        if self._read_offset >= len(self._ids):
            return
        known = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full, end = self._decode(self._ids[self._prefix_offset :]), len(self._ids)
        if full.endswith(REPLACEMENT_CHAR) and not final:
            # The last token may end inside a character: wait for the rest of its bytes, but hold back
            # only the ids that may (a character spans at most 4 bytes, so at most MAX_HELD_IDS tokens)
            settled = self._settled(full, known)
            if settled is None:
                return
            full, end = settled
        self._text += self._healer.feed(full[len(known) :])
        self._prefix_offset, self._read_offset = self._read_offset, end

    def _settled(self, full: str, known: str) -> tuple[str, int] | None:
        """(text, end): the text of ids[prefix_offset:end] for the largest end that leaves 1 to
        MAX_HELD_IDS ids held and splits no character (their texts, decoded apart, join to `full`, and
        the held ids have text of their own: a special token decodes to "" while the byte-level decoder
        still joins the bytes around it), so that more bytes cannot change it: bytes that are no UTF-8
        (U+FFFD already) stream on with the next token. vLLM holds the whole text back while it ends with
        U+FFFD: a model writing such bytes streamed nothing until it ended (3,000 tokens of the random
        test model's). Relies on the decoder writing one U+FFFD per maximal invalid run (byte-level BPE,
        Python's errors="replace"); a byte-fallback tokenizer (one U+FFFD per byte) would stream U+FFFD
        for a character still arriving. None: keep waiting."""
        ids, start = self._ids, self._prefix_offset
        for end in range(len(ids) - 1, max(self._read_offset, len(ids) - MAX_HELD_IDS - 1), -1):
            head, tail = self._decode(ids[start:end]), self._decode(ids[end:])
            if tail and head.startswith(known) and head + tail == full:
                return head, end
        return None

    def _release(self, *, newline_cut: bool, final: bool) -> TextUpdate:
        start = self._sent_chars
        view = self._view.view(self._text, start, final) if self._view is not None and self._stop else None
        cut = self._find_stop(start) if view is None else self._find_stop_in_view(start, *view)
        stopped = "stop" if cut is not None else None
        if cut is None and newline_cut:
            newline = self._text.find("\n", start)
            if newline >= 0:
                cut, stopped = newline + 1, "newline"
        if cut is not None:
            end = cut
        elif final:
            end = len(self._text)
        elif view is not None:  # what may begin a stop string in the view, and what the view cannot say yet
            shown, at = view
            end = at[len(shown) - held_prefix_len(shown, self._stop, len(shown) - bisect.bisect_left(at, start))]
        else:
            end = len(self._text) - self._held_tail(start)
        update = TextUpdate(text=self._text[start:end], stopped=stopped)
        self._sent_chars = end
        # A stop string's own tokens were generated (and counted, as vLLM and OpenAI's usage count them):
        # the ids go through its end, whether a step brought them with the stop or before it
        covered = self._stop_end if stopped == "stop" else end
        ids_end = self._ids_covering(covered) if stopped else self._read_offset if not final else len(self._ids)
        if view is not None and not (stopped or final) and view[1][-1] < len(self._text):
            ids_end = self._sent_ids  # (an open indent's or a last "\r"'s ids wait: a stop string may still end there)
        update.token_ids = self._ids[self._sent_ids : max(self._sent_ids, ids_end)]
        update.ids_start = self._sent_ids
        self._sent_ids = max(self._sent_ids, ids_end)
        if stopped or final:
            self.done = True
            self._text = self._text[:end]
        return update

    def _held_tail(self, start: int) -> int:
        """Characters at the end of the unsent text (from `start`) that may begin a stop string."""
        return held_prefix_len(self._text, self._stop, len(self._text) - start)

    def _find_stop(self, start: int) -> int | None:
        """Earliest stop-string start in the unsent text. One starting earlier would have been complete
        (and cut) already: sent text never ends with what may begin a stop string (_held_tail)."""
        if not self._stops_open():
            return None
        hits = [(i, s) for i, s in ((self._text.find(s, max(start, self._stops_from - len(s) + 1)), s)
                                    for s in self._stop) if i >= 0]
        if not hits:
            return None
        index, self.stop_word = min(hits, key=lambda hit: hit[0])
        self._stop_end = index + len(self.stop_word)
        return index

    def _find_stop_in_view(self, start: int, view: str, at: list[int]) -> int | None:
        """_find_stop on the client's view (its view() from `start`, client_view.py; `at` its indices in the text): the
        earliest stop string whose view starts at or after `start` and ends past the min_tokens text."""
        if not self._stops_open():
            return None
        first, hits = bisect.bisect_left(at, start), []
        for stop in self._stop:
            index = view.find(stop, first)
            while index >= 0 and at[index + len(stop)] <= self._stops_from:
                index = view.find(stop, index + 1)
            if index >= 0:
                hits.append((at[index], at[index + len(stop)], stop))
        if not hits:
            return None
        cut, self._stop_end, self.stop_word = min(hits, key=lambda hit: hit[0])
        return cut

    def _stops_open(self) -> bool:
        """Whether stop strings are matched yet: vLLM checks none before min_tokens tokens. Sets
        _stops_from, the characters of the first min_tokens - 1 ids (a match must end past them)."""
        if self._stops_from is None:
            if len(self._ids) < self._min_tokens:
                return False
            # (a healer still dropping has dropped all of that text so far, and more only after it)
            self._stops_from = max(0, len(self._decode(self._ids[: self._min_tokens - 1])) - self._healer.dropped)
        return True

    def _ids_covering(self, num_chars: int) -> int:
        """The fewest ids whose text holds the text's first num_chars characters (used once, when a stop
        cuts it; the healer is done by then: there is text)."""
        return ids_covering(self._decode, self._ids, self._text, num_chars, dropped=self._healer.dropped,
                            start=self._sent_ids)


def ids_covering(decode, ids: list[int], text: str, num_chars: int, *, dropped: int = 0, start: int = 0) -> int:
    """The fewest of `ids` (at least `start`) whose text holds `text`'s first num_chars characters, where
    the text of ids[:k] is decode(ids[:k]) less its first `dropped` characters (what token healing dropped:
    Healer.dropped) and `text` is the text of all of `ids` or a prefix of it. A character split over byte
    tokens decodes as U+FFFD until its last byte: the ids run through that byte (a stop string ending in
    "本", three byte tokens, counted one). Should no prefix decode to the text itself (a tokenizer whose
    decode of a prefix is no prefix of the text), the fewest ids whose text is as long. Used by a stop
    string's cut here and by the editor's post-processing cuts (integrations/editor/runner.py)."""
    want, long_enough = text[:num_chars], None
    for k in range(start, len(ids) + 1):
        decoded = decode(ids[:k])[dropped:]
        if len(decoded) >= num_chars:
            if decoded[:num_chars] == want:
                return k
            long_enough = k if long_enough is None else long_enough
    return long_enough if long_enough is not None else len(ids)
