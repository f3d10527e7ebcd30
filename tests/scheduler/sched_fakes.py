"""Fake runner, block pool, decoders and tokenizer for pure scheduling tests (no torch).

The fake runner checks the block tables the scheduler hands it (the engine owns KV: leaks show in
`engine.kv`) and answers reads with a deterministic function of the query row's token and position,
so a request's output never depends on its batch. `ForwardGate` holds any runner's forward, so a test
can act (cancel, queue, submit) while the engine's state is known instead of racing the clock.
`flip_modes` makes a router switch every AUTO request's mode at each re-route.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import time
from types import SimpleNamespace

from decoding.api import DecodeParamError, DecodeStats, Handoff
from scheduler.api import Mode
from workers.batch import Reads, Segment, SegmentResult

VOCAB = 40
EOS = 1
MASK = 2
NEWLINE = 3


def token_for(token: int, position: int) -> int:
    """The fake model: next token from (token, position); never EOS/MASK unless position says so."""
    return 4 + (token * 7 + position * 3) % (VOCAB - 4)


class FakeRunner:
    """scheduler.api.Runner on a deterministic fake model, with an optional forward delay. It owns no
    KV: it checks that every block table it is handed covers the segment's context and kept tokens."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4, delay_s: float = 0.0, eos_at: int | None = None,
                 newline_every: int | None = None):
        self.info = SimpleNamespace(vocab_size=VOCAB, eos_token_id=EOS, mask_token_id=MASK, block_size=block_size,
                                    num_kv_blocks=num_blocks)
        self.tokenizer = None
        self.calls: list[list[Segment]] = []
        self.tables: list[list[list[int]]] = []  # block tables of each call
        self.delay_s = delay_s
        self.eos_at = eos_at  # position whose read returns EOS
        self.newline_every = newline_every  # positions p with p % newline_every == 0 hold a newline
        self.lock = threading.Lock()

    def execute(self, segments: list[Segment], block_tables: list[list[int]]) -> list[SegmentResult]:
        with self.lock:
            self.calls.append(list(segments))
            self.tables.append([list(t) for t in block_tables])
            assert len({s.seq_id for s in segments}) == len(segments), "two segments of one sequence"
            assert len(block_tables) == len(segments)
            for seg, table in zip(segments, block_tables):
                need = seg.context_len + seg.num_kept
                assert len(table) * self.info.block_size >= need, f"{seg.seq_id}: table {table} < {need} tokens"
                assert all(0 <= b < self.info.num_kv_blocks for b in table)
            if self.delay_s:
                time.sleep(self.delay_s)
            return [self._run(s) for s in segments]

    def _run(self, seg: Segment) -> SegmentResult:
        tokens = []
        for row in seg.reads.rows():
            pos = seg.positions[row]
            target = pos + 1 if row == 0 else pos  # row 0 is clean (predicts pos + 1), others are masks
            tok = token_for(seg.token_ids[row], pos)
            if self.newline_every and target % self.newline_every == 0:
                tok = NEWLINE
            if self.eos_at is not None and target == self.eos_at:
                tok = EOS
            tokens.append(tok)
        return SegmentResult(seg.seq_id, tokens, [0.9] * len(tokens))


class ForwardGate:
    """Wraps a runner's execute: every forward from number `hold_from` on (0-based; earlier ones pass)
    waits in its worker thread until `release()`; the event loop keeps serving meanwhile, so the test can
    cancel, submit or stop while the engine's state is known. `entered` is set when a held one arrives.

        gate = ForwardGate(runner.execute); runner.execute = gate
    """

    def __init__(self, execute, hold_from: int = 0, timeout_s: float = 120.0):
        self._execute = execute
        self.hold_from = hold_from
        self.timeout_s = timeout_s  # a test that never releases fails the forward instead of hanging
        self.calls = 0
        self.entered = threading.Event()
        self._released = threading.Event()

    def __call__(self, segments, block_tables):
        number, self.calls = self.calls, self.calls + 1  # the engine runs one forward at a time
        if number >= self.hold_from:
            self.entered.set()
            if not self._released.wait(self.timeout_s):
                raise TimeoutError(f"ForwardGate: the test did not release the forward within {self.timeout_s} s")
        return self._execute(segments, block_tables)

    def release(self) -> None:
        self._released.set()


