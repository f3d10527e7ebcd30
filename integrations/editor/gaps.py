"""The gap an infill's middle is decoded in (pure Python): candidate gap lengths (whole slots, capped by
the client's max_tokens and fitted to the model's context) and the choice among the candidates decoded
(`choose_candidate`). docs/editor-protocol.md, "Infill strategy".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from integrations.context_fit import whole_slots
from integrations.editor.postprocess import CUT_INDENT, CUT_NEWLINE, CUT_SUFFIX

# Candidate gap lengths (tokens). A single line is rarely over 16 tokens; a multi-line completion
# decodes a short and a long gap side by side. All are multiples of SLOT_SIZE.
SLOT_SIZE = 8
SINGLE_LINE_GAPS = (16,)
MULTILINE_GAPS = (32, 64)


def infill_room(context_length: int, gaps: Sequence[int]) -> int:
    """Tokens an infill's prompt and suffix may hold together: the model's context (`context_length`,
    config.json max_position_embeddings; 0 unknown) less the positions the longest candidate gap
    decodes (whole slots, `gap_cap`; the suffix sits after the gap, so its positions count it); 0 when
    the context is unknown. Callers keep only the gaps that fit first (`fitting_gaps`)."""
    if not context_length:
        return 0
    return max(2, context_length - max((gap_cap(g) for g in gaps), default=0))


def fitting_gaps(context_length: int, gaps: Sequence[int]) -> tuple[int, ...]:
    """The candidate `gaps` whose decoded span (whole slots, `gap_cap`) leaves the model's context room
    for a token of prefix and one of suffix; every gap when the context is unknown (0). Empty: no infill
    fits the model (the caller's 400). For gaps a client chose (the editor's `gaps`); the strategy's own
    go through `strategy_gaps`."""
    return tuple(g for g in gaps if not context_length or gap_cap(g) <= context_length - 2)


def strategy_gaps(context_length: int, gaps: Sequence[int], at_least: int = 0) -> tuple[int, ...]:
    """The strategy's candidate `gaps` (plan_gaps: capped by the client's max_tokens or n_predict, a
    most) on a model context of `context_length` tokens (0 unknown: all): those within half the context,
    so the prompt keeps at least the other half (a gap that only just fitted cut a 10-token prompt to a
    token of prefix and one of suffix, and one more token of context gave a worse completion), or, none
    being that short (a model served with a small max_model_len), one gap of that length, as vLLM shrinks
    an unset max_tokens to the room left. `at_least` (min_tokens) may take a gap past the half, up to
    what fits at all. Empty: no gap of `at_least` tokens fits (the caller's 400)."""
    if not context_length:
        return tuple(gaps)
    longest = longest_gap(context_length)
    half = gap_within(max(1, (context_length - 2) // 2)) if longest else 0
    limit = min(longest, max(half, gap_cap(at_least) if at_least else 0))
    kept = tuple(g for g in gaps if gap_cap(g) <= limit)
    if kept:
        return kept
    return (limit,) if limit >= max(1, at_least) else ()


def longest_gap(context_length: int) -> int:
    """The longest gap (tokens) that a model context of `context_length` tokens holds beside a token of
    prefix and one of suffix (`fitting_gaps`); 0 when none does. What the 400s for a cap past it say."""
    return max(0, gap_within(context_length - 2))


def gap_within(tokens: int) -> int:
    """The longest gap of at most `tokens` tokens: whole slots, or one slot shorter than SLOT_SIZE (what a
    gap or max_tokens of `tokens` decodes may be longer: gap_cap rounds up)."""
    return tokens if tokens < SLOT_SIZE else tokens // SLOT_SIZE * SLOT_SIZE


def no_room_message(context_length: int, field: str, *also: str) -> str:
    """The 400's message for a cap (`field`) that no infill of a `context_length`-token model holds;
    `also`: other fields sent past it (min_tokens), named in the same message so that one retry does."""
    longest = longest_gap(context_length)
    if not longest:
        return f"the model's context ({context_length} tokens) holds no completion beside its prompt"
    tokens = "token" if longest == 1 else "tokens"
    return (f"the model's context ({context_length} tokens) holds a completion of at most {longest} {tokens} "
            f"beside its prompt: send " + " and ".join(f"{name} {longest} or less" for name in (field, *also)))


def plan_gaps(max_tokens: int | None, multiline: bool, min_tokens: int = 0) -> tuple[int, ...]:
    """Candidate gap lengths, capped by max_tokens and none shorter than min_tokens (vLLM's: the text runs
    at least that long, which a shorter gap cannot hold), both rounded up to the slot size. The caller
    keeps min_tokens <= max_tokens."""
    base = MULTILINE_GAPS if multiline else SINGLE_LINE_GAPS
    cap = None if max_tokens is None else gap_cap(max_tokens)
    return tuple(sorted({max(g if cap is None else min(g, cap), gap_cap(min_tokens)) for g in base}))


def capped_gaps(gaps: tuple[int, ...] | None, max_tokens: int | None) -> tuple[int, ...] | None:
    """A client's explicit gaps, none longer than max_tokens allows (gap_cap): the output is cut at
    max_tokens anyway, and a longer gap's KV (what a small cache refuses) would be named max_tokens,
    which the client already lowered."""
    if not gaps or max_tokens is None:
        return gaps
    return tuple(sorted({min(g, gap_cap(max_tokens)) for g in gaps}))


def gap_cap(tokens: int) -> int:
    """The longest gap a cap of `tokens` allows: rounded up to whole slots (a gap shorter than one slot
    is one slot of its own length)."""
    return tokens if tokens < SLOT_SIZE else whole_slots(tokens, SLOT_SIZE)


def gap_params(gap: int) -> dict:
    """Decoding parameters that make `gap` a valid ReFusion generation span."""
    slot = gap if gap < SLOT_SIZE else SLOT_SIZE
    blocks = gap // 32 if gap >= 64 and gap % 32 == 0 else 1  # semi-AR blocks of 32 for long gaps
    return {"gen_length": gap, "slot_size": slot, "serial_num_blocks": blocks}


@dataclass
class Candidate:
    """One decoded gap length after post-processing."""

    gap: int
    text: str
    stop_reason: str  # stop | length | deadline | newline | indent | suffix | invalid | cancelled | error
    raw: str = ""
    tokens: int = 0  # ids generated (read from the engine), what usage counts
    stats: dict = field(default_factory=dict)
    # The generated ids of `text` (runner.text_id_count): those of the model's text it shows, fewer than
    # `tokens` where a rule cut the text
    token_ids: list[int] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        """The completion ended inside its gap: EOS/stop string, or a rule found its natural end."""
        return self.stop_reason in ("stop", CUT_NEWLINE, CUT_INDENT, CUT_SUFFIX)


def choose_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The shortest gap whose completion closed inside it; else the longest gap's; but never one
    that does not extend the shortest gap's text, unless that text is only whitespace.

    Why: a gap longer than the natural middle makes the model pad it, which shows as a repeat of
    the suffix (trimmed, so the candidate closes); a gap shorter than the middle ends mid-thought
    and does not close. The shortest closed gap is the least padded complete answer. Partials stream
    from the shortest gap, and a stream cannot take text back (llama.cpp's /infill and OpenAI's
    streams send only new text), so a longer gap may replace it only when it extends what the
    shortest one wrote, text and token ids alike: then the streamed and the non-streamed answers are the
    same text with the same `tokens`.
    """
    if not candidates:
        raise ValueError("choose_candidate needs at least one candidate")
    ordered = sorted(candidates, key=lambda c: c.gap)
    streamed = ordered[0]
    if streamed.text.strip():
        if streamed.closed:
            return streamed
        ordered = [c for c in ordered if c.text.startswith(streamed.text)
                   and c.token_ids[: len(streamed.token_ids)] == streamed.token_ids]
    with_text = [c for c in ordered if c.text.strip()] or ordered
    for cand in with_text:
        if cand.closed:
            return cand
    return with_text[-1]
