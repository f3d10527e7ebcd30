"""A preempted request's rerun that makes other ids than it already streamed continues the streamed ones
(scheduler/replay.py), on a real ModelRunner and the real decoders (the shipped model on the CPU).

The rerun's logits differ from the first run's by float noise beside other requests; at a near-tie
that flips a token. Here the flip is forced: while the rerun retraces its streamed ids, every read of
one of those positions answers another token (`FlipRetrace`). Before the fix the client got the first
run's ids followed by the rerun's from that index on, text neither run wrote (helper-170); now it gets
exactly the run never preempted. The preemption itself is forced: an INTERACTIVE request is submitted
once the BATCH one has streamed `k` ids, with one running slot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sched_fakes import collect, ids_of

from scheduler.api import FinishReason, GenerationRequest, Mode, Priority
from scheduler.config import EngineConfig, RoutingConfig
from scheduler.engine import Engine

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(),
                                                   reason="models/refusion-tiny-code not present")]

PROMPT = "from typing import"  # 27 varied tokens from the shipped model in ReFusion (greedy)


@pytest.fixture
def runner():
    """The shipped model: its next token depends on the text before (a random tiny one repeats one token)."""
    from workers.runner import ModelRunner

    return ModelRunner(SHIPPED_MODEL, device="cpu", num_blocks=256, block_size=16)


class FlipRetrace:
    """runner.execute that, for request `rid` while it retraces ids it streamed before its preemption
    (Request.replay_ids), answers every read of one of those positions with another token."""

    def __init__(self, execute, engine, rid: str, vocab: int):
        self.execute, self.engine, self.rid, self.vocab, self.flipped = execute, engine, rid, vocab, 0

    def __call__(self, segments, block_tables):
        results = self.execute(segments, block_tables)
        req = next((r for r in self.engine.scheduler.running if r.id == self.rid), None)
        if req is None or not req.replay_ids:
            return results
        end = len(req.spec.prompt_ids) + len(req.replay_ids) - 1  # (a read at a row predicts its next position)
        for segment, result in zip(segments, results):
            if segment.seq_id == self.rid:
                rows = segment.reads.rows()
                for i, row in enumerate(rows[: len(result.tokens)]):
                    if segment.positions[row] < end:
                        result.tokens[i] = (result.tokens[i] + 1) % self.vocab
                        self.flipped += 1
        return results


async def _engine(runner, pipelined: bool = False) -> Engine:
    """One running slot; `pipelined`: asynchronous scheduling and overlapped streaming (steps planned
    ahead, text streamed while the next forward runs)."""
    config = EngineConfig(max_running=1, routing=RoutingConfig(calibrate=False), async_scheduling=pipelined,
                          overlap_streaming=pipelined)
    engine = Engine(runner, runner.tokenizer, config)
    await engine.start()
    return engine


def _interactive(runner) -> GenerationRequest:
    """The INTERACTIVE request that preempts the one BATCH request on the one running slot."""
    return GenerationRequest("i", runner.tokenizer.encode("class A:\n"), {"gen_length": 8, "slot_size": 8, "serial_num_blocks": 1},
                             mode=Mode.AR, priority=Priority.INTERACTIVE)


async def _preempted(runner, spec: GenerationRequest, k: int, flip: bool, pipelined: bool) -> list:
    """The deltas of `spec` preempted once it has streamed `k` ids, its rerun flipped if `flip`."""
    engine = await _engine(runner, pipelined)
    flipper = FlipRetrace(runner.execute, engine, spec.request_id, runner.info.vocab_size)
    if flip:
        runner.execute = flipper
    interactive = _interactive(runner)
    deltas, other = [], None
    try:
        async for delta in engine.submit(spec):
            deltas.append(delta)
            if other is None and len(ids_of(deltas)) >= k and not delta.finished:
                other = asyncio.ensure_future(collect(engine, interactive))
        await asyncio.wait_for(other, 60)
    finally:
        runner.__dict__.pop("execute", None)
        await engine.stop()
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
    assert deltas[-1].stats["preemptions"] == 1, "the set-up must preempt it once"
    assert not flip or flipper.flipped, "the rerun must have been flipped"
    return deltas


def _continued(runner, spec: GenerationRequest, mode: Mode, sent: list[int]) -> list[int]:
    """What a decoder continuing `sent` alone gives (workers.session, no engine): the reference of a
    ReFusion retrace, whose continuation prefills the sent ids clean (replay.py)."""
    from decoding.api import Handoff
    from decoding.loop import decode_batch
    from scheduler.decoders import ModelDecoderFactory
    from workers.session import RunnerSession

    factory = ModelDecoderFactory(runner)
    params = factory.parse_params(spec.params)
    handoff = Handoff(list(spec.prompt_ids), list(sent), cached_len=0, remaining=params.gen_length - len(sent),
                      block_done=len(sent) % params.block_length)
    return decode_batch(RunnerSession(runner), [factory.from_handoff(mode, "reference", handoff, params)])[0]


def _causal_after(runner, context: list[int], n: int) -> list[int]:
    """Greedy decoding of the checkpoint as a plain causal LM (transformers, its own modeling code) after
    `context`, each token read from the row before it, up to n ids or an end token: the reference of an
    AR retrace, which reads after the last sent id as the first run read each token
    (decoding.ar.ARDecoder.resume), on KV prefilled clean. (An AR request's first read is from a mask
    row instead, decoding/ar.py, so an AR request on prompt + sent ids is no reference.)"""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    ends = {runner.info.eos_token_id, *getattr(runner.info, "end_token_ids", ())}
    ids = list(context)
    with torch.no_grad():
        while len(ids) - len(context) < n:
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2).values
            assert top[0] - top[1] > 1e-3, "a near-tie: the reference cannot tell"
            token = int(logits.argmax())
            if token in ends:  # (the stream sends no end token)
                break
            ids.append(token)
    return ids[len(context):]


@pytest.mark.parametrize("mode, params, k", [
    (Mode.AR, {"gen_length": 32, "slot_size": 8, "serial_num_blocks": 1, "ignore_eos": True}, 3),
    # sampled: the continuation draws with the steps the unpreempted run used (ARDecoder.resume)
    (Mode.AR, {"gen_length": 32, "slot_size": 8, "serial_num_blocks": 1, "ignore_eos": True, "temperature": 1.0,
               "seed": 7}, 3),
    # ReFusion streams its first block of 8, then a slot of 4 at a time: preempted with 12 ids sent, inside
    # its second block (the retrace keeps that block's end); and with its first block of 16 sent
    (Mode.REFUSION, {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 4}, 9),
    (Mode.REFUSION, {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 2}, 16),
])
@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
async def test_a_rerun_that_parts_from_its_streamed_ids_continues_them(runner, mode, params, k, pipelined, monkeypatch):
    """AR: the text is the run never preempted. ReFusion: the first run's streamed ids, then what a
    decoder continuing them gives (its committed KV came from verify forwards beside other drafts; the
    retrace prefills it clean), never the flipped rerun's."""
    from scheduler.scheduler import Scheduler

    spec = lambda: GenerationRequest("v", runner.tokenizer.encode(PROMPT), dict(params), mode=mode)  # noqa: E731
    engine = await _engine(runner)
    solo = await collect(engine, spec())
    await engine.stop()
    assert len(ids_of(solo)) > k + 4, "the solo run must go on past the preemption"
    plain = await _preempted(runner, spec(), k, flip=False, pipelined=pipelined)
    assert ids_of(plain) == ids_of(solo)  # a rerun that retraces its ids (the usual case)
    preempted_with = []  # the ids it had streamed when preempted
    requeue = Scheduler.requeue
    monkeypatch.setattr(Scheduler, "requeue", lambda s, victim, reason: (
        preempted_with.append(len(victim.stream_ids())), requeue(s, victim, reason))[1])
    flipped = await _preempted(runner, spec(), k, flip=True, pipelined=pipelined)
    [sent] = preempted_with
    expected = ids_of(solo) if mode is Mode.AR else _continued(runner, spec(), mode, ids_of(solo)[:sent])
    assert ids_of(flipped) == expected and ids_of(flipped)[:sent] == ids_of(solo)[:sent]
    assert "".join(d.text for d in flipped) == runner.tokenizer.decode(expected, skip_special_tokens=True)
    assert flipped[-1].stats["generated_tokens"] == len(expected)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
