"""Byte-level BPE tokenizer for a ReFusion model trained from scratch, and `<|mask|>` for an existing one.

The tokenizer has the special tokens `<|endoftext|>` (EOS, also used as padding), `<|beginoftext|>` and
`<|mask|>` (ids 0, 1, 2 for a new tokenizer) and saves as tokenizer.json + tokenizer_config.json, which
transformers' AutoTokenizer loads.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

EOS = "<|endoftext|>"
BOT = "<|beginoftext|>"
MASK = "<|mask|>"

# Longest run of non-space characters the BPE trainer sees as one piece. The trainer's time grows about
# quadratically with a word's length (one word of 50,000 repeated letters took 13 s, of 200,000 took
# 209 s on a 2-core EPYC: a minified or generated file stalled `refusion train` for hours), and a merge
# longer than this is not worth a vocabulary entry.
MAX_WORD_CHARS = 256
_LONG_RUN = re.compile(r"\S{%d,}" % (MAX_WORD_CHARS + 1))


class TokenizerBuildError(ValueError):
    """A tokenizer argument is unusable. `field` names it; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `texts`; returns a transformers PreTrainedTokenizerFast (not saved).
    Runs of more than MAX_WORD_CHARS non-space characters are cut into pieces of that length for the
    trainer (see MAX_WORD_CHARS); other text is trained on as given. Raises TokenizerBuildError (field
    "vocab_size") below 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise TokenizerBuildError(
            "vocab_size", f"got {vocab_size}; byte-level BPE needs at least 300 (256 bytes + specials)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOT, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bpe_pieces(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, mask_token=MASK, additional_special_tokens=[BOT]
    )


def _bpe_pieces(texts: Iterable[str]) -> Iterator[str]:
    """Each text, with every run of more than MAX_WORD_CHARS non-space characters split off and cut into
    MAX_WORD_CHARS-long pieces; texts without such a run pass through whole."""
    for text in texts:
        pos = 0
        for run in _LONG_RUN.finditer(text):
            if run.start() > pos:
                yield text[pos : run.start()]
            ends = range(run.start(), run.end(), MAX_WORD_CHARS)
            yield from (text[i : min(i + MAX_WORD_CHARS, run.end())] for i in ends)
            pos = run.end()
        if pos < len(text):
            yield text[pos:]


def ensure_mask_token(tokenizer) -> bool:
    """Add `<|mask|>` (and `<|beginoftext|>`) to an existing tokenizer when missing; returns whether it
    grew (the model then needs an embedding row for each new id)."""
    before = len(tokenizer)
    vocab = tokenizer.get_vocab()
    if MASK not in vocab:
        tokenizer.add_special_tokens({"mask_token": MASK})
    elif tokenizer.mask_token is None:
        tokenizer.mask_token = MASK
    if BOT not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [BOT]})
    if tokenizer.eos_token is None:
        raise TokenizerBuildError("init", "the tokenizer has no eos_token; ReFusion needs one to end responses")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer.get_vocab()
    for added in (MASK, BOT):  # transformers adds at len(tokenizer): a vocabulary with a gap in its ids
        shared = [t for t, i in ids.items() if i == ids[added] and t != added]  # gives an id already taken
        if shared:
            raise TokenizerBuildError("init", f"the tokenizer's ids have a gap, so {added} got id {ids[added]}, "
                                              f"which {shared[0]!r} already has; give a tokenizer whose ids run "
                                              f"0..N-1, or one that has {added}")
    return len(tokenizer) != before
