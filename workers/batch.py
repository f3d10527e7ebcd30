"""The contract between decoders, scheduler and model runner: one packed forward.

Plain Python (no torch), so `decoding/` and `scheduler/` can build and test against it anywhere.

A forward executes a list of `Segment`s, at most one per sequence. Each segment is the next step of one
request: a run of query tokens placed after that sequence's committed KV cache.

Visibility of query token i of a segment (all rules are per segment; segments never see each other):
  - the sequence's committed cache, i.e. its first `context_len` cached tokens, all of them;
  - earlier query tokens j < i of the same segment, when `branch` is None (plain causal), or when
    branch[j] == branch[i], or when branch[j] == TRUNK (a shared stem every branch sees).
  Attention depends on logical positions only through RoPE (`positions`), on physical order only
  through this visibility rule.

KV lifecycle:
  - Before running, the runner truncates the sequence's cache to `context_len` tokens (a decoder rolls
    back tentative KV simply by stating a shorter context than the cache holds). `context_len` may
    never exceed the cached length.
  - Query tokens with keep[i] True have their KV appended to the sequence's cache in query order, so
    after the forward the cache holds context_len + sum(keep) tokens. Dropped tokens leave no trace.

Reads: the runner returns only what each segment asks for, one value per `Read`, computed on the
device and moved to the host once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

TRUNK = -1
"""Branch id of query tokens that every branch of the segment may see (a shared stem)."""


class ReadKind(Enum):
    """What a caller wants back for one query row."""

    ARGMAX = "argmax"
    """(token id, softmax probability of it). With Sampling.temperature > 0 and gumbel, the argmax is
    taken over logits perturbed by Gumbel noise in float64 (ReFusion drafting); the probability is
    still softmax(logits)[token] without noise."""
    PROB = "prob"
    """Softmax probability of `Read.token` at this row (verification)."""
    SAMPLE = "sample"
    """(token id, its probability under the sampling distribution): temperature, top-k, top-p from
    the segment's Sampling, drawn from the sequence's own seeded generator (AR decoding)."""
    LOGITS = "logits"
    """The full float32 logits row (tests and debugging only; costs a vocab-sized transfer)."""


@dataclass(frozen=True)
class Read:
    """One value to return for query row `row` of a segment."""

    row: int
    kind: ReadKind
    token: int = -1  # only for PROB


@dataclass(frozen=True)
class Sampling:
    """Randomness of a segment. temperature == 0 means greedy everywhere.

    seed: seeds the per-sequence generator the first time the runner sees the sequence; later
    segments continue the same stream, so a request's draws do not depend on what else is batched.
    gumbel: ARGMAX reads use Gumbel-max noise (ReFusion); SAMPLE reads use temperature/top-k/top-p.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    gumbel: bool = False


@dataclass
class Segment:
    """The next step of one sequence: query tokens to run after its committed cache."""

    seq_id: str
    context_len: int
    token_ids: list[int]
    positions: list[int]
    keep: list[bool]
    reads: list[Read] = field(default_factory=list)
    branch: list[int] | None = None
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if n == 0:
            raise ValueError(f"segment {self.seq_id}: token_ids is empty; a segment needs at least one query token")
        if len(self.positions) != n or len(self.keep) != n:
            raise ValueError(
                f"segment {self.seq_id}: token_ids, positions and keep must have equal lengths "
                f"(got {n}, {len(self.positions)}, {len(self.keep)})"
            )
        if self.branch is not None and len(self.branch) != n:
            raise ValueError(f"segment {self.seq_id}: branch has {len(self.branch)} entries for {n} tokens")
        if self.context_len < 0:
            raise ValueError(f"segment {self.seq_id}: context_len must be >= 0, got {self.context_len}")
        for read in self.reads:
            if not 0 <= read.row < n:
                raise ValueError(f"segment {self.seq_id}: read row {read.row} outside 0..{n - 1}")

    @property
    def num_kept(self) -> int:
        return sum(self.keep)


@dataclass
class SegmentResult:
    """What came back for one segment: `values[k]` answers `segment.reads[k]`.

    ARGMAX and SAMPLE give (token id, probability); PROB gives (-1, probability); LOGITS gives
    (-1, nan) and the row lands in `logits[k]` (a list of floats).
    """

    seq_id: str
    values: list[tuple[int, float]]
    logits: dict[int, list[float]] = field(default_factory=dict)
