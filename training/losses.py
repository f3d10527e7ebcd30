"""The losses of training/trainer.py: the ReFusion objective on a packed batch (spec, "Training objective";
decoding/objective.py), the cross-entropy of the rows it weighs, and held-out scoring (plain in-order AR
loss and the objective's MDM part with a fixed seed). Every forward runs under bf16 autocast on CUDA."""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Sequence

from decoding.objective import IGNORE, KIND_AR, KIND_MDM, ObjectiveExample, build_example
from training.batches import PackedBatch, Pair, pack_one_batch


def row_cross_entropy(model, t: dict, rows, decoder=None):
    """Cross-entropy of the selected rows: `rows` [n_rows] int64 flat indices into the [R, L] positions
    (PackedBatch.tensors' loss_rows); returns [n_rows] float32.

    `t` holds input_ids, position_ids [R, L] and the 4D attention_mask [R, 1, L, L] (PackedBatch.tensors).
    For HF models with `.model` and `.lm_head` the head runs only on the selected rows (prompt and
    padding rows cost no vocab projection); `decoder` replaces `.model` (a compiled copy). Other models
    fall back to full logits.
    """
    import torch.nn.functional as F

    # use_cache=False: no KV cache object in training. The 4D mask is required: without it transformers
    # reads position jumps as packed-sequence boundaries and cuts attention inside an example.
    inputs = {k: t[k] for k in ("input_ids", "position_ids", "attention_mask")} | {"use_cache": False}
    inputs["attention_mask"] = _mask_for(model, t["attention_mask"])
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = (model.model if decoder is None else decoder)(**inputs).last_hidden_state  # [R, L, H]
        logits = model.lm_head(hidden.flatten(0, 1).index_select(0, rows))  # [n_rows, V]
    else:
        logits = model(**inputs).logits.flatten(0, 1).index_select(0, rows)  # [n_rows, V]
    return F.cross_entropy(logits.float(), t["labels"].flatten().index_select(0, rows), reduction="none")


def _mask_for(model, mask):
    """The 4D boolean mask [R, 1, L, L] (True: attend) as the model's attention takes it: SDPA and flex take
    it as it is; transformers' eager attention adds a 4D mask to the scores, so it gets the additive
    form (0 where attended, the dtype's minimum elsewhere), else True/False were added as 1/0 and
    nothing was masked (examples packed in a row saw each other)."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "eager":
        return mask
    import torch

    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def objective_loss(model, batch: PackedBatch, decoder=None):
    """(loss, ar_loss, mdm_loss) tensors for one packed batch (spec, "Training objective";
    decoding/objective.py): ar_loss the mean CE over every AR row of the batch (clean-slot labels,
    pooled), mdm_loss sum(w * CE) over the MDM rows / num_examples."""
    device = next(model.parameters()).device
    t = batch.tensors(device)
    rows = t["loss_rows"]  # [n_rows] flat indices of the weighted positions (no boolean index: no host sync)
    with _autocast(device):
        ce = row_cross_entropy(model, t, rows, decoder)  # [n_rows]
    w, kinds = t["weights"].flatten().index_select(0, rows), t["kinds"].flatten().index_select(0, rows)
    n = batch.num_examples
    is_ar = kinds == KIND_AR
    ar = (w * ce * is_ar).sum() / is_ar.sum().clamp(min=1)  # a tensor count: no host sync
    mdm = (w * ce * (kinds == KIND_MDM)).sum() / n
    return ar + mdm, ar, mdm


def _autocast(device):
    """bf16 autocast on CUDA (float32 master weights); nothing on CPU, where bf16 matmuls are slow."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def in_order_example(prompt: Sequence[int], response: Sequence[int], eos_token_id: int) -> ObjectiveExample:
    """Plain AR scoring rows: prompt + response + EOS in order, next-token labels on the target."""
    ids = list(prompt) + list(response) + [eos_token_id]
    labels = [IGNORE if i < len(prompt) - 1 else lab for i, lab in enumerate(ids[1:] + [IGNORE])]
    ones = [1.0 if lab != IGNORE else 0.0 for lab in labels]
    return ObjectiveExample(ids, list(range(len(ids))), labels, ones, [KIND_AR] * len(ids), 0, 1.0)


def ar_loss(model, pairs: Sequence[Pair], *, eos_token_id: int, batch_size: int = 16) -> float:
    """Plain next-token cross-entropy per token over response + EOS given the prompt, in order (what AR
    decoding sees), on `pairs`, without gradients: held-out scoring's AR part."""
    import torch

    was_training = model.training
    model.eval()
    row_len = max(len(p) + len(r) + 1 for p, r in pairs)
    total = count = 0.0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = [in_order_example(p, r, eos_token_id) for p, r in pairs[i : i + batch_size]]
            t = pack_one_batch(chunk, row_len=row_len).tensors(device)
            with _autocast(device):
                ce = row_cross_entropy(model, t, t["loss_rows"])
            total, count = total + float(ce.sum()), count + ce.numel()
    model.train(was_training)
    return total / max(count, 1)


def heldout_losses(model, pairs: Sequence[Pair], *, mask_token_id: int, eos_token_id: int,
                   batch_size: int = 16, seed: int = 1234) -> dict:
    """{"heldout_ar_loss", "heldout_mdm_loss"} on held-out pairs, without gradients (see module doc)."""
    import torch

    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    row_len = max(len(p) + len(r) + 1 for p, r in pairs)
    mdm_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            masked = [build_example(p, r, rng, mask_token_id=mask_token_id, eos_token_id=eos_token_id) for p, r in chunk]
            mdm_sum += float(objective_loss(model, pack_one_batch(masked, row_len=row_len))[2]) * len(chunk)
    model.train(was_training)
    return {"heldout_ar_loss": ar_loss(model, pairs, eos_token_id=eos_token_id, batch_size=batch_size),
            "heldout_mdm_loss": mdm_sum / max(len(pairs), 1)}