class FakeDecoder:
    """Prefill in budget-sized kept chunks, then decode steps of `step_tokens` query tokens (the last
    token kept, the rest dropped) yielding `tokens_per_step` tokens; a block boundary every
    `block_tokens` generated tokens."""

    def __init__(self, seq_id, prompt_ids, gen_length, *, step_tokens=1, tokens_per_step=1, block_tokens=4,
                 generated=None, cached=0, stats=None):
        self.seq_id, self.prompt = seq_id, list(prompt_ids)
        self.gen_length, self.step_tokens, self.tokens_per_step = gen_length, step_tokens, tokens_per_step
        self.block_tokens = block_tokens
        self.text = list(prompt_ids) + list(generated or [])  # tokens whose KV must be fed, in order
        self.cached = cached
        self.out: list[int] = list(generated or [])  # a handed-off text is part of the output
        self.stats = stats or DecodeStats()
        self.hit_eos = False
        self.budgets: list[int] = []
        self._last: Segment | None = None  # in flight

    @property
    def finished(self) -> bool:
        return self.hit_eos or len(self.out) >= self.gen_length

    @property
    def cache_len(self) -> int:
        return self.cached

    def next_segment(self, budget: int):
        self.budgets.append(budget)
        if self.finished:
            return None
        assert self._last is None, f"{self.seq_id}: next_segment before the last segment was absorbed"
        ctx = self.cached
        if ctx < len(self.text) - 1:  # prefill all but the last known token, in chunks
            chunk = self.text[ctx : min(len(self.text) - 1, ctx + budget)]
            self._last = Segment(self.seq_id, ctx, chunk, list(range(ctx, ctx + len(chunk))), len(chunk))
            return self._last
        last, n = self.text[-1], self.step_tokens
        tokens = [last] + [MASK] * (n - 1)
        reads = Reads(argmax=tuple(range(min(n, max(1, self.tokens_per_step)))))
        # row 0: the last token at ctx (predicts ctx + 1); rows i >= 1: masks at ctx + 1 + i (predict themselves)
        positions = [ctx] + [ctx + 1 + i for i in range(1, n)]
        self._last = Segment(self.seq_id, ctx, tokens, positions, 1, reads)
        return self._last

    def absorb(self, result: SegmentResult) -> None:
        segment, self._last = self._last, None
        if not result.tokens:
            self.stats.prefill_forwards += 1
            self.cached += segment.num_kept
            return
        self.stats.forwards += 1
        self.cached += 1
        for tok in result.tokens:
            if self.finished:
                break
            if tok == EOS:
                self.hit_eos = True
                break
            self.out.append(tok)
            self.text.append(tok)
        self.stats.generated_tokens = len(self.out)

    def skip_cached_prompt(self, num_tokens: int) -> None:
        self.cached = num_tokens

    def stream_ids(self) -> list[int]:
        return list(self.out)

    def output_ids(self) -> list[int]:
        return list(self.out)

    def at_block_boundary(self) -> bool:
        return len(self.out) % self.block_tokens == 0

    def handoff(self) -> Handoff:
        return Handoff(self.prompt, list(self.out), self.cached, self.gen_length - len(self.out), self.stats)


