"""Fixtures shared by the scheduler tests that run the engine on a real ModelRunner.

Their runners are built with device="cpu", also on a machine with a GPU: the tests compare exact
float32 outputs and several wrap `runner.execute`, which the CUDA defaults would bypass (asynchronous
scheduling calls the runner's launch and collect; a test waiting on such a hook hung there). The CUDA
engine is tests/gpu's."""

from __future__ import annotations

import pytest


@pytest.fixture
async def engine_factory(runner):
    """`await engine_factory(**EngineConfig fields)`: a started Engine on the module's `runner` fixture;
    at teardown every engine is stopped and must hold no sequence and no block."""
    from scheduler.config import EngineConfig
    from scheduler.engine import Engine

    engines = []

    async def make(**config):
        engine = Engine(runner, runner.tokenizer, EngineConfig(**config))
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop(drain_timeout_s=1)
        assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
