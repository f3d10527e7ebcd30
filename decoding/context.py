"""Clean context a decoder still has to feed: prompt (or handed-off text) and an optional infill suffix.

Both decoders start by feeding this context as clean, kept tokens at their logical positions:

    text  = prompt_ids (positions 0..P-1) + generation span (P..P+G-1) + suffix_ids (P+G..)
    cache = [cached prefix] [rest of the prompt] [suffix] [generated tokens in acceptance order]

The suffix sits physically before every generated token, so every later query sees it (infill).
"""

from __future__ import annotations

from decoding.api import DecodeParamError


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

    def skip(self, num_tokens: int) -> None:
        """A prefix-cache hit: the first num_tokens prompt tokens are cached already."""
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

    def consume(self, n: int) -> None:
        """The next n pending tokens are now in the cache."""
        for _, pos in self._pending[:n]:
            if pos < self.suffix_start:
                self.cached += 1
            else:
                self.suffix_in_cache += 1
        self._pending = self._pending[n:]


def start_context(prompt_ids: list[int], gen_length: int, suffix_ids: list[int] | None, handoff):
    """Where a decoder starts: (prior generated ids, tokens left to generate, its ContextFeed).

    Fresh: the prompt, gen_length tokens, nothing cached. After a handoff (decoding.api.Handoff):
    the text so far (prompt + generated), the handoff's remaining span, and what is already cached,
    the suffix included.
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
    )
    return prior_ids, span, feed
