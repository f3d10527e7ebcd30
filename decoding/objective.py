"""The ReFusion training objective as a pure function: (prompt ids, response ids, rng) -> model inputs.

Spec: shared/refusion-spec.md, "Training objective". Per example (prompt, response + EOS):

  1. draw the slot size S from {4, 8, 16, 32} and cut the target (response + EOS) into slots of S tokens
     (the last slot may be shorter);
  2. draw t ~ U(0, 1), p = (1 - 1e-3) t + 1e-3, and mask each slot with probability p;
  3. sequence = prompt (no labels), then the clean slots in a random order, each at its true logical
     positions (label = the next token inside the slot; none for the slot's last token), then the masked
     slots in position order as mask tokens (label = the token itself);
  4. loss = mean CE over the clean-slot labels + sum over masked tokens of CE / p / len(target),
     divided by the batch size.

Labels here are NOT shifted the HF way: `labels[i]` is what the output at row i must predict. Each row
carries a weight and a kind (`kinds`: AR rows, MDM rows) so that step 4 is, over a batch of B examples
(training/trainer.objective_loss):

    loss = sum(CE of AR rows) / (number of AR rows in the batch) + sum(weights * CE of MDM rows) / B

AR rows have weight 1: their mean is over every clean-slot label of the batch, pooled (as the
reference, ML-GSAI/ReFusion's modeling_qwen3_refusion.py, computes it: cross_entropy(..., "mean") over
the batch's AR labels, not divided by B), so an example with no clean slot adds nothing to it; MDM rows
have weight 1 / (p len(target)).

Draw order from `rng` (a `random.Random`; fixed, so tests can hand-compute cases): S = rng.choice(slot
sizes); t = rng.random(); one rng.random() per slot in position order (masked when < p); then
rng.shuffle of the clean slots' indices.

Attention is plain causal over the physical order. When feeding an HF model, pass an explicit
attention mask: with position_ids and no mask, transformers treats every position jump as the start of
a new packed sequence and would cut attention at slot boundaries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

SLOT_SIZES: tuple[int, ...] = (4, 8, 16, 32)
MIN_MASK_PROB = 1e-3
IGNORE = -100
"""Label of rows with no loss (prompt rows, the last token of each clean slot, padding)."""

KIND_NONE, KIND_AR, KIND_MDM = 0, 1, 2
"""Row kinds: no loss; clean-slot next-token (AR part); mask-token self-prediction (MDM part)."""


class ObjectiveError(ValueError):
    """Bad input to the objective. `field` names the argument; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class ObjectiveExample:
    """One training row set. All lists have length len(prompt) + len(target)."""

    input_ids: list[int]
    position_ids: list[int]  # logical positions (out of physical order after the prompt)
    labels: list[int]  # IGNORE where no loss
    weights: list[float]  # per-row loss weight: 1 on AR rows (pooled mean), 1 / (p len(target)) on MDM rows
    kinds: list[int]  # KIND_NONE / KIND_AR / KIND_MDM
    slot_size: int
    mask_prob: float
    masked_slots: list[int] = field(default_factory=list)  # slot indices masked, in position order
    clean_order: list[int] = field(default_factory=list)  # clean slot indices, in physical order


def _check_ids(name: str, ids: Sequence[int], *, allow_empty: bool) -> None:
    if not allow_empty and len(ids) == 0:
        raise ObjectiveError(name, "is empty; give at least one token id")
    for tok in ids:
        if not isinstance(tok, int) or tok < 0:
            raise ObjectiveError(name, f"holds {tok!r}; token ids must be non-negative ints")


