"""Shared fixtures. Model directories are built once per test session (seconds on 2 cores).

`wait_until` is the one way a test waits for something to happen: a bounded poll of observable state.
It is a fixture, not an importable function: test directories are not packages, so `from conftest
import ...` gets whichever conftest.py pytest imported last (tests/integrations/conftest.py in a full run).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the 2-core machine: one torch thread each (torch's
    # default of one per core would run four spinning OpenMP threads on two cores). Set before anything
    # imports torch; Ray's workers and the CLI subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS; importing torch does not import Triton)

if not torch.cuda.is_available():
    # Triton decides at its first import whether `triton.jit` compiles or interprets: without CUDA its
    # interpreter runs workers.paged_kernel on CPU tensors (tests/workers/test_attention_paged.py).
    # Nothing else here runs Triton kernels on the CPU (inductor's CPU backend generates C++).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "refusion-tiny-code"
# Bound on every wait for state. Generous on purpose: a loaded 2-core machine must never fail a test
# falsely, and a wait whose condition holds returns at once, so the bound costs nothing when all is well.
WAIT_S = 120.0


RAY_GROUP = "ray"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Units of work for a parallel run (`make test`: pytest-xdist's `--dist loadgroup
    --no-loadscope-reorder`); serial runs keep the collected order.

    Every test on a Ray instance the session shares (fixtures `serve_port`, the local Ray Serve instance,
    and `cluster`, the two-node cluster) is in one unit, RAY_GROUP: one worker runs them one after
    another, so one local Ray Serve instance serves them all and the cluster's tests never compete with
    it for the 2 cores. That unit, over half of the suite's time, goes first; the other worker runs the
    other tests meanwhile, a module per unit (its module-scoped fixtures built once; a module's tests off
    Ray are a unit apart from its tests on Ray). Only
    tests/integrations/test_serve_process.py, whose `refusion serve` starts a Ray of its own, may run
    beside the unit."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def on_ray(item) -> bool:
        return bool({"serve_port", "cluster"} & set(item.fixturenames))

    for item in items:
        item.add_marker(pytest.mark.xdist_group(RAY_GROUP if on_ray(item) else item.nodeid.split("::")[0]))
    items.sort(key=lambda item: not on_ray(item))


_niced = False


def pytest_runtest_setup(item):
    """In a parallel run, the worker that runs a test outside RAY_GROUP lowers its CPU priority (os.nice,
    for the rest of its life; its subprocesses inherit it), so the Ray unit, the run's critical path, gets
    the cores when it needs them and the other tests take what it leaves. To 19, below Ray's own worker
    processes (the Serve replicas doing the Ray unit's forwards), which Ray starts at nice 15 (its
    `worker_niceness`): at 10 this worker had three times their CPU weight, the opposite of the intent."""
    global _niced
    group = item.get_closest_marker("xdist_group")
    if not _niced and group is not None and group.args[0] != RAY_GROUP:
        os.nice(19 - os.nice(0))
        _niced = True


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