async def test_a_request_that_switched_mode_is_preempted_and_continues_its_sent_ids(runner, pipelined, monkeypatch):
    """An AUTO request that switched mode was never preempted: an INTERACTIVE request waited behind it
    for its whole length. Now it is, like any BATCH request; its rerun runs in its last mode (AR),
    which parts from the ids its ReFusion blocks made and continues the ids it sent (replay.py). Forced:
    the router starts it in ReFusion and switches it to AR at its first re-route (every 8 tokens, at a
    block boundary); the INTERACTIVE request arrives once it has switched and streamed past that."""
    from sched_fakes import flip_modes

    from scheduler.scheduler import Scheduler

    params = {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 4}  # blocks of 8
    spec = GenerationRequest("v", runner.tokenizer.encode(PROMPT), dict(params), mode=Mode.AUTO)
    engine = await _engine(runner, pipelined)
    engine.config.routing.switch_interval_tokens = 8
    flip_modes(engine, Mode.REFUSION)
    preempted_with = []  # the ids its stream had taken when preempted (the text deferred then included)
    requeue = Scheduler.requeue
    monkeypatch.setattr(Scheduler, "requeue", lambda s, victim, reason: (
        requeue(s, victim, reason), preempted_with.append(list(victim.replay_ids)))[0])
    interactive = _interactive(runner)
    deltas, other = [], None
    try:
        async for delta in engine.submit(spec):
            deltas.append(delta)
            req = engine._requests.get("v")
            if other is None and req is not None and req.mode_history == ["refusion", "ar"] and len(ids_of(deltas)) > 9:
                engine.config.routing.allow_switch = False  # (no further switch: its rerun continues in AR)
                other = asyncio.ensure_future(collect(engine, interactive))
        assert other is not None, "the set-up must switch it to AR while it runs"
        served = await asyncio.wait_for(other, 60)
    finally:
        await engine.stop()
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
    [sent] = preempted_with
    assert deltas[-1].stats["preemptions"] == 1 and deltas[-1].stats["modes"] == ["refusion", "ar"]
    assert served[-1].finished and served[-1].error is None
    expected = sent + _causal_after(runner, list(spec.prompt_ids) + sent, 32 - len(sent))
    assert ids_of(deltas) == expected and len(expected) > len(sent)
    assert "".join(d.text for d in deltas) == runner.tokenizer.decode(expected, skip_special_tokens=True)
    assert deltas[-1].stats["generated_tokens"] == len(expected)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