def build_example(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    rng: random.Random,
    *,
    mask_token_id: int,
    eos_token_id: int | None,
    slot_sizes: Sequence[int] = SLOT_SIZES,
) -> ObjectiveExample:
    """Arrange one (prompt, response) pair for the ReFusion objective.

    The target is `response_ids + [eos_token_id]` (pass eos_token_id=None when the response already
    ends as it should). The response may be empty only when an EOS is appended.
    """
    _check_ids("prompt_ids", prompt_ids, allow_empty=True)
    _check_ids("response_ids", response_ids, allow_empty=eos_token_id is not None)
    if not slot_sizes or any(int(s) < 1 for s in slot_sizes):
        raise ObjectiveError("slot_sizes", f"got {list(slot_sizes)}; give positive slot sizes, e.g. (4, 8, 16, 32)")
    target = list(response_ids) + ([] if eos_token_id is None else [int(eos_token_id)])
    n_prompt, n_target = len(prompt_ids), len(target)

    slot_size = int(rng.choice(list(slot_sizes)))
    mask_prob = (1.0 - MIN_MASK_PROB) * rng.random() + MIN_MASK_PROB
    starts = list(range(0, n_target, slot_size))  # slot k covers target[starts[k]: starts[k] + slot_size]
    masked = [rng.random() < mask_prob for _ in starts]
    clean_order = [k for k, m in enumerate(masked) if not m]
    rng.shuffle(clean_order)
    masked_slots = [k for k, m in enumerate(masked) if m]

    input_ids = list(prompt_ids)
    position_ids = list(range(n_prompt))
    labels = [IGNORE] * n_prompt
    kinds = [KIND_NONE] * n_prompt
    for k in clean_order:  # clean slot: row j predicts the next token of the same slot
        slot = target[starts[k] : starts[k] + slot_size]
        input_ids += slot
        position_ids += [n_prompt + starts[k] + j for j in range(len(slot))]
        labels += slot[1:] + [IGNORE]
        kinds += [KIND_AR] * (len(slot) - 1) + [KIND_NONE]
    for k in masked_slots:  # masked slot: mask token at position p predicts the token at p
        slot = target[starts[k] : starts[k] + slot_size]
        input_ids += [int(mask_token_id)] * len(slot)
        position_ids += [n_prompt + starts[k] + j for j in range(len(slot))]
        labels += slot
        kinds += [KIND_MDM] * len(slot)

    mdm_weight = 1.0 / (mask_prob * n_target)
    weights = [1.0 if k == KIND_AR else mdm_weight if k == KIND_MDM else 0.0 for k in kinds]
    return ObjectiveExample(
        input_ids, position_ids, labels, weights, kinds, slot_size, mask_prob, masked_slots, clean_order
    )


@dataclass(frozen=True)
class ObjectiveBatch:
    """Right-padded rows of several examples: every field is a list of `batch` lists of equal length."""

    input_ids: list[list[int]]  # [B, T]
    position_ids: list[list[int]]  # [B, T]
    attention_mask: list[list[int]]  # [B, T] 1 = real token, 0 = padding
    labels: list[list[int]]  # [B, T]
    weights: list[list[float]]  # [B, T] 0 on padding
    kinds: list[list[int]]  # [B, T]


def collate(examples: Sequence[ObjectiveExample], *, pad_token_id: int) -> ObjectiveBatch:
    """Right-pad examples to the longest one. Padded rows: pad token, weight 0, label IGNORE, mask 0.

    Padding positions continue after the example's last logical position; being after every real
    token under causal attention and weighted 0, they change nothing.
    """
    if not examples:
        raise ObjectiveError("examples", "is empty; give at least one example to collate")
    width = max(len(e.input_ids) for e in examples)
    out: dict[str, list] = {k: [] for k in ("input_ids", "position_ids", "attention_mask", "labels", "weights", "kinds")}
    for e in examples:
        n, pad = len(e.input_ids), width - len(e.input_ids)
        out["input_ids"].append(e.input_ids + [int(pad_token_id)] * pad)
        out["position_ids"].append(e.position_ids + list(range(n, n + pad)))
        out["attention_mask"].append([1] * n + [0] * pad)
        out["labels"].append(e.labels + [IGNORE] * pad)
        out["weights"].append(e.weights + [0.0] * pad)
        out["kinds"].append(e.kinds + [KIND_NONE] * pad)
    return ObjectiveBatch(**out)
