"""Training loop for the ReFusion objective (decoding/objective.py) on an HF causal LM.

    train_model(model, examples, *, steps=None, minutes=None, batch_size, lr, mask_token_id,
                eos_token_id, seed, log_every=10, on_log=None, heldout=None, pad_token_id=None,
                warmup_steps=None, weight_decay=0.01, grad_clip=1.0, slot_sizes=SLOT_SIZES) -> list[dict]

`model`: a transformers causal LM that takes input_ids, position_ids and attention_mask (Qwen3ForCausalLM;
the objective places clean slots out of physical order, so the model must honour position_ids).
`examples` / `heldout`: sequences of (prompt_ids, response_ids) pairs; the response is given WITHOUT EOS,
the objective appends `eos_token_id`. Training stops after `steps` optimizer steps or `minutes` of wall
time, whichever comes first (at least one must be given); the learning rate warms up linearly, then
follows a cosine to 10% of `lr` over that budget. AdamW, gradient clipping at `grad_clip`.

Every `log_every` steps (and after the last step) one record is appended to the returned list and passed
to `on_log`:
    {"step", "elapsed_s", "lr", "train_loss", "train_ar_loss", "train_mdm_loss", "train_tokens",
     "total_tokens", "heldout_ar_loss", "heldout_mdm_loss"}   # heldout_* only when `heldout` is given
train_* are means over the steps since the previous record (loss = ar + mdm, spec weighting).
heldout_ar_loss is plain next-token cross-entropy over response + EOS given the prompt, in order (what AR
decoding sees); heldout_mdm_loss is the objective's MDM part with a fixed seed, so records compare.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Sequence

from decoding.objective import IGNORE, KIND_AR, KIND_MDM, SLOT_SIZES, ObjectiveBatch, build_example, collate

Pair = tuple[Sequence[int], Sequence[int]]


class TrainingError(ValueError):
    """Bad training arguments. `field` names the argument; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _to_tensors(batch: ObjectiveBatch, device):
    import torch

    return {
        "input_ids": torch.tensor(batch.input_ids, dtype=torch.long, device=device),  # [B, T]
        "position_ids": torch.tensor(batch.position_ids, dtype=torch.long, device=device),  # [B, T]
        "attention_mask": torch.tensor(batch.attention_mask, dtype=torch.long, device=device),  # [B, T]
        "labels": torch.tensor(batch.labels, dtype=torch.long, device=device),  # [B, T]
        "weights": torch.tensor(batch.weights, dtype=torch.float32, device=device),  # [B, T]
        "kinds": torch.tensor(batch.kinds, dtype=torch.long, device=device),  # [B, T]
    }


def row_cross_entropy(model, t: dict, rows):
    """Cross-entropy of the selected rows: rows is a [B, T] bool mask; returns [n_rows] float32.

    For HF models with `.model` and `.lm_head` the head runs only on the selected rows (prompt and
    padding rows cost no vocab projection); other models fall back to full logits.
    """
    import torch.nn.functional as F

    # use_cache=False: no KV cache object in training. The explicit attention_mask is required: without
    # it transformers reads position jumps as packed-sequence boundaries (see decoding/objective.py).
    inputs = {k: t[k] for k in ("input_ids", "position_ids", "attention_mask")} | {"use_cache": False}
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = model.model(**inputs).last_hidden_state  # [B, T, H]
        logits = model.lm_head(hidden[rows])  # [n_rows, V]
    else:
        logits = model(**inputs).logits[rows]  # [n_rows, V]
    return F.cross_entropy(logits.float(), t["labels"][rows], reduction="none")


def objective_loss(model, batch: ObjectiveBatch):
    """(loss, ar_loss, mdm_loss) tensors for one collated batch: sum(w * CE) / B, split by row kind."""
    device = next(model.parameters()).device
    t = _to_tensors(batch, device)
    rows = t["weights"] > 0  # [B, T]
    ce = row_cross_entropy(model, t, rows)  # [n_rows]
    w, kinds = t["weights"][rows], t["kinds"][rows]
    n = len(batch.input_ids)
    ar = (w * ce * (kinds == KIND_AR)).sum() / n
    mdm = (w * ce * (kinds == KIND_MDM)).sum() / n
    return ar + mdm, ar, mdm


