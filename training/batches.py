"""Sequence packing for the ReFusion objective: arranged examples laid end to end in rows of fixed length.

A batch is `rows` x `row_len` tokens ([R, L], static, so torch.compile and CUDA graphs see one shape).
Examples are placed first-fit in batch order; an example that fits in no row of the current batch opens
the next batch. The rows hold no padding between examples, only at their ends (a few percent with
row_len >= 2x the typical example; `PackedBatch.fill` reports it).

Attention stays what the objective defines (decoding/objective.py, spec "Training objective"): plain
causal attention over each example's physical order, and nothing across examples. That is a
block-diagonal causal mask per row, passed to the model as a 4D boolean mask [R, 1, L, L] (True = may
attend; transformers hands a 4D mask to SDPA as is). Padding tokens form a segment of their own, so
every query row sees at least itself (a fully masked row would give NaN even at weight 0).

The loss of a packed batch equals the loss of the same examples right-padded one per row (collate):
the same rows, labels and weights (training/losses.objective_loss: the AR labels' mean CE over the
batch, the MDM part divided by the number of examples; tests/training/test_trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from decoding.objective import IGNORE, KIND_NONE, ObjectiveExample

PAD_SEGMENT = -1
# A training example before the objective arranges it: (prompt_ids, response_ids), the response without EOS
Pair = tuple[Sequence[int], Sequence[int]]


class PackingError(ValueError):
    """A packing argument is unusable. `field` names it; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class PackedBatch:
    """Host-side arrays of one packed batch; every field is R lists of L values."""

    input_ids: list[list[int]]  # [R, L]
    position_ids: list[list[int]]  # [R, L] logical positions of each example (restart per example)
    labels: list[list[int]]  # [R, L] IGNORE where no loss
    weights: list[list[float]]  # [R, L] objective weight (before objective_loss's AR mean and MDM / num_examples)
    kinds: list[list[int]]  # [R, L] KIND_NONE / KIND_AR / KIND_MDM
    segments: list[list[int]]  # [R, L] index of the example within the batch; PAD_SEGMENT on padding
    num_examples: int

    @property
    def fill(self) -> float:
        """Share of the R x L tokens that belong to an example."""
        total = sum(len(r) for r in self.segments)
        return sum(s != PAD_SEGMENT for r in self.segments for s in r) / max(total, 1)

    def tensors(self, device) -> dict:
        """Tensors on `device`: input_ids, position_ids, labels, kinds [R, L] int64; weights [R, L]
        float32; attention_mask [R, 1, L, L] bool (block-diagonal causal, see module doc); loss_rows
        [n] int64, the flat (r * L + l) indices of the positions with a loss weight, found on the host so
        selecting them on the device is an index_select, not a boolean index (which waits for the GPU)."""
        import numpy as np
        import torch

        # lists -> numpy -> one copy each (torch.tensor on nested lists is ~10x slower); the 4D mask is
        # built on the device from the segments, never copied
        host = {name: torch.from_numpy(np.asarray(getattr(self, name), dtype=np.int64))
                for name in ("input_ids", "position_ids", "labels", "kinds", "segments")}
        host["weights"] = torch.from_numpy(np.asarray(self.weights, dtype=np.float32))
        host["loss_rows"] = torch.from_numpy(np.flatnonzero(host["weights"].numpy() > 0).astype(np.int64))
        out = {name: t.to(device, non_blocking=True) for name, t in host.items()}
        seg = out.pop("segments")  # [R, L]
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [L, L]
        same = seg[:, :, None] == seg[:, None, :]  # [R, L, L]
        out["attention_mask"] = (same & causal)[:, None]  # [R, 1, L, L]
        return out


def pack_batches(examples: Iterable[ObjectiveExample], *, rows: int, row_len: int) -> Iterator[PackedBatch]:
    """Pack arranged examples into batches of `rows` x `row_len` (module doc). The last, partial batch
    is yielded too. Raises PackingError naming `row_len` for an example longer than a row."""
    if rows < 1:
        raise PackingError("rows", f"got {rows}; use at least 1 row per batch")
    if row_len < 2:
        raise PackingError("row_len", f"got {row_len}; use at least 2 tokens per row")
    batch: list[list[ObjectiveExample]] = [[] for _ in range(rows)]
    free = [row_len] * rows
    for example in examples:
        n = len(example.input_ids)
        if n > row_len:
            raise PackingError("row_len", f"an example has {n} tokens, more than a row of {row_len}; raise row_len "
                                          "or drop longer examples")
        row = next((r for r in range(rows) if free[r] >= n), None)
        if row is None:
            yield _lay_out(batch, row_len)
            batch, free, row = [[] for _ in range(rows)], [row_len] * rows, 0
        batch[row].append(example)
        free[row] -= n
    if any(batch):
        yield _lay_out(batch, row_len)


def pack_one_batch(examples: Sequence[ObjectiveExample], *, row_len: int) -> PackedBatch:
    """All `examples` in one batch with as many rows as first-fit needs (evaluation, tests)."""
    if not examples:
        raise PackingError("examples", "is empty; give at least one example")
    batch = next(pack_batches(examples, rows=len(examples), row_len=row_len))
    used = sum(1 for row in batch.segments if row[0] != PAD_SEGMENT)  # first-fit fills rows in order
    return PackedBatch(*(getattr(batch, k)[:used] for k in _ROW_FIELDS), num_examples=batch.num_examples)


_ROW_FIELDS = ("input_ids", "position_ids", "labels", "weights", "kinds", "segments")


def _lay_out(rows: list[list[ObjectiveExample]], row_len: int) -> PackedBatch:
    fields: dict[str, list] = {k: [] for k in _ROW_FIELDS}
    index = 0
    for members in rows:
        row: dict[str, list] = {k: [] for k in fields}
        for e in members:
            row["input_ids"] += e.input_ids
            row["position_ids"] += e.position_ids
            row["labels"] += e.labels
            row["weights"] += e.weights
            row["kinds"] += e.kinds
            row["segments"] += [index] * len(e.input_ids)
            index += 1
        pad = row_len - len(row["input_ids"])
        start = len(row["position_ids"])
        row["input_ids"] += [0] * pad  # any id: padding is its own segment and weighs 0
        row["position_ids"] += list(range(start, start + pad))
        row["labels"] += [IGNORE] * pad
        row["weights"] += [0.0] * pad
        row["kinds"] += [KIND_NONE] * pad
        row["segments"] += [PAD_SEGMENT] * pad
        for k in fields:
            fields[k].append(row[k])
    return PackedBatch(**fields, num_examples=index)
