"""Reference logits from transformers' Qwen3ForCausalLM (the test oracle) and runner helpers."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.batch import Reads, Segment

_ORACLES: dict[str, object] = {}


def hf_model(model_dir: Path):
    """transformers' Qwen3ForCausalLM for the directory, float32, cached per directory."""
    key = str(model_dir)
    if key not in _ORACLES:
        from transformers import Qwen3ForCausalLM

        _ORACLES[key] = Qwen3ForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _ORACLES[key]


@torch.no_grad()
def dense_logits(model_dir: Path, token_ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """Logits [N, V] of one plain causal run of `token_ids` at `positions` (default 0..N-1)."""
    ids = torch.tensor([token_ids])
    pos = torch.tensor([positions if positions is not None else list(range(len(token_ids)))])
    return hf_model(model_dir)(input_ids=ids, position_ids=pos).logits[0].float()


def logits_reads(n: int, rows: list[int] | None = None) -> Reads:
    """Logits reads of `rows` (default all n rows)."""
    return Reads(logits=tuple(rows if rows is not None else range(n)))


def segment(seq_id: str, context_len: int, token_ids: list[int], positions: list[int] | None = None,
            keep: bool | int = True, reads: Reads | None = None, **kw) -> Segment:
    """A segment with logits reads on every row unless `reads` is given. keep: all (True), none
    (False) or the number of kept leading tokens."""
    n = len(token_ids)
    positions = positions if positions is not None else list(range(context_len, context_len + n))
    num_kept = n if keep is True else 0 if keep is False else int(keep)
    return Segment(seq_id, context_len, list(token_ids), list(positions), num_kept,
                   reads if reads is not None else logits_reads(n), **kw)


def result_logits(result) -> torch.Tensor:
    """The logits rows of a SegmentResult as a tensor [R, V], in read order."""
    return torch.tensor(result.logits)
