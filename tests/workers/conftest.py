"""Fixtures shared by the runner tests: a RunnerSession (the simplest owner of KV) over each test
module's `runner`, freed after every test, which must leave no block held."""

from __future__ import annotations

import pytest


@pytest.fixture
def session(runner):
    from workers.session import RunnerSession

    session = RunnerSession(runner)
    yield session
    session.free_all()
    assert session.blocks.num_free == session.blocks.num_total
