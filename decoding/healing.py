"""Token healing on the AR path: the first generated tokens are held to writing the blanks the prompt lost.

A text prompt that ends in spaces or tabs is tokenized without them (GenerationRequest.healed): a
byte-level BPE keeps a word's leading space inside the word's token, so a prompt ending on a lone " "
token ends where the model never saw text go on. The detokenizer (scheduler.detokenizer.Healer) drops
as much leading blank text from the output as the healed blanks stand for, in columns: a space is one,
a tab reaches the next multiple of MODEL_TAB_WIDTH, counted from the healed text's start; a newline or
any other character ends the dropping. The client then reads prompt + text, the model wrote
prompt-without-blanks + output, and the two agree only if the output's leading blanks land exactly on
the healed width before anything else. Nothing in the model's choice makes them do so (the shipped
model continues "import " as "_name()", so the client read "import _name()" where the model wrote
"import_name()"), so while the width is not reached each read carries a token bitmask
(Segment.token_bitmask) allowing exactly the tokens that keep the output consistent:
  - a token whose leading blanks, walked from the current column, land on the width before any other
    character or the token's end (what follows is the model's own text, an extra blank included);
  - a token of blanks alone that stays short of the width (the next read goes on from its column);
  - the request's end tokens (DecodeParams.ends): an empty completion adds nothing to the client's
    prompt, and forcing blanks onto a model that means to stop would make it write on;
never a token with no text (special tokens decode to ""), one of `never` (the mask token), nor an id
past the tokenizer's. Guidance's token healing constrains the next token to start with the text it
took off the prompt the same way; here only the trailing blanks are taken off.

A token's text is its decode alone (skip_special_tokens, as scheduler.detokenizer.TextStream decodes):
exact for the leading blanks of a byte-level BPE token (ASCII bytes). The vocabulary is walked once per
tokenizer (`HealingVocab.build`, ~0.1 s for a 150k vocabulary: keep it off the engine loop), its tokens
grouped by their leading blanks; the bitmask for a (width, column, ends) is built from the groups and
cached. Plain Python and numpy: no torch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Spaces per indent level in the model's text (a tab's columns), as Python code (PEP 8) and the
# training corpus indent; the editor's document conversion (integrations/editor/document.py) uses it.
MODEL_TAB_WIDTH = 4
BLANKS = " \t"
MAX_CACHED_MASKS = 256  # (width, column, ends) bitmasks kept per vocabulary, least recently used dropped


def blank_end(column: int, char: str) -> int:
    """The column after one space or tab starting at `column` (tab stops every MODEL_TAB_WIDTH)."""
    return column + 1 if char == " " else (column // MODEL_TAB_WIDTH + 1) * MODEL_TAB_WIDTH


def blank_width(blanks: str) -> int:
    """The columns a run of spaces and tabs spans from column 0."""
    width = 0
    for char in blanks:
        width = blank_end(width, char)
    return width


def lands(lead: str, all_blank: bool, column: int, width: int) -> int | None:
    """Where a token with leading blanks `lead` (`all_blank`: nothing else in its text) leaves a healing
    at `column` of `width`: `width` when its blanks land on it (healing done), a column below it when
    the token is blanks alone and stays short; None when the token breaks the rule (a blank past the
    width, another character first, no text)."""
    for char in lead:
        column = blank_end(column, char)
        if column >= width:
            return column if column == width else None
    return column if all_blank and lead else None


class HealingVocab:
    """One tokenizer's tokens grouped by their leading blanks, and the healing bitmasks built from them
    (module doc). `vocab_size` is the model's (the logits' width; ids past the tokenizer's are never
    allowed); `never`: ids never allowed (the mask token; special tokens decode to "" and are out anyway).
    Shared by every request of one engine; thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, never: tuple[int, ...] = ()):
        self._tokenizer, self.vocab_size, self._never = tokenizer, vocab_size, tuple(never)
        self._lock = threading.Lock()
        self._groups: np.ndarray | None = None  # [tokens] int32: each token's group
        self._leads: list[tuple[str, bool]] = []  # group -> (leading blanks, blanks alone)
        self._masks: OrderedDict[tuple, bytes] = OrderedDict()

    @property
    def built(self) -> bool:
        return self._groups is not None

    def build(self) -> None:
        """Walk the vocabulary once (idempotent)."""
        with self._lock:
            if self._groups is not None:
                return
            known = len(self._tokenizer) if hasattr(self._tokenizer, "__len__") else self.vocab_size
            count = min(known, self.vocab_size)
            singles = [[t] for t in range(count)]
            backend = getattr(self._tokenizer, "backend_tokenizer", None)
            if backend is not None and callable(getattr(backend, "decode_batch", None)):
                texts = backend.decode_batch(singles, skip_special_tokens=True)
            else:
                texts = [self._tokenizer.decode(ids, skip_special_tokens=True) for ids in singles]
            index: dict[tuple[str, bool], int] = {}
            groups = np.empty(count, dtype=np.int32)
            for t, text in enumerate(texts):
                lead = text[: len(text) - len(text.lstrip(BLANKS))]
                groups[t] = index.setdefault((lead, bool(text) and lead == text), len(index))
            self._leads, self._groups = list(index), groups

    def token_lead(self, token: int) -> tuple[str, bool]:
        """(leading blanks, blanks alone) of `token`'s text; ("", False) for an id past the tokenizer's."""
        self.build()
        return self._leads[self._groups[token]] if 0 <= token < len(self._groups) else ("", False)

    def bitmask(self, width: int, column: int, ends: frozenset[int]) -> bytes:
        """The tokens allowed at `column` of a healing `width` columns wide (0 <= column < width), ends
        included: one bit per token id (byte t // 8, bit t % 8, least significant first), ceil(vocab_size
        / 8) bytes (Segment.token_bitmask)."""
        key = (width, column, ends)
        with self._lock:
            if key in self._masks:
                self._masks.move_to_end(key)
                return self._masks[key]
        self.build()
        fits = np.array([lands(lead, alone, column, width) is not None for lead, alone in self._leads], dtype=bool)
        allowed = np.zeros(self.vocab_size, dtype=bool)
        allowed[: len(self._groups)] = fits[self._groups]
        allowed[[t for t in self._never if 0 <= t < self.vocab_size]] = False
        allowed[[t for t in ends if 0 <= t < self.vocab_size]] = True
        mask = np.packbits(allowed, bitorder="little").tobytes()
        with self._lock:
            self._masks[key] = mask
            while len(self._masks) > MAX_CACHED_MASKS:
                self._masks.popitem(last=False)
        return mask


