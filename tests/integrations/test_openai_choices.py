"""integrations/openai_choices.py and the route helpers of `n`, without Ray: seeds per choice, merged
streams, and that one failing choice ends the others (their engine requests cancelled) streamed or not."""

from __future__ import annotations

import asyncio

import pytest

from integrations.http_errors import APIError
from integrations.openai_choices import choice_requests, indexed, merged, start_all
from integrations.request_limits import MAX_SEED
from scheduler.api import Delta, FinishReason, GenerationRequest


def test_choice_requests_ids_and_seeds():
    req = GenerationRequest("cmpl-1", [1, 2], {"gen_length": 8, "seed": MAX_SEED - 1})
    assert choice_requests(req, 1) == [req]
    reqs = choice_requests(req, 3)
    assert [r.request_id for r in reqs] == ["cmpl-1.0", "cmpl-1.1", "cmpl-1.2"]
    assert [r.params["seed"] for r in reqs] == [MAX_SEED - 1, MAX_SEED, 0]  # wraps inside the device's range
    assert req.params["seed"] == MAX_SEED - 1  # the original is untouched
    unseeded = choice_requests(GenerationRequest("c", [1], {"gen_length": 8}), 2)
    assert all("seed" not in r.params for r in unseeded)  # the engine draws one per request


class Stream:
    """An async iterator of deltas that records whether it was closed; `fail_after` raises an APIError
    after that many deltas; `hang` waits forever after its deltas (a choice still decoding)."""

    def __init__(self, name: str, n: int, fail_after: int | None = None, hang: bool = False):
        self.name, self.n, self.fail_after, self.hang = name, n, fail_after, hang
        self.closed = False
        self._gen = self._run()

    async def _run(self):
        try:
            for i in range(self.n):
                if self.fail_after is not None and i == self.fail_after:
                    raise APIError(400, "grammar: dead end", param="grammar")
                yield Delta(self.name, f"{self.name}{i} ", [i], finished=not self.hang and i == self.n - 1,
                            finish_reason=None if self.hang or i < self.n - 1 else FinishReason.STOP)
                await asyncio.sleep(0)
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._gen.__anext__()

    async def aclose(self):
        await self._gen.aclose()


async def _events(stream):
    async for delta in stream:
        yield {"choices": [{"index": 0, "text": delta.text}]}


async def test_merged_keeps_each_choices_order_and_indexes_them():
    streams = [Stream("a", 3), Stream("b", 2)]
    out = [e async for e in merged([indexed(_events(s), i) for i, s in enumerate(streams)])]
    by_index = {i: [e["choices"][0]["text"] for e in out if e["choices"][0]["index"] == i] for i in (0, 1)}
    assert by_index == {0: ["a0 ", "a1 ", "a2 "], 1: ["b0 ", "b1 "]}


async def test_a_failing_choice_closes_the_others_when_streamed():
    failing, hanging = Stream("a", 3, fail_after=1), Stream("b", 2, hang=True)
    events = merged([indexed(_events(failing), 0), indexed(_events(hanging), 1)])
    with pytest.raises(APIError):
        async for _ in events:
            pass
    await events.aclose()
    assert failing.closed and hanging.closed


async def test_a_failing_choice_closes_the_others_when_collected():
    from integrations.http_metrics import APIMetrics, RequestObserver
    from integrations.openai_calls import collect_all

    observer = RequestObserver(APIMetrics(), "completions", "r", 2)
    failing, hanging = Stream("a", 3, fail_after=1), Stream("b", 2, hang=True)
    with pytest.raises(APIError):
        await asyncio.wait_for(collect_all([failing, hanging], observer), 10)
    assert failing.closed and hanging.closed


async def test_a_refused_choice_fails_the_request_at_once_and_cancels_the_others():
    """Choice .1 is refused at submit (a full queue); .0 already has its first delta (admitted), .2 is
    still queued (no delta yet). The refusal is raised at once, not when .2 gets scheduled; .2's wait
    is cancelled and .0's engine stream closed although nobody read it (openai_calls.Replay)."""
    from integrations.openai_calls import Replay

    closed, cancelled = [], []

    async def start(req):
        if req.request_id.endswith(".1"):
            await asyncio.sleep(0.01)
            raise APIError(503, "engine full")
        if req.request_id.endswith(".2"):
            try:
                await asyncio.Event().wait()  # queued behind running requests: no first delta for a long time
            except asyncio.CancelledError:
                cancelled.append(req.request_id)
                raise
        stream = Stream(req.request_id, 2, hang=True)
        first = await stream.__anext__()
        replay = Replay(first, stream)
        original = replay.aclose

        async def aclose():
            closed.append(req.request_id)
            await original()

        replay.aclose = aclose
        return replay

    reqs = choice_requests(GenerationRequest("r", [1], {"gen_length": 4}), 3)
    with pytest.raises(APIError) as err:
        await asyncio.wait_for(start_all(start, reqs), 5)
    assert err.value.status == 503 and closed == ["r.0"] and cancelled == ["r.2"]


