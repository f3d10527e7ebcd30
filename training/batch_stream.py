"""Endless packed batches for the training loop (training/trainer.py): the pairs arranged by the objective
in a fresh random order each epoch and packed (training/batches.py), in the training process or in
DataLoader worker processes ahead of the step."""

from __future__ import annotations

import random
import signal
from typing import Iterator, Sequence

from decoding.objective import build_example
from training.batches import PackedBatch, Pair, pack_batches


def _arranged(pairs: Sequence[Pair], rng: random.Random, mask_id: int, eos_id: int, slot_sizes) -> Iterator:
    """Endless objective examples: every pair once per epoch, in a fresh random order each epoch. Raises
    ValueError for no pairs (the loop would spin without yielding)."""
    if not pairs:
        raise ValueError("no training pairs to arrange")
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield build_example(*pairs[i], rng, mask_token_id=mask_id, eos_token_id=eos_id, slot_sizes=slot_sizes)


class PackedStream:
    """Endless packed batches (a torch IterableDataset when `data_workers` > 0). With N workers, worker k
    arranges the pairs k, k + N, ... with its own seed (seed + k), so each worker's epoch shows its pairs
    once (the DataLoader takes the workers' batches in turn) and the stream depends only on (seed, N)."""

    def __init__(self, pairs: Sequence[Pair], *, seed: int, rows: int, row_len: int, mask_id: int, eos_id: int,
                 slot_sizes: Sequence[int]):
        self.pairs, self.seed, self.rows, self.row_len = pairs, seed, rows, row_len
        self.mask_id, self.eos_id, self.slot_sizes = mask_id, eos_id, tuple(slot_sizes)

    def __iter__(self) -> Iterator[PackedBatch]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(self.seed + k)
        arranged = _arranged(self.pairs[k::n], rng, self.mask_id, self.eos_id, self.slot_sizes)
        return pack_batches(arranged, rows=self.rows, row_len=self.row_len)


def batch_stream(stream: PackedStream, data_workers: int) -> Iterator[PackedBatch]:
    """The stream itself, or batches arranged in `data_workers` processes ahead of the training step
    (torch DataLoader; on CUDA the Python objective builder would otherwise stall the GPU), at most one
    per pair: a worker with no pair of its own spun forever and hung the run at its second step, and at
    exit, ignoring SIGTERM, outlived it (helper-216)."""
    data_workers = min(data_workers, len(stream.pairs))
    if data_workers == 0:
        return iter(stream)
    import torch.utils.data

    class _Dataset(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(stream)

    loader = torch.utils.data.DataLoader(_Dataset(), batch_size=None, num_workers=data_workers, prefetch_factor=4,
                                         collate_fn=_as_is, worker_init_fn=_leave_interrupts_to_the_trainer)
    return iter(loader)


def _leave_interrupts_to_the_trainer(_worker_id: int) -> None:
    """A data worker ignores SIGINT and SIGTERM: Ctrl-C reaches the terminal's whole process group, and a
    worker ran the training process's handler too (its "stopping after this step" line printed once per
    worker); a SIGTERM to the group (systemd, Slurm's scancel, `kill -TERM -PGID`) killed the worker, and
    the DataLoader then failed the run with a traceback, unsaved (helper-214). The training process stops
    the loop, and the DataLoader its workers (a worker also leaves when the training process is gone:
    torch's watchdog). A forked worker also drops the trainer's wakeup pipe, where its own signals would
    count as the trainer's deliveries."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)


def _as_is(batch: PackedBatch) -> PackedBatch:
    return batch  # a PackedBatch is already one step's batch; tensors are made in the training process
