"""A scripted stand-in for integrations.engine_client.EngineClient, for the editor's unit tests.

It streams a scripted text per gap length (GenerationRequest.params["gen_length"]), one token per
delta with a small delay, at most gen_length tokens (LENGTH when that cut it), the request's healed
blanks dropped from its front as the engine does, ending at the request's first stop string (the text
before it, the ids through it; unlike the engine it sends text that may begin a stop string at once, and
a script with no ids sends no delta), and records what it was asked to run, what it ended itself
(`completed`: marked before its last delta, which a reader stops at) and what was cancelled or closed
before its end (`cancelled`), so tests can check supersession and early stops against what really
reached the "engine". `hold` keeps every request in flight until the test lets it go, so a cancel is
sure to find it running. The real engine is exercised in test_editor_serve.py.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scheduler.api import ENGINE_STOPPED, Delta, FinishReason, InvalidRequestError, Mode, OverloadedError
from scheduler.detokenizer import Healer
from scheduler.request_ids import InFlightIds


@dataclass
class FakeEngineClient:
    tokenizer: object
    script: dict = field(default_factory=dict)  # gen_length -> text (missing: default_text)
    default_text: str = "x = 1\n"
    delay_s: float = 0.002
    model_name: str = "fake-model"
    requests: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    completed: list = field(default_factory=list)
    fail_with: Exception | None = None
    refuse_gen_lengths: frozenset = frozenset()  # requests of these gen_lengths are refused as overloaded
    fail_gen_lengths: frozenset = frozenset()  # requests of these gen_lengths end with an error delta
    # gen_length -> token deltas after which its requests end as a stopping engine cuts them at its drain
    # timeout (CANCELLED, ENGINE_STOPPED); None: every request's
    stopped_at: dict = field(default_factory=dict)
    final_stats: dict = field(default_factory=dict)  # added to the last delta's stats (e.g. a stop_word)
    # A request with a grammar ends with an error naming the grammar's source field after this many token
    # deltas, as the engine ends one whose grammar fails mid-request (DecodeParamError; None: never)
    grammar_fault_after: int | None = None
    # While set to an unset Event, each request waits (recorded, before its first delta) until it is set.
    # A threading.Event: the fake may run on another thread's event loop (a uvicorn server in a thread).
    hold: threading.Event | None = None
    running: InFlightIds = field(default_factory=InFlightIds)  # what in_flight answers from

    async def stream(self, req):
        self.requests.append(req)
        if self.fail_with is not None:
            raise self.fail_with
        if req.params.get("gen_length") in self.refuse_gen_lengths:
            raise OverloadedError("queue full", 1.2)
        self.running.add(req.request_id)
        try:
            async for delta in self._deltas(req):
                yield delta
        finally:
            self.running.discard(req.request_id)

    def in_flight(self, request_id):
        return self.running.overlap(request_id)

    async def _deltas(self, req):
        if req.params.get("gen_length", 0) < 1:
            raise InvalidRequestError("gen_length", "must be at least 1")
        if req.params.get("gen_length") in self.fail_gen_lengths:  # (a forward that failed: the engine's way)
            yield Delta(req.request_id, "", [], finished=True, finish_reason=FinishReason.ERROR, error="forward failed")
            return
        text = self.script.get(req.params.get("gen_length"), self.default_text)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        cut = len(ids) > req.params["gen_length"]  # the engine generates gen_length tokens at most
        ids = ids[: req.params["gen_length"]]
        healer = Healer(req.healed)  # the engine's contract: the healed blanks are dropped from the text
        sent = ""
        done = False
        try:
            while self.hold is not None and not self.hold.is_set():
                await asyncio.sleep(0.005)  # polled: Event.wait() would block the whole event loop
            for i, tok in enumerate(ids):
                await asyncio.sleep(self.delay_s)
                if i == self.stopped_at.get(req.params["gen_length"], self.stopped_at.get(None)):
                    done = True  # (the engine ended it: see below)
                    self.completed.append(req.request_id)
                    yield Delta(req.request_id, "", [], finished=True, finish_reason=FinishReason.CANCELLED,
                                error=ENGINE_STOPPED)
                    return
                if i == self.grammar_fault_after and req.grammar is not None:
                    done = True  # ended by the engine: a reader stops at this delta and closes the stream
                    self.completed.append(req.request_id)
                    yield Delta(req.request_id, "", [], finished=True, finish_reason=FinishReason.ERROR,
                                error="matching the grammar took too long (scripted)", error_field=req.grammar.source)
                    return
                piece = healer.feed(self.tokenizer.decode([tok]))
                stop_word = next((w for w in req.stop if w in sent + piece), None)  # the engine's stop strings
                if stop_word is not None:  # the text ends before it; its ids are generated ids all the same
                    piece = (sent + piece)[: (sent + piece).index(stop_word)][len(sent):]
                sent += piece
                last = i == len(ids) - 1 or stop_word is not None
                if last:  # (as above: marked before the reader gets it, or a closing reader reads as a cancel)
                    done = True
                    self.completed.append(req.request_id)
                stop_stats = {"stop_word": stop_word} if stop_word is not None else {}
                yield Delta(
                    req.request_id,
                    piece,
                    [tok],
                    finished=last,
                    finish_reason=(FinishReason.LENGTH if cut and stop_word is None else FinishReason.STOP) if last else None,
                    mode=Mode.REFUSION,
                    stats={"forwards": 4, "generated_tokens": i + 1, **self.final_stats, **stop_stats} if last else {},
                )
                if last:
                    return
            if not done:  # (no ids: no delta)
                done = True
                self.completed.append(req.request_id)
        finally:
            if not done:
                self.cancelled.append(req.request_id)

    async def cancel(self, request_id):
        self.cancelled.append(request_id)

    async def info(self):
        return {"model": self.model_name}

    async def scaled_to_zero(self) -> bool:
        return False


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """The test BPE tokenizer alone (no model weights): fast."""
    from model_factory import build_tokenizer

    return build_tokenizer(Path(tmp_path_factory.mktemp("editor-tok")))


@pytest.fixture
def fake_client(bpe_tokenizer):
    return FakeEngineClient(bpe_tokenizer)


__all__ = ["FakeEngineClient", "OverloadedError"]