async def test_the_text_of_a_final_delta_that_carries_an_error_goes_out_before_the_error():
    # A grammar that fails mid-request ends with a final delta carrying an error and the text decoded since
    # the last delta: a stream lost that text (a break-test saw one more chunk with async scheduling on,
    # where the engine had split the same text differently). An error on the first delta stays an error
    # before any output (the route answers with its status).
    from integrations.http_metrics import APIMetrics, RequestObserver
    from integrations.openai_calls import observed
    from scheduler.api import Delta, FinishReason

    async def deltas(items):
        for item in items:
            yield item

    failed = Delta("r", "88;", [7, 7, 9], finished=True, finish_reason=FinishReason.ERROR, error="parser error",
                   error_field="grammar", stats={"generated_tokens": 5})
    observer = RequestObserver(APIMetrics(), "completions", "r", 2)
    seen = []
    with pytest.raises(APIError) as err:
        async for delta in observed(deltas([Delta("r", "15", [1, 5]), failed]), observer):
            seen.append(delta)
    assert err.value.status == 400 and "parser error" in str(err.value)
    assert [(d.text, d.token_ids, d.finished, d.error) for d in seen] == [("15", [1, 5], False, None),
                                                                         ("88;", [7, 7, 9], False, None)]
    assert observer.completion_tokens == 5  # each id counted once
    first = RequestObserver(APIMetrics(), "completions", "r", 2)
    with pytest.raises(APIError):  # nothing went out: the text is not sent ahead of the error
        async for delta in observed(deltas([failed]), first):
            raise AssertionError(f"a delta went out: {delta}")


def test_stop_included_returns_only_the_clients_stop_strings():
    """vLLM's include_stop_str_in_output (openai_stream.stop_included): the client's stop string that ended
    the text is appended to the last delta; the chat template's turn end (an engine stop the client did
    not send) and a text ended otherwise are left as they are; ids and stats are untouched."""
    from integrations.chat import PLAIN_STOP
    from integrations.openai_stream import stop_included

    def run(stats: dict, stops: list[str]) -> list[Delta]:
        deltas = [Delta("c", "def f", [1, 2]),
                  Delta("c", "(x)", [3], finished=True, finish_reason=FinishReason.STOP, stats=stats)]

        async def source():
            for delta in deltas:
                yield delta

        async def collect():
            return [d async for d in stop_included(source(), stops)]
        return asyncio.run(collect())

    kept = run({"stop_word": ":\n"}, [":\n", "#"])
    assert [d.text for d in kept] == ["def f", "(x):\n"] and kept[-1].token_ids == [3]
    assert [d.text for d in run({"stop_word": PLAIN_STOP}, ["#"])] == ["def f", "(x)"]  # the template's turn end
    assert [d.text for d in run({}, [":\n"])] == ["def f", "(x)"]  # EOS or max_tokens


def test_an_included_stop_comes_back_in_the_prompts_style():
    """On /v1/completions the stop string is appended in the model's form, before the CRLF prompt's style
    applies, so a "\n" stop that ended a line of a CRLF document comes back as "\r\n" (it came back as
    a bare "\n", the "\r" lost: helper-132)."""
    from integrations.editor.document import DocumentStyle
    from integrations.openai_stream import in_document_style, stop_included

    async def source():
        yield Delta("c", "    return x", [1])
        yield Delta("c", "", [2], finished=True, finish_reason=FinishReason.STOP, stats={"stop_word": "\n"})

    async def collect():
        styled = in_document_style(stop_included(source(), ["\n"]), DocumentStyle("\r\n"), False, ["\n"])
        return "".join([d.text async for d in styled])

    assert asyncio.run(collect()) == "    return x\r\n"