@dataclass(frozen=True)
class Healing:
    """A request's token healing: the blanks left out of its prompt (GenerationRequest.healed, non-empty)
    and its end tokens, on its engine's vocabulary. `constraint()` gives each decoder run a fresh one."""

    vocab: HealingVocab
    healed: str
    ends: frozenset[int]

    def constraint(self) -> "HealingConstraint":
        return HealingConstraint(self.vocab, blank_width(self.healed), self.ends)


class HealingConstraint:
    """One AR decoder run's progress through the healed blanks: `pending` while the output's blanks have
    not reached the healed width; `bitmask()` the tokens allowed next then; `consume(token)` after each
    generated token (nothing once done)."""

    def __init__(self, vocab: HealingVocab, width: int, ends: frozenset[int]):
        self._vocab, self.width, self._ends = vocab, width, ends
        self.column = 0
        self.pending = width > 0

    def bitmask(self) -> bytes:
        if not self.pending:
            raise RuntimeError("the healed blanks are written: no healing bitmask")
        return self._vocab.bitmask(self.width, self.column, self._ends)

    def consume(self, token: int) -> None:
        """Advance past a generated token. A token that breaks the rule (an end token, or one read
        without the bitmask) ends the healing: the text is then what the detokenizer makes of it."""
        if not self.pending:
            return
        column = lands(*self._vocab.token_lead(token), self.column, self.width)
        if column is None or column == self.width:
            self.pending = False
        else:
            self.column = column