class FakeFactory:
    """Builds FakeDecoders; params: gen_length (required > 0), slot_size, serial_num_blocks, seed (unused)."""

    REFUSION_SHAPE = {"step_tokens": 8, "tokens_per_step": 2}

    def __init__(self):
        self.created: list[tuple[str, Mode]] = []
        self.decoders: dict[str, FakeDecoder] = {}
        self.healings: dict[str, object] = {}

    def parse_params(self, params: dict):
        unknown = set(params) - {"gen_length", "slot_size", "serial_num_blocks", "seed"}
        if unknown:
            raise DecodeParamError(sorted(unknown)[0], "unknown parameter; remove it")
        gen = params.get("gen_length", 8)
        if not isinstance(gen, int) or gen <= 0:
            raise DecodeParamError("gen_length", f"must be a positive int, got {gen!r}")
        return SimpleNamespace(gen_length=gen, slot_size=params.get("slot_size", 1), serial_num_blocks=params.get("serial_num_blocks", 1))

    def _shape(self, mode: Mode) -> dict:
        return dict(self.REFUSION_SHAPE) if mode is Mode.REFUSION else {}

    def create(self, mode, seq_id, prompt_ids, params, suffix_ids, healing=None):
        self.created.append((seq_id, mode))
        self.healings[seq_id] = healing  # (a healed prompt's constraint, AR only: the fake decoder ignores it)
        dec = FakeDecoder(seq_id, prompt_ids, params.gen_length, **self._shape(mode))
        self.decoders[seq_id] = dec
        return dec

    def from_handoff(self, mode, seq_id, handoff: Handoff, params):
        self.created.append((seq_id, mode))
        total = len(handoff.generated_ids) + handoff.remaining
        dec = FakeDecoder(seq_id, handoff.prompt_ids, total, generated=handoff.generated_ids,
                          cached=handoff.cached_len, stats=handoff.stats, **self._shape(mode))
        self.decoders[seq_id] = dec
        return dec


class FakeTokenizer:
    """id 3 -> newline, others -> one letter; EOS/MASK decode to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if i == NEWLINE else "" if i in (EOS, MASK) else chr(ord("a") + i % 26) for i in ids)


def make_engine(runner=None, factory=None, tokenizer=None, **config):
    """An Engine on fakes with calibration off (flat cost curve unless cost_points are given)."""
    from scheduler.config import EngineConfig, RoutingConfig
    from scheduler.engine import Engine

    routing = config.pop("routing", None) or RoutingConfig(calibrate=False)
    runner = runner or FakeRunner()
    engine = Engine(runner, tokenizer or FakeTokenizer(), EngineConfig(routing=routing, **config), factory or FakeFactory())
    return engine, runner


async def collect(engine, request):
    """All deltas of one request."""
    return [d async for d in engine.submit(request)]


def ids_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def flip_modes(engine, first: Mode) -> None:
    """Make `engine`'s router start every AUTO request in `first` and switch it to the other mode at
    each re-route (a block boundary, every routing.switch_interval_tokens); the decision's other fields
    stay the router's own, and so does a decision for a mode asked for (a preempted rerun's)."""
    decide = engine.router.decide

    def flip(requested, priority, load, current=None, request_key=None):
        decision = decide(requested, priority, load, current=current, request_key=request_key)
        if requested is not Mode.AUTO:
            return decision
        mode = first if current is None else {Mode.AR: Mode.REFUSION, Mode.REFUSION: Mode.AR}[current]
        return dataclasses.replace(decision, mode=mode)

    engine.router.decide = flip


async def serve_all(engine, specs) -> list:
    """Start `engine`, stream every request of `specs` at once to its end, stop it, and check that every
    KV block came back; each request's deltas, in `specs` order."""
    import asyncio

    await engine.start()
    try:
        results = await asyncio.gather(*[collect(engine, spec) for spec in specs])
    finally:
        await engine.stop()
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
    return results


class FakeCpuClock:
    """decoding.cpu_clock's CPU clock (this thread's CPU seconds less its garbage collections) on a number
    the test moves, `now` (seconds), in place of time.thread_time; within `slow_collections()` every real
    collection moves it on by `gc_s` (a gc callback run before the clock's own, so the stop it reads is
    that much later): a collection's cost made exact and visible, whatever the machine."""

    def __init__(self, monkeypatch, gc_s: float = 0.1):
        import decoding.cpu_clock as cpu_clock_module

        self.now, self.gc_s = 0.0, gc_s
        monkeypatch.setattr(cpu_clock_module, "time", SimpleNamespace(thread_time=lambda: self.now))

    def _collection(self, phase: str, _info: dict) -> None:
        if phase == "stop":
            self.now += self.gc_s

    @contextlib.contextmanager
    def slow_collections(self):
        gc.callbacks.insert(0, self._collection)
        try:
            yield self
        finally:
            gc.callbacks.remove(self._collection)