async def test_a_preempted_auto_request_is_rerouted_again_once_its_rerun_has_caught_up(runner, pipelined):
    """A preempted AUTO request's rerun ran in its first mode to its end: it was never re-routed again.
    Now only while it retraces the ids it sent: then it switches at block boundaries as any AUTO request.
    Forced: the router starts AUTO requests in AR and switches them at each re-route (every 8 tokens, at a
    block boundary); preempted with 3 ids sent, the rerun retraces them in AR and switches at 8 as the
    run never preempted does, so its text is that run's."""
    from sched_fakes import flip_modes

    params = {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 4}  # blocks of 8
    spec = lambda: GenerationRequest("v", runner.tokenizer.encode(PROMPT), dict(params), mode=Mode.AUTO)  # noqa: E731
    interactive = _interactive(runner)

    async def run(preempt: bool) -> list:
        engine = await _engine(runner, pipelined)
        engine.config.routing.switch_interval_tokens = 8
        flip_modes(engine, Mode.AR)
        deltas, other = [], None
        try:
            async for delta in engine.submit(spec()):
                deltas.append(delta)
                if preempt and other is None and 3 <= len(ids_of(deltas)) < 8:
                    other = asyncio.ensure_future(collect(engine, interactive))
            if preempt:
                assert other is not None, "the set-up must preempt it before its first re-route"
                await asyncio.wait_for(other, 60)
        finally:
            await engine.stop()
        assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
        return deltas

    solo, preempted = await run(False), await run(True)
    assert solo[-1].stats["modes"][:2] == ["ar", "refusion"]  # (the set-up: it switches at 8)
    assert preempted[-1].stats["preemptions"] == 1 and preempted[-1].error is None
    assert preempted[-1].stats["modes"] == solo[-1].stats["modes"]  # re-routed again after the retrace
    assert ids_of(preempted) == ids_of(solo)


