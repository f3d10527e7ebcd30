"""ModelRunner: the model, its KV tensors and `execute(segments, block_tables)` (scheduler.api.Runner).

This module owns loading and setting up a runner and the step's launch-and-collect path. One `execute`
call = one engine step:
    pack (workers.packing, numpy) -> validate (workers.validation) -> one host->device copy
    -> step_forward (workers.step: forward of every token, K/V writes, reads of every read row)
    -> one device->host copy of [2, R] float64 -> SegmentResults (workers.results).
`execute` = `collect(launch(...))`: `launch` queues the step's device work and its results' copy to the
host and returns; `collect` waits for them. A step with grammar-constrained segments whose bitmasks are
not known at launch (Segment.deferred_mask) keeps those rows' logits; `finish_reads(launched, bitmasks)`
makes their reads (workers.deferred) and queues the copy to the host. A segment with `feedback` takes its
first token from the previous launched step's read on the device (workers.feedback), so step N + 1 can
be launched before step N's results reach the host (the engine's asynchronous scheduling,
EngineConfig.async_scheduling). The device, dtype and step function come from the constructor's options
through workers.runner_options.
The runner owns tensors and the device, never KV blocks (style rule 13): whoever schedules the
sequences prepares each segment's block table (workers.kv_blocks.BlockTables.prepare) and the runner
writes only where it is told. It never allocates and never refuses for lack of KV. The KV tensors
hold `num_kv_blocks` blocks for the owner plus one scratch block (index num_kv_blocks) that dropped
query tokens and padding write into, so the K/V write is one fixed-shape index_copy_.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from workers import loader
from workers.batch import TOKEN_BAN, Reads, Segment, SegmentResult, notify_launched
from workers.deferred import bitmask_rows, deferred_reads
from workers.feedback import mark_feedback, resolve_feedback
from workers.graphs import StepGraphs, startup_steps
from workers.kv_blocks import DEFAULT_BLOCK_SIZE
from workers.kv_cache import PagedKVCache, blocks_for_budget
from workers.model import Qwen3, build_model
from workers.packing import pack_step
from workers.results import LaunchedStep, copy_to_host, unpack_results
from workers.runner_options import device_and_dtype, step_function
from workers.step_layout import PackedStep
from workers.transfer import StepUploader
from workers.validation import SegmentError, validate_step

__all__ = ["LaunchedStep", "ModelInfo", "ModelRunner", "SegmentError"]


@dataclass(frozen=True)
class ModelInfo:
    """What callers need to know about the loaded model and its KV cache (scheduler.api.RunnerInfo)."""

    vocab_size: int
    eos_token_id: int
    end_token_ids: tuple[int, ...]  # the other ids that end a text as EOS does (workers.tokenizer.end_token_ids)
    mask_token_id: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # blocks the owner may hand out (block ids 0 .. num_kv_blocks - 1)
    dtype: str
    device: str


class ModelRunner:
    """Owns the Qwen3 weights and the KV tensors; executes packed steps."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype | str | None = None, device: str | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
                 kv_memory_bytes: int | None = None, cuda_graphs: bool | dict | None = None, attention: str = "sdpa",
                 compile_layers: bool | None = None):
        """Load a Qwen3 HF directory (workers.loader; errors are ModelDirError).

        dtype: torch dtype or name; default float32 on CPU, bfloat16 on CUDA. device: default cuda when
        available. KV cache: `num_blocks` blocks of `block_size` tokens, or as many as `kv_memory_bytes`
        holds, or a device default (workers.kv_cache); one scratch block comes on top. cuda_graphs: True
        or workers.graphs.GraphPolicy fields (max_tokens, max_graphs, memory_budget_bytes, startup_*) to
        replay steps from CUDA graphs per layout, the common ones captured here (capture_startup_graphs;
        {} is the default policy); False runs every step eagerly. Raises ValueError for cuda_graphs on a device that is not CUDA or
        a GraphPolicy field out of range. attention: "sdpa" (workers.attention: gathers each sequence's
        context; the default, faster than flex eagerly on an H200), "flex" (workers.attention_flex: reads the
        paged cache in place) or "paged" (workers.attention_paged: one Triton kernel per layer reads the paged
        cache in place and writes the step's K/V; CUDA, or the CPU under Triton's interpreter); ValueError for
        another name, or for "paged" where it cannot run (the message says why). compile_layers: run the work around attention
        (norms, residual adds, RoPE, SwiGLU) through torch.compile (workers.model.compiled_kernels: fused
        Triton kernels, which need Triton's C compiler at the first step); False keeps them eager.
        cuda_graphs and compile_layers left None are on for CUDA and off elsewhere, as vLLM compiles and
        captures unless told --enforce-eager: on an H200 with the 8B shape they took a batch-1 forward
        from 35 ms to 7.5 ms (docs/benchmarks.md), for 15-25 s of compile and capture at start-up.
        """
        device, dtype = device_and_dtype(device, dtype)
        model_dir = Path(model_dir)
        config = loader.read_config(model_dir)
        tokenizer = loader.load_tokenizer(model_dir)
        loader.check_tokenizer(config, tokenizer, model_dir)
        mask_id = loader.resolve_mask_token_id(config, tokenizer, model_dir)
        ends = loader.end_token_ids(config, tokenizer, model_dir, mask_id)
        weights = loader.read_weights(model_dir, config, dtype=dtype, device=device)
        model = build_model(config, weights, dtype=dtype, device=device)
        del weights  # the model holds the tensors now: fusing below then frees the unfused ones
        model.fuse_projections()
        self._setup(model, tokenizer, mask_id, block_size, num_blocks, kv_memory_bytes, cuda_graphs, attention,
                    compile_layers, end_token_ids=ends)

    @classmethod
    def from_model(cls, model: Qwen3, *, mask_token_id: int, tokenizer=None, block_size: int = DEFAULT_BLOCK_SIZE,
                   num_blocks: int | None = None, kv_memory_bytes: int | None = None,
                   cuda_graphs: bool | dict | None = None, attention: str = "sdpa", fuse_projections: bool = True,
                   compile_layers: bool | None = None) -> ModelRunner:
        """A runner over an already built model (benchmarks: `workers.model.random_model`); no directory.
        fuse_projections: merge q/k/v and gate/up weights (Qwen3.fuse_projections), as loading does;
        False keeps the model's tensors shared with whoever else holds them (a baseline on the same weights)
        and leaves compile_layers off by default; ValueError with compile_layers=True (the compiled
        functions take the merged weights). Other options as the constructor's."""
        if fuse_projections:
            model.fuse_projections()
        elif compile_layers is None:
            compile_layers = False
        elif compile_layers:
            raise ValueError("compile_layers: the compiled layer functions take merged projections; "
                             "keep fuse_projections=True or drop compile_layers")
        runner = cls.__new__(cls)
        runner._setup(model, tokenizer, mask_token_id, block_size, num_blocks, kv_memory_bytes, cuda_graphs, attention,
                      compile_layers)
        return runner

    def _setup(self, model: Qwen3, tokenizer, mask_id: int, block_size: int, num_blocks: int | None,
               kv_memory_bytes: int | None, cuda_graphs: bool | dict | None = None, attention: str = "sdpa",
               compile_layers: bool | None = None, end_token_ids: tuple[int, ...] = ()) -> None:
        config, weight = model.cfg, model.lm_head.weight
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device, self.dtype = weight.device, weight.dtype
        on_cuda = self.device.type == "cuda"  # the defaults (constructor docstring)
        cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        compile_layers = on_cuda if compile_layers is None else compile_layers
        n = blocks_for_budget(config, block_size, self.dtype, self.device, num_blocks, kv_memory_bytes)
        self.kv = PagedKVCache(config, n + 1, block_size, self.dtype, self.device)  # + the scratch block
        self.scratch_block = n
        self.step_fn = step_function(cuda_graphs, self.device, attention, compile_layers, block_size)
        self.attention, self.compile_layers = attention, compile_layers
        # Steps mixing widely different query lengths are split into attention groups for the portable
        # attention, which pads every sequence to the step's longest query (workers.attention_groups);
        # the paged backends read the cache in place and need none
        self.group_attention = attention == "sdpa"
        self._uploader = StepUploader(self.device)
        # (the last launched step's device values [rows, R], {seq_id: its first read row}): launch's feedback
        self._feedback_from: tuple[torch.Tensor, dict[str, int]] | None = None
        self._unfinished: LaunchedStep | None = None  # the last launched step, while its deferred reads wait
        self.info = ModelInfo(
            vocab_size=config.vocab_size, eos_token_id=config.eos_token_id, end_token_ids=tuple(end_token_ids),
            mask_token_id=mask_id,
            num_layers=config.num_layers, hidden_size=config.hidden_size, num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, block_size=block_size,
            num_kv_blocks=n, dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
        )
        self.capture_startup_graphs()

    def capture_startup_graphs(self) -> dict | None:
        """Capture the CUDA graphs of the common step layouts now (workers.graphs.startup_steps), so
        serving does not pay for them on its first steps. Each is a synthetic step (token 0, argmax reads
        of every row, the AR decode steps' mask ban, every block table and every write on the scratch block: no KV block of the owner is
        read or written) run through the graph wrapper, which captures layouts its policy admits, within
        max_graphs and memory_budget_bytes. Returns and records in stats() {"graphs" (captured by this
        call), "seconds", "bytes"}; None when cuda_graphs is off. Called by the constructor."""
        graphs = self.step_fn
        if not isinstance(graphs, StepGraphs):
            return None
        before, seconds, used = len(graphs.graphs), graphs.capture_s, graphs.bytes_used
        bs = self.info.block_size
        layouts = set()
        for n, q, context in startup_steps(graphs.policy, bs, self.info.num_kv_blocks * bs):
            # An AR decode step (q = 1) always carries one logit bias pair, the mask token's ban
            # (decoding.ar.ARDecoder._logit_bias): its layout has a bias table
            ban = ((self.info.mask_token_id, TOKEN_BAN),) if q == 1 else ()
            segments = [Segment(f"startup-{i}", context, [0] * q, list(range(context, context + q)), 0,
                                Reads(argmax=tuple(range(q))), logit_bias=ban) for i in range(n)]
            step = pack_step(segments, [[self.scratch_block] * (context // bs)] * n, bs, self.scratch_block)
            if step.layout not in layouts and step.layout.num_tokens <= graphs.policy.max_tokens:
                layouts.add(step.layout)
                self.collect(self._launch_packed(step, [s.seq_id for s in segments], [None] * n, [False] * n))
        self._feedback_from = None  # (no serving step may take its tokens from a synthetic one)
        graphs.startup = {"graphs": len(graphs.graphs) - before, "seconds": round(graphs.capture_s - seconds, 3),
                          "bytes": graphs.bytes_used - used}
        return graphs.startup

    def stats(self) -> dict:
        """For /v1/engine: the device and weights' dtype, the attention backend, whether layer kernels are
        compiled, and the CUDA graphs held and what capturing them cost (workers.graphs; None when off)."""
        return {"device": self.info.device, "dtype": self.info.dtype, "attention": self.attention,
                "compile_layers": self.compile_layers,
                "cuda_graphs": self.step_fn.stats() if isinstance(self.step_fn, StepGraphs) else None}

    @property
    def asynchronous(self) -> bool:
        """Whether `execute` queues the step's device work and then waits for it (CUDA), so that the
        caller can do other host work meanwhile (workers.batch.notify_launched fires before the work is
        done); on the CPU the work is done by the time it fires. scheduler.engine overlaps streaming
        with the forward by default only then (EngineConfig.overlap_streaming)."""
        return self.device.type == "cuda"

    @property
    def pad_steps(self) -> bool:
        """Whether steps are packed at bucketed shapes: what CUDA graphs and compiled layers key on (and
        what costs a GPU little). An eager CPU step computes every padding row (a 1-token step ran 16
        rows through each layer, twice the time), so it runs at its exact shape."""
        return isinstance(self.step_fn, StepGraphs) or self.compile_layers or self.device.type != "cpu"

    def pack(self, segments: Sequence[Segment], block_tables: Sequence[list[int]]) -> PackedStep:
        """Pack and validate a step (host only). Raises SegmentError naming the culprit segment."""
        step = pack_step(list(segments), list(block_tables), self.info.block_size, self.scratch_block, self.pad_steps,
                         group_attention=self.group_attention)
        validate_step(step, [s.seq_id for s in segments], self.info.vocab_size, self.info.num_kv_blocks)
        return step

    def execute(self, segments: Sequence[Segment], block_tables: Sequence[list[int]]) -> list[SegmentResult]:
        """Run every segment in one step; results in segment order (contract: workers/batch.py).

        block_tables[i] is segment i's block table covering context_len + num_kept tokens. Raises
        SegmentError (a ValueError naming seq_id and field) before any device work for a segment that
        cannot run (also for Segment.deferred_mask: its bitmask comes after launch, `finish_reads`); nothing
        is written then. Equals `collect(launch(...))`."""
        if not segments:
            return []
        deferred = next((s for s in segments if s.deferred_mask), None)
        if deferred is not None:
            raise SegmentError(deferred.seq_id, "deferred_mask", "execute makes every read at once; give "
                               "token_bitmask, or use launch and finish_reads")
        return self.collect(self.launch(segments, block_tables))

    def launch(self, segments: Sequence[Segment], block_tables: Sequence[list[int]]) -> LaunchedStep:
        """Pack, validate and queue a step's device work, its results' device -> host copy included, and
        return without waiting for it (on the CPU the work is done on return). `collect` returns the
        results; steps are collected in launch order. A segment with `feedback` set gets, on the device,
        the token its sequence's first read returned in the previous launched step, so a caller may launch
        step N + 1 before it collects step N (scheduler.engine's asynchronous scheduling). Raises
        SegmentError before any device work, as `execute`, also for a feedback segment whose sequence
        read nothing in the previous launched step (field "feedback").
        A step with Segment.deferred_mask segments is queued without those rows' reads and its results'
        copy: `finish_reads` gives their bitmasks and queues them. RuntimeError for a feedback step
        launched before the previous step's deferred reads are finished (its tokens would be read before
        they are chosen); a step without feedback finishes them unconstrained first (the caller
        abandoned that step: its results are not used)."""
        segments = list(segments)
        step = self.pack(segments, block_tables)
        feedback = any(s.feedback for s in segments)
        if self._unfinished is not None:
            if feedback:
                raise RuntimeError("launch: the previous step's deferred reads are not finished; call "
                                   "finish_reads(step, bitmasks) before launching a step that feeds back from it")
            self.finish_reads(self._unfinished, [None] * len(self._unfinished.seq_ids))
        if feedback:
            mark_feedback(step, segments, self._feedback_from[1] if self._feedback_from is not None else {})
        return self._launch_packed(step, [s.seq_id for s in segments], [s.logprobs for s in segments],
                                   [s.ranks for s in segments], feedback,
                                   [s.deferred_mask for s in segments] if step.layout.deferred_reads else None)

    def _launch_packed(self, step: PackedStep, seq_ids: list[str], logprobs: list[int | None], ranks: list[bool],
                       feedback: bool = False, deferred: list[bool] | None = None) -> LaunchedStep:
        """Upload a packed step, queue its device work and its values' copy to the host (module docstring;
        with `deferred`, each segment's deferred_mask, the copy waits for finish_reads)."""
        buffer = self._uploader.upload(step.buffer)
        step_fn = self.step_fn
        if step.wants_logits and isinstance(step_fn, StepGraphs):
            step_fn = step_fn.eager  # graphs keep no logits rows (workers.graphs)
        with torch.inference_mode():
            if feedback:
                resolve_feedback(buffer, step, self._feedback_from[0][0])
            values, logits, kept = step_fn(self.model, self.kv, buffer, step.layout)
            launched = LaunchedStep(step, seq_ids, logprobs, ranks, None, None, None)
            if deferred is None:
                copy_to_host(launched, values, self.device)
            else:  # (the reads and the copy wait for finish_reads)
                launched.deferred = (buffer, values, kept, deferred)
                self._unfinished = launched
            notify_launched()  # queued on the device: the engine streams the last step's text meanwhile
            launched.logits = logits.cpu().numpy() if step.wants_logits else None
        # What a feedback segment of the next step reads: this step's values (a graph's own output buffer is
        # overwritten only by a later replay, which the device runs after that step's feedback is resolved)
        starts, counts = step.read_starts.tolist(), step.num_token_reads.tolist()
        self._feedback_from = (values, {sid: starts[i] for i, sid in enumerate(seq_ids) if counts[i]})
        return launched

    def finish_reads(self, launched: LaunchedStep, bitmasks: Sequence[bytes | None]) -> None:
        """Make the reads of a launched step's Segment.deferred_mask segments under their grammar bitmasks
        and queue the step's results' copy to the host; nothing waits for the device (vLLM's structured
        output: the bitmask applied to the kept logits after the forward).

        bitmasks: one entry per segment of the step, in segment order: a deferred segment's bitmask
        (Segment.token_bitmask's layout) or None for every token; None for the other segments. The reads
        are those the step would have made with `token_bitmask` set at launch, the same draws included
        (workers.reads keys them by seed, step and position, not by batch). Call it once, before
        launching a step that feeds back from this one, and before `collect` (which finishes a step left
        unfinished with no bitmask: an abandoned step). Raises SegmentError naming the segment for a
        bitmask that cannot be used (field "token_bitmask", as at launch) or that is given for a segment
        without deferred_mask (field "deferred_mask"), before any device work; RuntimeError for a step
        with nothing deferred left to finish, or one another runner launched. Should the reads fail, the
        step stays unfinished (a feedback launch is refused; `collect` tries again without bitmasks)."""
        if launched.deferred is None:
            raise RuntimeError("finish_reads: the step has no deferred reads left to finish")
        if launched is not self._unfinished:  # (this runner's unfinished step is always the last it launched)
            raise RuntimeError("finish_reads: the step was launched by another runner; call that runner's")
        buffer, values, kept, deferred = launched.deferred
        rows_host = bitmask_rows(launched.step, launched.seq_ids, bitmasks, deferred, self.info.vocab_size)
        with torch.inference_mode():
            if self.device.type == "cuda":
                staged = torch.from_numpy(rows_host).pin_memory()
                launched.staged = staged  # (kept alive until the copy is done: collect)
                masks = staged.to(self.device, non_blocking=True)
            else:
                masks = torch.from_numpy(rows_host)
            rows, out = deferred_reads(buffer, launched.step.layout, kept, masks)
            values.index_copy_(1, rows, out)
            copy_to_host(launched, values, self.device)
        launched.deferred, self._unfinished = None, None

    def collect(self, launched: LaunchedStep) -> list[SegmentResult]:
        """Wait for a launched step's results (the GIL is released while the device works) and unpack
        them: one SegmentResult per segment, in segment order. A step whose deferred reads were not
        finished (finish_reads) is finished with no bitmask first: a caller collects such a step only
        to abandon it."""
        if launched.deferred is not None:
            self.finish_reads(launched, [None] * len(launched.seq_ids))
        if launched.done is not None:
            launched.done.synchronize()
        return unpack_results(launched.step, launched.seq_ids, launched.host.numpy(), launched.logits,
                              launched.logprobs, launched.ranks, hidden=self.info.mask_token_id)
