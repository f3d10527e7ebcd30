"""ModelRunner: the model, its paged KV cache and the packed forward behind `execute(segments)`.

One `execute` call = one model forward over every query token of every segment ([T, hidden]), then
the reads of all segments computed on the device and moved to the host in one transfer. KV semantics
(truncate to context_len, append kept tokens in query order) follow workers/batch.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workers import loader
from workers.attention import AttentionPlan, backends, default_backend
from workers.batch import ReadKind, Segment, SegmentResult
from workers.kv_blocks import BlockPool, BlockTables, KVCacheFullError
from workers.kv_cache import PagedKVCache, blocks_for_budget
from workers.model import Qwen3, build_model
from workers.reads import ReadRequest, compute_results
from workers.transfer import to_device


class SegmentError(ValueError):
    """A segment cannot run as given. `seq_id` and `field` name the culprit; the message says what to change."""

    def __init__(self, seq_id: str, field_name: str, message: str):
        super().__init__(f"segment {seq_id}: {field_name}: {message}")
        self.seq_id, self.field = seq_id, field_name


@dataclass(frozen=True)
class ModelInfo:
    """What callers need to know about the loaded model."""

    vocab_size: int
    eos_token_id: int
    mask_token_id: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    device: str


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_and_dtype(device: str | None, dtype: torch.dtype | str | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: cuda when available, else cpu; bfloat16 on cuda, float32 on cpu. dtype may be a name."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.removeprefix("torch.")]
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


class ModelRunner:
    """Owns the Qwen3 weights, the KV block pool and tensors, and each sequence's generator."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype | str | None = None, device: str | None = None,
                 block_size: int = 16, num_blocks: int | None = None, kv_memory_bytes: int | None = None,
                 attention: str | None = None):
        """Load a Qwen3 HF directory (workers.loader; errors are ModelDirError).

        dtype: torch dtype or name; default float32 on CPU, bfloat16 on CUDA. device: default cuda when
        available. KV cache: `num_blocks` blocks of `block_size` tokens, or as many as `kv_memory_bytes`
        holds, or a device default (workers.kv_cache). attention: "segment" (CPU default) or
        "batched" (CUDA default), see workers.attention.
        """
        device, dtype = _device_and_dtype(device, dtype)
        model_dir = Path(model_dir)
        config = loader.read_config(model_dir)
        tokenizer = loader.load_tokenizer(model_dir)
        mask_id = loader.resolve_mask_token_id(config, tokenizer, model_dir)
        weights = loader.read_weights(model_dir, config, dtype=dtype, device=device)
        model = build_model(config, weights, dtype=dtype, device=device)
        self._setup(model, tokenizer, mask_id, block_size, num_blocks, kv_memory_bytes, attention)

    @classmethod
    def from_model(cls, model: Qwen3, *, mask_token_id: int, tokenizer=None, block_size: int = 16,
                   num_blocks: int | None = None, kv_memory_bytes: int | None = None,
                   attention: str | None = None) -> ModelRunner:
        """A runner over an already built model (benchmarks: `workers.model.random_model`); no directory."""
        runner = cls.__new__(cls)
        runner._setup(model, tokenizer, mask_token_id, block_size, num_blocks, kv_memory_bytes, attention)
        return runner

    def _setup(self, model: Qwen3, tokenizer, mask_id: int, block_size: int, num_blocks: int | None,
               kv_memory_bytes: int | None, attention: str | None) -> None:
        config, weight = model.cfg, model.lm_head.weight
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device, self.dtype = weight.device, weight.dtype
        self.attention = attention or default_backend(self.device)
        if self.attention not in backends():
            raise ValueError(f"attention must be one of {sorted(backends())}, got {self.attention!r}")
        n = blocks_for_budget(config, block_size, self.dtype, self.device, num_blocks, kv_memory_bytes)
        self.blocks = BlockPool(n, block_size)
        self._tables = BlockTables(self.blocks)
        self.kv = PagedKVCache(config, n, block_size, self.dtype, self.device)
        self._generators: dict[str, torch.Generator] = {}
        self.info = ModelInfo(
            vocab_size=config.vocab_size, eos_token_id=config.eos_token_id, mask_token_id=mask_id,
            num_layers=config.num_layers, hidden_size=config.hidden_size, num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, block_size=block_size,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
        )

    # ---- sequence bookkeeping -------------------------------------------------------------------
    def cached_len(self, seq_id: str) -> int:
        """Tokens in the sequence's cache (0 for unknown ids)."""
        return self._tables.length(seq_id)

    def sequences(self) -> list[str]:
        """Ids of every sequence holding a block table (empty once all are freed)."""
        return self._tables.seq_ids()

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's block ids, in cache order."""
        return self._tables.table(seq_id)

    def adopt_prefix(self, seq_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Start a new sequence on shared full blocks (one more reference each; they stay read-only)."""
        self._tables.adopt_prefix(seq_id, block_ids, num_tokens)

    def free(self, seq_id: str) -> None:
        """Release every block of the sequence and drop its generator (finish or cancel). Idempotent."""
        self._tables.free(seq_id)
        self._generators.pop(seq_id, None)

    # ---- the forward ----------------------------------------------------------------------------
    def execute(self, segments: list[Segment]) -> list[SegmentResult]:
        """Run all segments in one packed forward; results in the order of `segments`."""
        if not segments:
            return []
        self._validate(segments)
        new = {s.seq_id for s in segments if s.seq_id not in self._tables}
        try:
            for seg in segments:
                self._tables.truncate(seg.seq_id, seg.context_len)
                if seg.seq_id not in self._generators:
                    self._generators[seg.seq_id] = torch.Generator(device=self.device).manual_seed(seg.sampling.seed)
            needed = sum(self._tables.blocks_needed(s.seq_id, s.num_kept) for s in segments)
            if needed > self.blocks.num_free:
                raise KVCacheFullError(needed, self.blocks.num_free)
            context_slots = [self._tables.context_slots(s.seq_id, s.context_len) for s in segments]
            write_slots = [self._tables.append_slots(s.seq_id, s.num_kept) for s in segments]
            return self._forward(segments, context_slots, write_slots)
        except BaseException:
            for seg in segments:  # leave no trace of a failed call beyond the requested rollback
                if seg.seq_id in new:
                    self.free(seg.seq_id)
                else:
                    self._tables.truncate(seg.seq_id, seg.context_len)
            raise

    def _forward(self, segments, context_slots, write_slots) -> list[SegmentResult]:
        dev = self.device
        token_ids = to_device([t for s in segments for t in s.token_ids], dev)  # [T]
        positions = to_device([p for s in segments for p in s.positions], dev)  # [T]
        plan = AttentionPlan.build(segments, context_slots, write_slots, dev)
        hidden = self.model.hidden(token_ids, positions, backends()[self.attention](self.kv, plan))  # [T, H]
        read_rows, requests = [], []
        for seg, (start, _) in zip(segments, plan.rows):
            requests.append(ReadRequest(seg, len(read_rows), self._generators[seg.seq_id]))
            read_rows.extend(start + r.row for r in seg.reads)
        if not read_rows:
            return [SegmentResult(s.seq_id, []) for s in segments]
        logits = self.model.logits(hidden[to_device(read_rows, dev)])  # [R, V] float32
        return compute_results(logits, requests)

    def _validate(self, segments: list[Segment]) -> None:
        seen = set()
        vocab = self.config.vocab_size
        for seg in segments:
            if seg.seq_id in seen:
                raise SegmentError(seg.seq_id, "seq_id", "appears twice in one execute call; send one segment per sequence")
            seen.add(seg.seq_id)
            if seg.context_len > self.cached_len(seg.seq_id):
                raise SegmentError(seg.seq_id, "context_len", f"{seg.context_len} exceeds the "
                                   f"{self.cached_len(seg.seq_id)} cached tokens; it may only roll back")
            if min(seg.token_ids) < 0 or max(seg.token_ids) >= vocab:
                raise SegmentError(seg.seq_id, "token_ids", f"ids must lie in 0..{vocab - 1}")
            if min(seg.positions) < 0:
                raise SegmentError(seg.seq_id, "positions", "positions must be >= 0")
            for read in seg.reads:
                if read.kind is ReadKind.PROB and not 0 <= read.token < vocab:
                    raise SegmentError(seg.seq_id, "reads", f"PROB read token {read.token} outside 0..{vocab - 1}")
            if seg.sampling.temperature < 0 or not 0 < seg.sampling.top_p <= 1 or seg.sampling.top_k < 0:
                raise SegmentError(seg.seq_id, "sampling", "need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