async def test_a_stop_string_after_a_preemption_counts_the_ids_sent(runner, monkeypatch):
    """A ReFusion request preempted while it holds committed slots past the ids it streamed, then ended
    by a stop string: its usage counted those slots (the requeue stored output_ids' length and the final
    count took the larger), 7 for 6 ids returned (helper-172). The preemption is forced once the
    decoder has committed past its stream."""
    import decoding.refusion as refusion

    prompt = runner.tokenizer.encode("class Node:\n    def __init__(self")
    params = {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 1}

    async def run(stop: list[str]) -> tuple[list, list[int]]:
        engine = await _engine(runner)
        taken, others = [], []
        absorb = refusion.RefusionDecoder.absorb

        def absorb_then_preempt(decoder, result):
            absorb(decoder, result)
            if decoder.seq_id == "v" and not others and len(decoder.output_ids()) > len(decoder.stream_ids()) >= 1:
                taken.append(len(decoder.stream_ids()))
                interactive = GenerationRequest("i", runner.tokenizer.encode("class A:\n"), {
                    "gen_length": 8, "slot_size": 8, "serial_num_blocks": 1}, mode=Mode.AR, priority=Priority.INTERACTIVE)
                others.append(asyncio.ensure_future(collect(engine, interactive)))

        monkeypatch.setattr(refusion.RefusionDecoder, "absorb", absorb_then_preempt)
        try:
            deltas = await collect(engine, GenerationRequest("v", prompt, dict(params), mode=Mode.REFUSION, stop=stop))
            await asyncio.gather(*others)
        finally:
            monkeypatch.setattr(refusion.RefusionDecoder, "absorb", absorb)
            await engine.stop()
        assert deltas[-1].stats["preemptions"] == 1, "the set-up must preempt it once"
        return deltas, taken

    free, [taken] = await run([])
    ids = ids_of(free)
    before = runner.tokenizer.decode(ids[:taken])
    stop = next(text for n in range(1, 8) if (text := runner.tokenizer.decode(ids[taken:taken + n])).strip()
                and text not in before)
    stopped, _ = await run([stop])
    assert stopped[-1].stats["stop_word"] == stop
    assert stopped[-1].stats["generated_tokens"] == len(ids_of(stopped)) < len(ids)


@pytest.mark.parametrize("preempt", [False, True], ids=["alone", "preempted"])
async def test_a_deadline_that_cuts_a_refusion_request_counts_the_ids_sent(runner, monkeypatch, preempt):
    """The deadline passes (forced: the request's arrival moved back) while the decoder holds committed
    slots past its stream: usage counted them, 7 for 4 ids returned (helper-173)."""
    import time

    import decoding.refusion as refusion

    engine = await _engine(runner)
    others, cut = [], []
    absorb = refusion.RefusionDecoder.absorb

    def absorb_then_act(decoder, result):
        absorb(decoder, result)
        req = engine._requests.get("v")
        if decoder.seq_id != "v" or req is None or not len(decoder.output_ids()) > len(decoder.stream_ids()) >= 1:
            return
        if preempt and not others:
            others.append(asyncio.ensure_future(collect(engine, GenerationRequest("i", runner.tokenizer.encode(
                "class A:\n"), {"gen_length": 8, "slot_size": 8, "serial_num_blocks": 1}, mode=Mode.AR,
                priority=Priority.INTERACTIVE))))
        elif not cut and (req.preemptions or not preempt):
            cut.append(len(decoder.stream_ids()))
            req.arrival_s = time.monotonic() - 10**4  # its max_time_ms is past

    monkeypatch.setattr(refusion.RefusionDecoder, "absorb", absorb_then_act)
    try:
        deltas = await collect(engine, GenerationRequest("v", runner.tokenizer.encode("class Node:\n    def __init__(self"),
                                                         {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 1},
                                                         mode=Mode.REFUSION, max_time_ms=10**6))
        await asyncio.gather(*others)
    finally:
        monkeypatch.setattr(refusion.RefusionDecoder, "absorb", absorb)
        await engine.stop()
    assert cut and deltas[-1].stats["preemptions"] == int(preempt)
    assert deltas[-1].finish_reason is FinishReason.DEADLINE
    assert deltas[-1].stats["generated_tokens"] == len(ids_of(deltas))


@pytest.mark.parametrize("streamed, finished, diverged, left", [
    ([1, 2], False, False, [1, 2, 3]),  # on its way: nothing to say yet
    ([1, 2], True, True, [1, 2, 3]),    # ended (EOS) before making the ids the client has: continue them
    ([1, 9], False, True, [1, 2, 3]),   # parted from them
    ([1, 2, 3, 4], True, False, []),    # made them all: nothing left to check
])
def test_a_rerun_that_ends_short_of_its_streamed_ids_has_diverged(streamed, finished, diverged, left):
    """replay_diverged on its own: a rerun that ends before it has made every id it streamed before its
    preemption must continue them (retrace), or the request ends short of the text the client has and
    its usage no longer counts that text (helper-222: the "ended early" case failed no test)."""
    from types import SimpleNamespace

    from scheduler.replay import replay_diverged

    req = SimpleNamespace(replay_ids=[1, 2, 3], stream_ids=lambda: list(streamed),
                          decoder=SimpleNamespace(finished=finished))
    assert replay_diverged(req) is diverged and req.replay_ids == left
