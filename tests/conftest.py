"""Shared fixtures. Model directories are built once per test session (seconds on 2 cores).

`wait_until` is the one way a test waits for something to happen: a bounded poll of observable state.
It is a fixture, not an importable function: test directories are not packages, so `from conftest
import ...` gets whichever conftest.py pytest imported last (tests/integrations/conftest.py in a full run).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "refusion-tiny-code"
# Bound on every wait for state. Generous on purpose: a loaded 2-core machine must never fail a test
# falsely, and a wait whose condition holds returns at once, so the bound costs nothing when all is well.
WAIT_S = 120.0


class StatePoll:
    """Poll a predicate until it is truthy; fail after `timeout_s` naming what was awaited.

    Never a fixed sleep followed by an assert: whatever a test needs to have happened, it waits for here.
    """

    def __init__(self, timeout_s: float = WAIT_S):
        self.timeout_s = timeout_s

    async def __call__(self, predicate, what: str, interval_s: float = 0.005):
        """Await `predicate()` (a value, or an awaitable for state behind I/O) until truthy; return it."""
        end = time.monotonic() + self.timeout_s
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            assert time.monotonic() < end, f"timed out after {self.timeout_s:g} s waiting for {what}"
            await asyncio.sleep(interval_s)

    def blocking(self, predicate, what: str, interval_s: float = 0.05):
        """The same for synchronous tests and fixtures (no event loop)."""
        end = time.monotonic() + self.timeout_s
        while not (value := predicate()):
            assert time.monotonic() < end, f"timed out after {self.timeout_s:g} s waiting for {what}"
            time.sleep(interval_s)
        return value


@pytest.fixture(scope="session")
def wait_until() -> StatePoll:
    """`await wait_until(predicate, "what")`, or `wait_until.blocking(...)` outside an event loop."""
    return StatePoll()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight tiny Qwen3 (GQA 4/2 heads, tied head) with a real BPE tokenizer and mask token."""
    from model_factory import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    """Like tiny_model_dir but with an untied LM head and 3 layers, MHA (4/4 heads)."""
    from model_factory import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("tiny-untied"), num_layers=3, num_kv_heads=4, tie_word_embeddings=False, seed=1
    )