def heldout_losses(model, pairs: Sequence[Pair], *, mask_token_id: int, eos_token_id: int, pad_token_id: int,
                   batch_size: int = 16, seed: int = 1234) -> dict:
    """{"heldout_ar_loss", "heldout_mdm_loss"} on held-out pairs, without gradients (see module doc)."""
    import torch

    from decoding.objective import ObjectiveExample

    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    ar_sum = ar_n = mdm_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            in_order = []
            for prompt, response in chunk:  # plain AR: prompt + response + EOS, next-token labels on the target
                ids = list(prompt) + list(response) + [eos_token_id]
                labels = [IGNORE if i < len(prompt) - 1 else lab for i, lab in enumerate(ids[1:] + [IGNORE])]
                ones = [1.0 if lab != IGNORE else 0.0 for lab in labels]
                in_order.append(ObjectiveExample(ids, list(range(len(ids))), labels, ones, [KIND_AR] * len(ids), 0, 1.0))
            t = _to_tensors(collate(in_order, pad_token_id=pad_token_id), next(model.parameters()).device)
            ce = row_cross_entropy(model, t, t["weights"] > 0)
            ar_sum, ar_n = ar_sum + float(ce.sum()), ar_n + ce.numel()
            masked = [build_example(p, r, rng, mask_token_id=mask_token_id, eos_token_id=eos_token_id) for p, r in chunk]
            mdm_sum += float(objective_loss(model, collate(masked, pad_token_id=pad_token_id))[2]) * len(chunk)
    model.train(was_training)
    return {"heldout_ar_loss": ar_sum / max(ar_n, 1), "heldout_mdm_loss": mdm_sum / max(len(pairs), 1)}


def _batches(pairs: Sequence[Pair], batch_size: int, rng: random.Random):
    """Endless batches of pair indices; each group of 8 batches is drawn at random, then sorted by length
    so a batch holds similar lengths (less padding), then the 8 batches are shuffled."""
    while True:
        pool = [rng.randrange(len(pairs)) for _ in range(8 * batch_size)]
        pool.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        group = [pool[j : j + batch_size] for j in range(0, len(pool), batch_size)]
        rng.shuffle(group)
        yield from group


def _lr_at(progress: float, step: int, lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _check_args(examples, steps, minutes, batch_size, lr) -> None:
    if not examples:
        raise TrainingError("examples", "is empty; give at least one (prompt_ids, response_ids) pair")
    if steps is None and minutes is None:
        raise TrainingError("steps", "neither steps nor minutes given; set one of them to bound training")
    if steps is not None and steps < 1:
        raise TrainingError("steps", f"got {steps}; use a positive number of optimizer steps")
    if minutes is not None and minutes <= 0:
        raise TrainingError("minutes", f"got {minutes}; use a positive wall-time budget")
    if batch_size < 1:
        raise TrainingError("batch_size", f"got {batch_size}; use at least 1")
    if not lr > 0:
        raise TrainingError("lr", f"got {lr}; use a positive learning rate such as 1e-3")


def train_model(model, examples: Sequence[Pair], *, steps: int | None = None, minutes: float | None = None,
                batch_size: int, lr: float, mask_token_id: int, eos_token_id: int, seed: int,
                log_every: int = 10, on_log: Callable[[dict], None] | None = None,
                heldout: Sequence[Pair] | None = None, pad_token_id: int | None = None,
                warmup_steps: int | None = None, weight_decay: float = 0.01, grad_clip: float = 1.0,
                slot_sizes: Sequence[int] = SLOT_SIZES) -> list[dict]:
    """Train `model` in place with the ReFusion objective; return the log records (see module doc)."""
    import torch

    _check_args(examples, steps, minutes, batch_size, lr)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    warmup = warmup_steps if warmup_steps is not None else (min(100, max(1, steps // 20)) if steps else 50)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    records: list[dict] = []
    acc = {"loss": 0.0, "ar": 0.0, "mdm": 0.0, "tokens": 0, "n": 0, "total_tokens": 0}
    start, budget_s = time.monotonic(), (minutes * 60.0 if minutes is not None else None)
    batches, step = _batches(examples, batch_size, rng), 0
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / steps if steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        if progress >= 1.0:
            break
        cur_lr = _lr_at(progress, step, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        objective = [build_example(*examples[i], rng, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                                   slot_sizes=slot_sizes) for i in next(batches)]
        batch = collate(objective, pad_token_id=pad)
        loss, ar, mdm = objective_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        acc["loss"] += loss.item(); acc["ar"] += ar.item(); acc["mdm"] += mdm.item()  # noqa: E702
        n_tokens = sum(map(sum, batch.attention_mask))
        acc["tokens"] += n_tokens; acc["total_tokens"] += n_tokens; acc["n"] += 1  # noqa: E702
        if step % log_every == 0:
            records.append(_log(model, acc, step, start, cur_lr, heldout, on_log, mask_token_id, eos_token_id, pad))
    if acc["n"]:
        records.append(_log(model, acc, step, start, cur_lr, heldout, on_log, mask_token_id, eos_token_id, pad))
    model.eval()
    return records


def _log(model, acc: dict, step: int, start: float, lr: float, heldout, on_log, mask_id, eos_id, pad) -> dict:
    n = max(acc["n"], 1)
    record = {"step": step, "elapsed_s": round(time.monotonic() - start, 2), "lr": lr,
              "train_loss": acc["loss"] / n, "train_ar_loss": acc["ar"] / n, "train_mdm_loss": acc["mdm"] / n,
              "train_tokens": acc["tokens"], "total_tokens": acc["total_tokens"]}
    if heldout:
        record.update(heldout_losses(model, heldout, mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=pad))
    acc.update(loss=0.0, ar=0.0, mdm=0.0, tokens=0, n=0)
    if on_log is not None:
        on_log(record)
    return record
