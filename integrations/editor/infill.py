"""Infill the ReFusion way: prompt building (pure Python). Gap lengths and the candidate choice: gaps.py.

ReFusion was trained with clean slots in any order, so the text after the cursor is given to the
decoder as already-generated slots at their logical positions after the gap
(`GenerationRequest.suffix_ids`); the middle is decoded with the suffix in view. The gap length is
the one thing the editor does not know, so a completion decodes one or more candidate gap lengths
as parallel requests and keeps one (`choose_candidate`). docs/editor-protocol.md, "Infill strategy".

`build_infill_prompt` is the single place that turns (context, prefix, suffix) into token ids: the
editor protocol, llama.cpp's /infill and `suffix` on /v1/completions all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from integrations.editor.document import DocumentStyle, cursor_at_indent
from integrations.editor.gaps import (MULTILINE_GAPS, SINGLE_LINE_GAPS, SLOT_SIZE, Candidate, capped_gaps,
                                      choose_candidate, fitting_gaps, gap_cap, gap_params, infill_room, longest_gap,
                                      no_room_message, plan_gaps, strategy_gaps)
from integrations.editor.postprocess import REPLACEMENT
from integrations.request_limits import encode
from scheduler.detokenizer import Healer

# Prompt building's own names, and the gap names as they were imported from here (their home: gaps.py)
__all__ = ["MAX_CHARS_PER_TOKEN", "MAX_CONTEXT_TOKENS", "MAX_CURSOR_LINE", "MAX_PREFIX_TOKENS", "MAX_SUFFIX_TOKENS",
           "MULTILINE_GAPS", "SINGLE_LINE_GAPS", "SLOT_SIZE", "Candidate", "InfillPrompt", "build_infill_prompt",
           "capped_gaps", "choose_candidate", "fitting_gaps", "format_context", "gap_cap", "gap_params", "heal_text",
           "infill_room", "longest_gap", "no_room_message", "plan_gaps", "split_room", "strategy_gaps"]

# Token budgets of the prompt parts: the prefix is kept from its end, the suffix from its start.
MAX_PREFIX_TOKENS = 1536
MAX_SUFFIX_TOKENS = 384
MAX_CONTEXT_TOKENS = 1024
# Text is cut to budget x this many characters before tokenizing, so tokenizing costs the budget, not
# the document (an editor may send 200,000 characters of prefix for 1,536 tokens). BPE tokens of code
# average 3-4 characters; runs of indentation are the longest common ones.
MAX_CHARS_PER_TOKEN = 16
MAX_CURSOR_LINE = 4096  # characters of the cursor's line before it that the rules read (postprocess.Rules.line_prefix)

_LINE_COMMENT = {"python": "#", "ruby": "#", "shell": "#", "sh": "#", "bash": "#", "yaml": "#", "toml": "#",
                 "r": "#", "perl": "#", "lua": "--", "sql": "--", "haskell": "--"}  # fmt: skip


@dataclass
class InfillPrompt:
    """Token ids for one infill. suffix_ids is None when there is no text after the cursor."""

    prompt_ids: list[int]
    suffix_ids: list[int] | None
    truncated: bool = False  # some prefix, suffix or context did not fit its budget
    context_tokens: int = 0  # leading prompt tokens that came from context chunks (stable, cacheable)
    healed: str = ""  # trailing spaces/tabs left out of the prompt; the model writes them (see heal_text)
    style: DocumentStyle = DocumentStyle()  # the document's line endings and indentation (document.py)
    at_indent: bool = True  # only tabs (or nothing) stand before the cursor on its line
    # The prompt's text (context, prefix or suffix) holds U+FFFD itself, so the model may copy it: the
    # invalid-bytes rule stays off (postprocess.Rules.cut_invalid)
    holds_replacement: bool = False
    cursor_line: str = ""  # the prefix's text on the cursor's line, in the model's style (postprocess.Rules)

    def to_document(self, text: str) -> str:
        """A completion (model text, seen from the cursor) in the document's line endings and indent."""
        return self.style.to_document(text, at_indent=self.at_indent)


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of document text: a special token's spelling in it ("<|endoftext|>" in a tokenizer's source,
    "<|mask|>") is plain characters, never the EOS or a mask position, as llama.cpp's /infill tokenizes
    prefix, suffix and input_extra (parse_special false)."""
    return encode(tokenizer, text, parse_special=False)


def format_context(chunks: Sequence, language: str = "") -> str:
    """Context chunks as plain code: a comment line naming the file, then its text."""
    parts = ["".join(_chunk_parts(chunk, language)) for chunk in chunks]
    return "\n".join(parts) + ("\n" if parts else "")


def _chunk_parts(chunk, language: str) -> tuple[str, str]:
    """(header, text) of one context chunk: the comment line naming its path ("" without a path) and
    its text ending in a line break."""
    comment = _LINE_COMMENT.get(language.lower(), "#" if not language else "//")
    path, text = (chunk.path, chunk.text) if hasattr(chunk, "path") else (chunk.get("path", ""), chunk["text"])
    return (f"{comment} {path}\n" if path else ""), text + ("" if text.endswith("\n") else "\n")


def build_infill_prompt(
    tokenizer,
    prefix: str,
    suffix: str = "",
    context: Sequence = (),
    language: str = "",
    max_prefix_tokens: int = MAX_PREFIX_TOKENS,
    max_suffix_tokens: int = MAX_SUFFIX_TOKENS,
    max_context_tokens: int = MAX_CONTEXT_TOKENS,
    room: int = 0,
) -> InfillPrompt:
    """prompt = context chunks (oldest dropped first) + prefix (its end); suffix = its start.

    `room`: the most tokens prompt and suffix may hold together (the model's context less the longest
    gap, `infill_room`); prefix and suffix are cut to it as they fill it (`split_room`), and context
    chunks get what they leave, at most their budget; 0: the budgets alone.

    Context comes first so that it, not the moving prefix, is the stable part a prefix cache reuses.
    Parts are tokenized separately: a boundary inside a token costs nothing to correctness here.
    They are document text, tokenized as plain text (`_encode`): "<|endoftext|>" in a file is its characters.
    Each part's text is first cut to its budget x MAX_CHARS_PER_TOKEN characters (the far end goes),
    so the cost of tokenizing is bounded by the budgets. CPU-bound: callers on an event loop run it in
    integrations.request_limits.off_loop.

    Token healing: byte-level BPE puts a word's leading space inside the word's token ("   " + " return"),
    so a prompt ending in the editor's indentation ("    ") asks the model for text it never saw in
    training, and it answers with one space too many. Trailing spaces/tabs are therefore left out of
    the prompt (`healed`); the model writes the whitespace itself and the engine drops that much
    of it from the front of the output (GenerationRequest.healed; heal_text on a whole text).

    Line endings and indentation: prefix, suffix and context are converted to the model's text (LF,
    spaces) first; `InfillPrompt.to_document` converts a completion back (document.py).
    """
    style = DocumentStyle.of(prefix, suffix)
    at_indent = cursor_at_indent(prefix)
    prefix, suffix = style.to_model(prefix), style.to_model(suffix)
    kept = prefix.rstrip(" \t")
    healed = prefix[len(kept):]
    prefix_ids, prefix_cut = _prefix_end_ids(tokenizer, kept, max_prefix_tokens)
    suffix, suffix_ids, suffix_cut = _suffix_start(tokenizer, suffix, max_suffix_tokens)  # (the cut text: `holds`)
    truncated = prefix_cut or suffix_cut
    if room:
        # A prompt of no token gets one (below): an empty prefix keeps that one from the suffix's share
        keep_prefix, keep_suffix = split_room(room, max(1, len(prefix_ids)), len(suffix_ids),
                                              max_prefix_tokens, max_suffix_tokens)
        if keep_prefix < len(prefix_ids) or keep_suffix < len(suffix_ids):
            prefix_ids, suffix_ids, truncated = prefix_ids[len(prefix_ids) - keep_prefix:], suffix_ids[:keep_suffix], True
        max_context_tokens = max(0, min(max_context_tokens, room - len(prefix_ids) - len(suffix_ids)))
    context_ids, context_cut = _context_ids(tokenizer, context, language, max_context_tokens)
    truncated = truncated or context_cut
    prompt_ids = context_ids + prefix_ids
    if not prompt_ids:
        # A completion at the very start of an empty file: give the model something to attend to.
        prompt_ids = _encode(tokenizer, "\n") or [tokenizer.eos_token_id]
    holds = REPLACEMENT in prefix or REPLACEMENT in suffix or any(REPLACEMENT in "".join(_chunk_parts(c, language))
                                                                  for c in context)
    return InfillPrompt(prompt_ids, suffix_ids or None, truncated, len(context_ids), healed, style, at_indent, holds,
                        prefix[prefix.rfind("\n") + 1:][-MAX_CURSOR_LINE:])


def _prefix_end_ids(tokenizer, prefix: str, budget: int) -> tuple[list[int], bool]:
    """Ids of the end of `prefix` within `budget` tokens (its text first cut to budget x
    MAX_CHARS_PER_TOKEN characters, so tokenizing costs at most that), and whether any was cut."""
    truncated = False
    if len(prefix) > budget * MAX_CHARS_PER_TOKEN:
        prefix, truncated = prefix[-budget * MAX_CHARS_PER_TOKEN:], True
    prefix_ids = _encode(tokenizer, prefix)
    if len(prefix_ids) > budget:
        prefix_ids, truncated = prefix_ids[-budget:], True
    return prefix_ids, truncated


def _suffix_start(tokenizer, suffix: str, budget: int) -> tuple[str, list[int], bool]:
    """(text, ids, cut): `suffix` cut to budget x MAX_CHARS_PER_TOKEN characters, the ids of its start
    within `budget` tokens, and whether any was cut."""
    truncated = False
    if len(suffix) > budget * MAX_CHARS_PER_TOKEN:
        suffix, truncated = suffix[:budget * MAX_CHARS_PER_TOKEN], True
    suffix_ids = _encode(tokenizer, suffix)
    if len(suffix_ids) > budget:
        suffix_ids, truncated = suffix_ids[:budget], True
    return suffix, suffix_ids, truncated


def split_room(room: int, prefix: int, suffix: int, prefix_budget: int, suffix_budget: int) -> tuple[int, int]:
    """How many of `prefix` and `suffix` tokens an infill of `room` tokens keeps: all when they fit, else
    shares in the proportion of their budgets (4:1 by default, as llama.cpp's /infill cuts them 3:1 of
    its batch), a share one of them does not fill going to the other. At least one prefix token when
    there is one and room for it."""
    if prefix + suffix <= room:
        return prefix, suffix
    prefix_share = max(min(1, prefix), room * prefix_budget // (prefix_budget + suffix_budget))
    suffix_share = room - prefix_share
    if suffix < suffix_share:
        return room - suffix, suffix
    if prefix < prefix_share:
        return prefix, room - prefix
    return prefix_share, suffix_share


def _context_ids(tokenizer, context: Sequence, language: str, budget: int) -> tuple[list[int], bool]:
    """Ids of the context chunks within `budget` tokens (newest kept first, each with its path line), and
    whether any was cut or left out."""
    truncated, context_ids = False, []
    for chunk in reversed(list(context)):  # newest chunks (end of the list) are kept first
        header, text = _chunk_parts(chunk, language)
        chunk_style = DocumentStyle.of(text)
        header, text = chunk_style.to_model(header), chunk_style.to_model(text + "\n")  # a blank line after
        room = budget - len(context_ids)
        ids = _encode(tokenizer, header + text) if len(header + text) <= room * MAX_CHARS_PER_TOKEN else None
        if ids is None or len(ids) > room:
            # The chunk that crosses the budget keeps its path line and its last whole lines that fit
            # (llama.cpp keeps the newest tokens of input_extra too); older chunks do not fit after it.
            # One with no line that fits is left out, and older ones are tried.
            truncated = True
            kept = _header_and_tail(tokenizer, header, text, room)
            context_ids = kept + context_ids
            if kept:
                break
            continue
        context_ids = ids + context_ids
    return context_ids, truncated


def _header_and_tail(tokenizer, header: str, text: str, budget: int) -> list[int]:
    """Ids of a context chunk cut to `budget` tokens: its header and the longest run of its last whole
    lines that fits after it; [] when no line with text fits (blank lines alone are not context)."""
    header_ids = _encode(tokenizer, header)
    room = budget - len(header_ids)
    if room <= 0:
        return []
    window = text[-room * MAX_CHARS_PER_TOKEN:]  # bounded tokenizing, as for the other parts
    starts = [i + 1 for i, ch in enumerate(window[:-1]) if ch == "\n"]
    if len(window) == len(text):
        starts.insert(0, 0)  # the text's own start is a line start; a cut window's is not
    lo, hi, best, best_ids = 0, len(starts) - 1, None, []
    while lo <= hi:  # the earliest line start whose tail fits (a longer tail has more tokens)
        mid = (lo + hi) // 2
        ids = _encode(tokenizer, window[starts[mid]:])
        if len(ids) <= room:
            best, best_ids, hi = mid, ids, mid - 1
        else:
            lo = mid + 1
    if best is None or not window[starts[best]:].strip():
        return []
    return header_ids + best_ids


def heal_text(text: str, healed: str) -> str:
    """The generated text as seen from the cursor: scheduler.detokenizer.Healer(healed) on the whole
    text (the whitespace the editor already has dropped; a model that starts with a newline keeps it).
    The engine does this to a request's text itself (GenerationRequest.healed)."""
    return Healer(healed).feed(text)
