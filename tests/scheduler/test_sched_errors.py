"""Failures inside a step end only the requests they touch, free their KV and leave the engine serving."""

from __future__ import annotations

import asyncio

from sched_fakes import FakeFactory, FakeRunner, collect, ids_of, make_engine

from scheduler.api import FinishReason, GenerationRequest, Mode
from workers.kv_blocks import KVCacheFullError


def req(rid, gen=6):
    return GenerationRequest(rid, [5, 6, 7], {"gen_length": gen}, mode=Mode.AR)


def fail_execute_when(runner, failure):
    """Wrap runner.execute: `failure(segments)` returns the exception to raise instead, or None to run."""
    original = runner.execute

    def execute(segments):
        exc = failure(segments)
        if exc is not None:
            raise exc
        return original(segments)

    runner.execute = execute


async def test_a_failed_forward_errors_its_batch_and_the_engine_keeps_serving():
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    failures = []

    def first_call_fails(segments):
        if not failures:
            failures.append(True)
            return RuntimeError("device lost")
        return None

    fail_execute_when(runner, first_call_fails)
    failed = await asyncio.gather(collect(engine, req("a")), collect(engine, req("b")))
    for deltas in failed:
        assert deltas[-1].finish_reason is FinishReason.ERROR and "device lost" in deltas[-1].error
    assert runner.blocks.num_free == runner.blocks.num_total
    after = await collect(engine, req("c"))
    assert after[-1].finish_reason is FinishReason.LENGTH and len(ids_of(after)) == 6
    await engine.stop()


async def test_a_decoder_that_raises_errors_only_its_own_request():
    factory = FakeFactory()
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, factory=factory, prefix_cache=False)
    await engine.start()
    original_create = factory.create

    def create(mode, seq_id, *args):
        decoder = original_create(mode, seq_id, *args)
        if seq_id == "bad":
            def absorb(result):
                raise ValueError("corrupt result")
            decoder.absorb = absorb
        return decoder

    factory.create = create
    bad, good = await asyncio.gather(collect(engine, req("bad")), collect(engine, req("good")))
    assert bad[-1].finish_reason is FinishReason.ERROR and "corrupt result" in bad[-1].error
    assert good[-1].finish_reason is FinishReason.LENGTH and len(ids_of(good)) == 6
    assert runner.blocks.num_free == runner.blocks.num_total
    await engine.stop()


async def test_a_decoder_that_cannot_be_built_fails_that_request_at_start():
    factory = FakeFactory()
    engine, runner = make_engine(factory=factory, prefix_cache=False)
    await engine.start()

    def create(*args):
        raise ValueError("no decoder for this request")

    factory.create = create
    deltas = await collect(engine, req("x"))
    assert deltas[-1].finish_reason is FinishReason.ERROR and "no decoder" in deltas[-1].error
    assert engine.scheduler.running == [] and runner.blocks.num_free == runner.blocks.num_total
    await engine.stop()


async def test_a_kv_full_forward_requeues_the_youngest_request_and_loses_nothing():
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    refusals = []

    def short_of_kv(segments):  # the first two batches of more than one request are refused
        if len(refusals) < 2 and len(segments) > 1:
            refusals.append([s.seq_id for s in segments])
            return KVCacheFullError(len(segments), 0)
        return None

    fail_execute_when(runner, short_of_kv)
    solo = [await collect(engine, req(f"solo{i}")) for i in range(3)]  # one at a time: never refused
    outs = await asyncio.gather(*(collect(engine, req(f"r{i}")) for i in range(3)))
    assert refusals, "the fake never refused a batch"
    for deltas, alone in zip(outs, solo):
        assert deltas[-1].finish_reason is FinishReason.LENGTH and ids_of(deltas) == ids_of(alone)
    assert engine.metrics.finished.labels(reason="error")._value.get() == 0
    assert runner.blocks.num_free == runner.blocks.num_total
    await engine.stop()


async def test_a_request_that_never_fits_fails_alone_instead_of_looping():
    runner = FakeRunner(num_blocks=64)
    engine, _ = make_engine(runner=runner, prefix_cache=False)
    await engine.start()
    fail_execute_when(runner, lambda segments: KVCacheFullError(99, 0) if any(s.seq_id == "big" for s in segments) else None)
    big = await asyncio.wait_for(collect(engine, req("big")), 10)
    assert big[-1].finish_reason is FinishReason.ERROR and "KV cache full" in big[-1].error
    small = await asyncio.wait_for(collect(engine, req("small")), 10)
    assert small[-1].finish_reason is FinishReason.LENGTH and len(ids_of(small)) == 6
    assert runner.blocks.num_free == runner.blocks.num_total
    await engine.stop()
