"""Clean context a decoder still has to feed: prompt (or handed-off text) and an optional infill suffix.

Both decoders start by feeding this context as clean, kept tokens at their logical positions:

    text  = prompt_ids (positions 0..P-1) + generation span (P..P+G-1) + suffix_ids (P+G..)
    cache = [cached prefix] [rest of the prompt] [suffix] [generated tokens in acceptance order]

The suffix sits physically before every generated token, so every later query sees it (infill).

Prompt scoring (`score_top` set: OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`): every
prompt row p < P-1 reads the probability of prompt token p+1 (a PROB read with that many alternatives),
so each prompt token but the first gets its causal log probability and its rank (Segment.ranks). The
whole prompt is then fed in prefill segments of its own (never with the first generation step, whose
last context row reads nothing), and no prefix-cache hit may skip any of it.
"""

from __future__ import annotations

from decoding.api import DecodeParamError
from workers.batch import NO_READS, Reads, TokenLogprob


class ContextFeed:
    """The (token, position) pairs still to feed, in feed order, and how many are already cached."""

    def __init__(
        self,
        prompt_ids: list[int],
        *,
        gen_length: int,
        suffix_ids: list[int] | None = None,
        cached_len: int = 0,
        suffix_cached_len: int = 0,
        score_top: int | None = None,
    ):
        if not prompt_ids:
            raise DecodeParamError("prompt_ids", "must hold at least one token")
        if not 0 <= cached_len <= len(prompt_ids):
            raise DecodeParamError("cached_len", f"must lie in 0..{len(prompt_ids)}, got {cached_len}")
        self.prompt_ids = list(prompt_ids)
        self.suffix_ids = list(suffix_ids or [])
        self.suffix_start = len(prompt_ids) + gen_length
        if not 0 <= suffix_cached_len <= len(self.suffix_ids):
            raise DecodeParamError(
                "suffix_cached_len", f"must lie in 0..{len(self.suffix_ids)}, got {suffix_cached_len}"
            )
        self.cached = cached_len  # prompt tokens in the cache
        self.suffix_in_cache = suffix_cached_len  # suffix tokens in the cache (fed after the whole prompt)
        if score_top is not None and cached_len:
            raise ValueError("prompt scoring needs every prompt token fed: start with nothing cached")
        self.score_top = score_top  # alternatives per scored prompt token; None: no scoring
        # TokenLogprob of prompt tokens 1 .. P-1 scored so far, in order (score_top set)
        self.prompt_logprobs: list[TokenLogprob] = []
        self._pending = self._build_pending()

    def _build_pending(self) -> list[tuple[int, int]]:
        pending = [(t, p) for p, t in enumerate(self.prompt_ids) if p >= self.cached]
        pending += [(t, self.suffix_start + i) for i, t in enumerate(self.suffix_ids) if i >= self.suffix_in_cache]
        return pending

    @property
    def pending(self) -> int:
        """Context tokens not fed yet."""
        return len(self._pending)

    @property
    def cache_len(self) -> int:
        """Context tokens in the cache (prompt tokens plus the suffix once fed)."""
        return self.cached + self.suffix_in_cache

    @property
    def scoring(self) -> bool:
        """Prompt tokens are still to be scored: the next segment must be a prefill segment."""
        return self.score_top is not None and self.cached < len(self.prompt_ids)

    def scores(self) -> list[TokenLogprob] | None:
        """The prompt's TokenLogprob entries (tokens 1 .. P-1) once all are scored; None before, or
        without scoring (Decoder.prompt_scores)."""
        return self.prompt_logprobs if self.score_top is not None and not self.scoring else None

    def skip(self, num_tokens: int) -> None:
        """A prefix-cache hit: the first num_tokens prompt tokens are cached already."""
        if self.score_top is not None and num_tokens:
            raise ValueError("a request that scores its prompt cannot start on cached prompt tokens")
        if self.cached or self.suffix_in_cache or self.pending != len(self.prompt_ids) + len(self.suffix_ids):
            raise ValueError("skip_cached_prompt must come before the first segment")
        if not 0 <= num_tokens <= len(self.prompt_ids):
            raise DecodeParamError("num_tokens", f"must lie in 0..{len(self.prompt_ids)}, got {num_tokens}")
        self.cached = num_tokens
        self._pending = self._build_pending()

    def peek(self, n: int) -> tuple[list[int], list[int]]:
        """The next n pending tokens and their positions (not consumed)."""
        chunk = self._pending[:n]
        return [t for t, _ in chunk], [p for _, p in chunk]

    def prompt_reads(self, n: int) -> Reads:
        """The reads of a prefill segment of the next n pending tokens: with prompt scoring, a PROB read
        of prompt token p+1 on each row at prompt position p < P-1; else none."""
        if self.score_top is None:
            return NO_READS
        last = len(self.prompt_ids) - 1
        rows = [(k, pos) for k, (_, pos) in enumerate(self._pending[:n]) if pos < last]
        return Reads(prob=tuple(k for k, _ in rows), prob_tokens=tuple(self.prompt_ids[pos + 1] for _, pos in rows))

    def consume(self, n: int, logprobs: list[TokenLogprob] | None = None) -> None:
        """The next n pending tokens are now in the cache. logprobs: the TokenLogprob of each read of
        `prompt_reads(n)` (prompt scoring), in row order."""
        if self.score_top is not None:
            self.prompt_logprobs += list(logprobs or ())
        for _, pos in self._pending[:n]:
            if pos < self.suffix_start:
                self.cached += 1
            else:
                self.suffix_in_cache += 1
        self._pending = self._pending[n:]


def start_context(prompt_ids: list[int], gen_length: int, suffix_ids: list[int] | None, handoff,
                  score_top: int | None = None):
    """Where a decoder starts: (prior generated ids, tokens left to generate, its ContextFeed).

    Fresh: the prompt, gen_length tokens, nothing cached, the prompt scored when score_top is set
    (params.prompt_logprobs; a handoff comes after the prompt was fed, so it never scores). After a
    handoff (decoding.api.Handoff): the text so far (prompt + generated), the handoff's remaining span,
    and what is already cached, the suffix included.
    """
    h = handoff
    prior_ids = list(h.generated_ids) if h else []
    span = h.remaining if h else gen_length
    feed = ContextFeed(
        list(prompt_ids) + prior_ids,
        gen_length=span,
        suffix_ids=(h.suffix_ids if h else suffix_ids),
        cached_len=h.cached_len if h else 0,
        suffix_cached_len=h.suffix_cached_len if h else 0,
        score_top=None if h else score_top,
    )
    return prior_ids, span, feed
