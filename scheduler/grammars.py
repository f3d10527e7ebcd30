"""Compiling requests' grammars off the engine loop: a small thread pool of its own and a cache.

Compiling an llguidance grammar (decoding.grammar.Grammar: the matcher, the forced start, the first
bitmask) takes from a millisecond to seconds for a schema of thousands of properties. It ran on the
loop's default executor, the one the forwards run on, so a few slow compiles queued the forwards
behind them; and `n` choices of one request (each its own engine request) or a client repeating its
schema compiled the same grammar again each time (a break-test sent 16 choices of a 900 KB schema:
44 s of a stalled engine). Here at most COMPILE_THREADS compile at once, on threads of their own, and
a grammar compiled for the same (grammar, forced opening, source field, forced-start limit) is shared: a
compile in progress is awaited, not started again (single flight), and the last CACHE_SIZE results
are kept (a refused grammar's DecodeParamError too: the same request is refused the same way). A
Grammar is immutable once built (each run takes `constraint()`, a fresh copy of its matcher), so
sharing one is safe. vLLM and SGLang cache compiled grammars by their key the same way.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from decoding.api import DecodeParamError
from decoding.grammar import Grammar, GrammarSpec, GrammarTokenizer, cpu_time_without_gc

COMPILE_THREADS = 2
CACHE_SIZE = 16


class GrammarCompiler:
    """`await compiler.compile(spec, prompt_ids, max_forced)` -> a Grammar (decoding.grammar), built on
    this compiler's threads or taken from its cache. Raises DecodeParamError naming spec.source for a
    grammar llguidance refuses (as Grammar). `token_ms` and `clock`: every grammar's CPU-time budget per
    token and the clock that times it (decoding.grammar.TokenConstraint)."""

    def __init__(self, tokenizer: GrammarTokenizer, token_ms: float, clock=cpu_time_without_gc):
        self._tokenizer, self._token_ms, self._clock = tokenizer, token_ms, clock
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple, asyncio.Future] = OrderedDict()
        self.compiles = 0  # grammars built (not taken from the cache)

    async def compile(self, spec: GrammarSpec, prompt_ids: list[int], max_forced: int) -> Grammar:
        prefill = tuple(prompt_ids[len(prompt_ids) - spec.prefill_tokens:]) if 0 < spec.prefill_tokens <= len(prompt_ids) else ()
        key = (spec.grammar, spec.prefill_tokens, prefill, spec.source, max_forced)
        future = self._cache.get(key)
        if future is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
            self.compiles += 1
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: Grammar(self._tokenizer, spec, prompt_ids, self._token_ms, self._clock, max_forced))
            future.add_done_callback(lambda done: self._forget_unless_kept(key, done))
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return await asyncio.shield(future)  # a cancelled waiter leaves the compile to the others

    def _forget_unless_kept(self, key: tuple, future: asyncio.Future) -> None:
        """A compile that failed other than by refusing the grammar (a bug, memory) is not cached."""
        if future.cancelled() or not isinstance(future.exception(), (type(None), DecodeParamError)):
            if self._cache.get(key) is future:
                del self._cache[key]

    def close(self) -> None:
        """Drop the cache and let the threads end once their compiles are done (Engine.stop)."""
        self._cache.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
