"""CUDA graphs of the device step, one per step layout (workers.step_layout.StepLayout): the common layouts
captured at start-up, the others the first time they occur.

A packed step's shapes are bucketed (powers of two for tokens T, sequences B, query length Q, context
blocks NB and read rows R, plus two flags), so a serving run meets a small set of layouts again and
again: every decode step of up to 16 requests with short contexts is one layout. The first time an
admitted layout appears (at start-up, or while serving for a layout start-up did not cover), `StepGraphs` runs the step eagerly on a side stream (this is the step's real
execution: its results are returned and its K/V written) and then captures `step_fn` on a static copy of
the input buffer. Later steps of that layout copy their buffer into the static one and replay: one
launch instead of a few thousand kernel launches, which is what bounds a small-batch forward on a GPU
(nano-vllm and vLLM capture per batch-size bucket the same way).

Replaying writes the same K/V the eager step would (the graph reads the KV tensors the runner owns; they
never move), and returns the graph's own `values` tensor, overwritten by the next replay: the runner
copies it to the host before it packs the next step. A graph keeps no logits: its [R, V] float32 rows
(155 MB for 256 rows of a 151,936-token vocabulary) are freed when its capture ends, so the graphs of
one StepGraphs, which share one memory pool and replay one at a time, reuse that memory. A step that
reads logits rows (tests and debugging) runs eagerly (`eager`). Measured on an H200 with the 8B shape
(docs/benchmarks.md): with the logits kept, 60 start-up graphs took 4.6 GB and the memory budget left
the other layouts eager.

Each StepGraphs owns its memory pool (`CudaCapture`). One pool shared by every runner of a process was
wrong: once a dropped runner's graphs had released it, the next capture into it failed PyTorch's
allocator assertion `use_count > 0` (seen on an H200, torch 2.11, when a second runner was built).

Admission (`GraphPolicy`): layouts with at most `max_tokens` tokens (small steps are launch-bound; large
ones are compute-bound, where a graph gains nothing), at most `max_graphs` graphs, and captures stop
once their memory (growth of the CUDA caching allocator's reserved bytes; all graphs share one memory
pool) reaches `memory_budget_bytes` (an over-estimate: the growth includes what the eager warm-up
cached). Everything else runs eagerly. `stats()` reports graphs, capture
time and memory for /v1/engine.

Start-up capture (`startup_steps`, run by `ModelRunner.capture_startup_graphs` when the runner is built):
the layouts of uniform steps, n = 1..`startup_max_seqs` sequences of q query tokens each (q in
`startup_query_lens`: 1 is an AR decode step, the slot size a ReFusion plan or verify step) reading
every query row, for every context-block bucket up to `startup_max_context` tokens. These are the steps
the decoders produce most (tests/workers/test_graphs.py checks that AR decode and single-slot ReFusion
steps after start-up capture nothing new); other admitted layouts (mixed batches, partial reads) are
still captured the first time they occur, within the same bounds.

CUDA only (torch.cuda.CUDAGraph). The admission and bookkeeping run anywhere with an injected capture
function (tests/workers/test_graphs.py); capture and replay are checked against eager in tests/gpu.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from workers.step_layout import MIN_BLOCKS, StepLayout

StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (model, kv, buffer, layout) -> (values, logits, kept)


@dataclass(frozen=True)
class GraphPolicy:
    """Which step layouts get a CUDA graph, and which are captured at start-up (module docstring).

    Raises ValueError naming the field for a value that is not an int of the right range (the fields
    come from serve config: `runner.cuda_graphs`)."""

    max_tokens: int = 256
    max_graphs: int = 256  # room for the per-request options' layouts beside the engine's (~90 on an H200)
    memory_budget_bytes: int = 4 << 30
    startup_query_lens: tuple[int, ...] = (1, 8)  # AR decode; ReFusion slot of 8 (the shipped model's)
    startup_max_seqs: int = 32
    startup_max_context: int = 2048  # tokens; capped by the KV cache's size

    def __post_init__(self) -> None:
        lens = self.startup_query_lens
        if not isinstance(lens, (list, tuple)) or not all(_is_int(q) and q > 0 for q in lens):
            raise ValueError(f"cuda_graphs.startup_query_lens: {lens!r} must be a list of positive token counts "
                             "([] captures nothing at start-up)")
        object.__setattr__(self, "startup_query_lens", tuple(lens))
        for name, low in (("max_tokens", 1), ("max_graphs", 0), ("memory_budget_bytes", 0),
                          ("startup_max_seqs", 1), ("startup_max_context", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"cuda_graphs.{name}: {value!r} must be an integer >= {low}")

    def admits(self, layout: StepLayout, graphs: int, bytes_used: int) -> bool:
        return layout.num_tokens <= self.max_tokens and graphs < self.max_graphs and bytes_used < self.memory_budget_bytes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def startup_steps(policy: GraphPolicy, block_size: int, max_context: int) -> list[tuple[int, int, int]]:
    """The uniform steps to capture at start-up, as (sequences n, query tokens q per sequence, context
    tokens per sequence), in capture order: q as listed (AR decode first), then context buckets from the
    shortest, then n. `max_context` (tokens the KV cache holds) caps `policy.startup_max_context`. The
    context lengths are the context-block buckets (workers.step_layout.bucket, at least MIN_BLOCKS blocks)
    times `block_size`; several n share a layout, and steps over `max_tokens` tokens are left out (the
    runner packs each and keeps one step per distinct layout)."""
    limit = min(policy.startup_max_context, max_context)
    blocks, buckets = MIN_BLOCKS, []
    while blocks * block_size <= limit:
        buckets.append(blocks)
        blocks *= 2
    return [(n, q, nb * block_size) for q in policy.startup_query_lens for nb in buckets
            for n in range(1, policy.startup_max_seqs + 1) if n * q <= policy.max_tokens]


@dataclass
class CapturedStep:
    """A captured step: feed `input` (static buffer), `replay()`, read `values` (and `kept`, the deferred
    read rows' logits [D, V]; [0, V] for a layout without deferred reads)."""

    input: torch.Tensor
    replay: Callable[[], None]
    values: torch.Tensor
    kept: torch.Tensor


Capture = Callable[[StepFn, tuple, torch.Tensor, StepLayout], tuple[CapturedStep, tuple[torch.Tensor, ...]]]


class StepGraphs:
    """A drop-in for `step_forward` (same signature) that replays captured graphs where it can."""

    def __init__(self, step_fn: StepFn, policy: GraphPolicy | None = None, capture: Capture | None = None):
        self.step_fn = step_fn
        self.policy = policy or GraphPolicy()
        self._capture = capture or CudaCapture()
        self.graphs: dict[StepLayout, CapturedStep] = {}
        self.capture_s = 0.0
        self.bytes_used = 0
        self.replays = 0
        self.eager_steps = 0
        self.startup: dict | None = None  # {"graphs", "seconds", "bytes"} once start-up capture ran

    def __call__(self, model, kv, buffer: torch.Tensor, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                       torch.Tensor]:
        """(values, logits, kept) as step_forward's; logits is None when the step replayed a graph (graphs
        keep none: use `eager` for a step that reads logits rows; they keep the deferred rows' [D, V])."""
        graph = self.graphs.get(layout)
        if graph is not None:
            graph.input.copy_(buffer)
            graph.replay()
            self.replays += 1
            return graph.values, None, graph.kept
        if not self.policy.admits(layout, len(self.graphs), self.bytes_used):
            return self.eager(model, kv, buffer, layout)
        start, before = time.perf_counter(), _reserved(buffer.device)
        graph, outputs = self._capture(self.step_fn, (model, kv), buffer, layout)
        self.bytes_used += max(0, _reserved(buffer.device) - before)
        self.capture_s += time.perf_counter() - start
        self.graphs[layout] = graph
        return outputs

    def eager(self, model, kv, buffer: torch.Tensor, layout: StepLayout) -> tuple[torch.Tensor, ...]:
        """The step run eagerly, graphs aside (counted in `eager_steps`): for a layout not admitted, and for
        a step that reads logits rows."""
        self.eager_steps += 1
        return self.step_fn(model, kv, buffer, layout)

    def stats(self) -> dict:
        """For /v1/engine: graphs held, capture seconds and bytes (all captures), replayed and eager steps,
        and what start-up capture took ({"graphs", "seconds", "bytes"}; None before it ran)."""
        return {"graphs": len(self.graphs), "capture_s": round(self.capture_s, 3), "capture_bytes": self.bytes_used,
                "memory_budget_bytes": self.policy.memory_budget_bytes, "replays": self.replays,
                "eager_steps": self.eager_steps, "startup": self.startup}


def _reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


class CudaCapture:
    """The real capture (torch.cuda.CUDAGraph) into one memory pool of its own, made at the first capture
    and shared by every graph this instance captures (they replay one at a time)."""

    def __init__(self):
        self.pool = None

    def __call__(self, step_fn: StepFn, state: tuple, buffer: torch.Tensor,
                 layout: StepLayout) -> tuple[CapturedStep, tuple[torch.Tensor, ...]]:
        """Run the step once eagerly on a side stream (its real execution; cuBLAS and friends set up their
        workspaces there, as CUDA graph capture requires), then capture it reading a static copy of
        `buffer`, keeping its values and the deferred rows' logits only (the [R, V] logits' memory returns
        to the pool). Returns the captured step and the eager run's outputs (values, logits, kept)."""
        model, kv = state
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static = buffer.clone()
        side = torch.cuda.Stream(device=buffer.device)
        side.wait_stream(torch.cuda.current_stream(buffer.device))
        with torch.cuda.stream(side):
            outputs = step_fn(model, kv, static, layout)
        # The eager outputs were made on the side stream and are read on the current one, which waits for
        # it here; the runner copies them to the host before anything can reuse their memory.
        torch.cuda.current_stream(buffer.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            values, _, kept = step_fn(model, kv, static, layout)
        return CapturedStep(static, graph.replay, values, kept), outputs
