"""Training loop for the ReFusion objective (decoding/objective.py) on an HF causal LM, with sequence packing.

    train_model(model, examples, *, steps=None, minutes=None, batch_tokens=8192, row_len=None, lr,
                mask_token_id, eos_token_id, seed, log_every=10, on_log=None, heldout=None,
                warmup_steps=None, weight_decay=0.01, grad_clip=1.0, slot_sizes=SLOT_SIZES,
                compile_model=False, data_workers=0) -> list[dict]

`model`: a transformers causal LM that takes input_ids, position_ids and a 4D attention mask
(Qwen3ForCausalLM; the objective places clean slots out of physical order, so the model must honour
position_ids). `examples` / `heldout`: sequences of (prompt_ids, response_ids) pairs; the response is
given WITHOUT EOS, the objective appends `eos_token_id`.

Batches: examples are drawn in a fresh random order each epoch, arranged by the objective and packed
end to end into `batch_tokens // row_len` rows of `row_len` tokens (training/batches.py; `row_len`
defaults to the longest example + EOS). The loss is the objective's: sum(w * CE) over the batch divided
by its number of examples. On CUDA the forward runs under bf16 autocast (weights and optimizer state
stay float32) and AdamW is the fused kernel; `compile_model=True` wraps the decoder stack in
torch.compile (one static [R, L] shape per run; should compiling fail at the first step, a
RuntimeWarning says why and the run goes on eagerly, the records' `compiled` false). `data_workers` > 0 arranges and packs batches in that
many worker processes ahead of the step (torch DataLoader), so the Python objective builder does not
stall a GPU.

Training stops after `steps` optimizer steps or `minutes` of wall time, whichever comes first (at least
one must be given; the first step always runs, so a budget spent before it still trains); the learning
rate warms up linearly, then follows a cosine to 10% of `lr` over that budget. AdamW (betas 0.9/0.95), gradient clipping at `grad_clip`.

Every `log_every` steps (and after the last step) one record is appended to the returned list and passed
to `on_log`:
    {"step", "elapsed_s", "lr", "train_loss", "train_ar_loss", "train_mdm_loss", "train_tokens",
     "total_tokens", "tokens_per_s", "fill", "heldout_ar_loss", "heldout_mdm_loss", "compiled"}
    # heldout_* with `heldout`; compiled with `compile_model` (false: it fell back to eager)
train_* are means over the steps since the previous record (loss = ar + mdm, spec weighting);
train_tokens / total_tokens count example tokens (no padding); tokens_per_s is train_tokens over the
wall time since the previous record, held-out scoring excluded; fill is the share of batch tokens that
belong to examples. heldout_ar_loss is plain next-token cross-entropy over response + EOS given the
prompt, in order (what AR decoding sees); heldout_mdm_loss is the objective's MDM part with a fixed
seed, so records compare.
"""

from __future__ import annotations

import math
import random
import signal
import time
import warnings
from contextlib import nullcontext
from typing import Callable, Iterator, Sequence

from decoding.objective import IGNORE, KIND_AR, KIND_MDM, SLOT_SIZES, ObjectiveExample, build_example
from training.batches import PackedBatch, pack_batches, pack_one_batch

Pair = tuple[Sequence[int], Sequence[int]]


class TrainingError(ValueError):
    """Bad training arguments. `field` names the argument; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


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


def heldout_losses(model, pairs: Sequence[Pair], *, mask_token_id: int, eos_token_id: int,
                   batch_size: int = 16, seed: int = 1234) -> dict:
    """{"heldout_ar_loss", "heldout_mdm_loss"} on held-out pairs, without gradients (see module doc)."""
    import torch

    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    row_len = max(len(p) + len(r) + 1 for p, r in pairs)
    ar_sum = ar_n = mdm_sum = 0.0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            t = pack_one_batch([in_order_example(p, r, eos_token_id) for p, r in chunk], row_len=row_len).tensors(device)
            with _autocast(device):
                ce = row_cross_entropy(model, t, t["loss_rows"])
            ar_sum, ar_n = ar_sum + float(ce.sum()), ar_n + ce.numel()
            masked = [build_example(p, r, rng, mask_token_id=mask_token_id, eos_token_id=eos_token_id) for p, r in chunk]
            mdm_sum += float(objective_loss(model, pack_one_batch(masked, row_len=row_len))[2]) * len(chunk)
    model.train(was_training)
    return {"heldout_ar_loss": ar_sum / max(ar_n, 1), "heldout_mdm_loss": mdm_sum / max(len(pairs), 1)}


def _arranged(pairs: Sequence[Pair], rng: random.Random, mask_id: int, eos_id: int, slot_sizes) -> Iterator:
    """Endless objective examples: every pair once per epoch, in a fresh random order each epoch."""
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield build_example(*pairs[i], rng, mask_token_id=mask_id, eos_token_id=eos_id, slot_sizes=slot_sizes)


class PackedStream:
    """Endless packed batches (a torch IterableDataset when `data_workers` > 0). With N workers, worker k
    arranges the pairs k, k + N, ... with its own seed (seed + k), so an epoch still shows each pair once
    and the stream depends only on (seed, N)."""

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


def _batch_stream(stream: PackedStream, data_workers: int) -> Iterator[PackedBatch]:
    """The stream itself, or batches arranged in `data_workers` processes ahead of the training step
    (torch DataLoader; on CUDA the Python objective builder would otherwise stall the GPU)."""
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
    """A data worker ignores SIGINT: Ctrl-C reaches the terminal's whole process group, and a worker ran
    the training process's handler too (its "stopping after this step" line printed once per worker);
    the training process stops the loop, and the DataLoader its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(batch: PackedBatch) -> PackedBatch:
    return batch  # a PackedBatch is already one step's batch; tensors are made in the training process


def _lr_at(progress: float, step: int, lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _check_args(examples, steps, minutes, batch_tokens, row_len, lr, data_workers) -> None:
    if not examples:
        raise TrainingError("examples", "is empty; give at least one (prompt_ids, response_ids) pair")
    if steps is None and minutes is None:
        raise TrainingError("steps", "neither steps nor minutes given; set one of them to bound training")
    if steps is not None and steps < 1:
        raise TrainingError("steps", f"got {steps}; use a positive number of optimizer steps")
    if minutes is not None and minutes <= 0:
        raise TrainingError("minutes", f"got {minutes}; use a positive wall-time budget")
    longest = max(len(p) + len(r) + 1 for p, r in examples)
    if row_len is not None and row_len < longest:
        raise TrainingError("row_len", f"got {row_len}, but an example has {longest} tokens with EOS; raise row_len "
                                       "or drop longer examples")
    if batch_tokens < (row_len or longest):
        raise TrainingError("batch_tokens", f"got {batch_tokens}; use at least one row ({row_len or longest} tokens)")
    if not lr > 0:
        raise TrainingError("lr", f"got {lr}; use a positive learning rate such as 1e-3")
    if data_workers < 0:
        raise TrainingError("data_workers", f"got {data_workers}; use 0 (arrange batches in the training process) "
                                            "or a number of worker processes")


def train_model(model, examples: Sequence[Pair], *, steps: int | None = None, minutes: float | None = None,
                batch_tokens: int = 8192, row_len: int | None = None, lr: float, mask_token_id: int,
                eos_token_id: int, seed: int, log_every: int = 10, on_log: Callable[[dict], None] | None = None,
                heldout: Sequence[Pair] | None = None, warmup_steps: int | None = None,
                weight_decay: float = 0.01, grad_clip: float = 1.0, slot_sizes: Sequence[int] = SLOT_SIZES,
                compile_model: bool = False, data_workers: int = 0,
                should_stop: Callable[[], bool] | None = None,
                on_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train `model` in place with the ReFusion objective; return the log records (see module doc).
    `should_stop` is asked before each step: True ends training there (the last record covers the steps
    done; no record when no step ran). `on_step(step)` runs after each optimizer step and its log record
    (a checkpoint hook: `refusion train --checkpoint-minutes`). Raises TrainingError for bad arguments, and (field "lr") when the training loss is not finite
    at a log step, or a weight is not after the last step (`check_weights_finite`): the run diverged, and
    the model is not worth saving."""
    import torch

    _check_args(examples, steps, minutes, batch_tokens, row_len, lr, data_workers)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    row_len = row_len or max(len(p) + len(r) + 1 for p, r in examples)
    device = next(model.parameters()).device
    warmup = warmup_steps if warmup_steps is not None else (min(100, max(1, steps // 20)) if steps else 50)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                            fused=device.type == "cuda")
    decoder = torch.compile(model.model) if compile_model and hasattr(model, "model") else None
    model.train()
    records: list[dict] = []
    acc = {"loss": 0.0, "ar": 0.0, "mdm": 0.0, "tokens": 0, "slots": 0, "n": 0, "total_tokens": 0,
           "since": time.monotonic()}
    start, budget_s = time.monotonic(), (minutes * 60.0 if minutes is not None else None)
    stream = PackedStream(examples, seed=rng.randrange(2**31), rows=batch_tokens // row_len, row_len=row_len,
                          mask_id=mask_token_id, eos_id=eos_token_id, slot_sizes=slot_sizes)
    batches, step = _batch_stream(stream, data_workers), 0
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / steps if steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        if (step and progress >= 1.0) or (should_stop is not None and should_stop()):
            break
        cur_lr = _lr_at(progress, step, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        try:
            batch = next(batches)
        except RuntimeError:  # a data worker ended by the same Ctrl-C that asks the loop to stop
            if should_stop is not None and should_stop():
                break
            raise
        try:
            losses = _loss_and_grads(model, batch, decoder, opt, acc)
        except Exception as exc:  # noqa: BLE001 - only the first compiled step falls back; anything else raises
            if decoder is None or step:
                raise
            # torch.compile compiles at the first call. Its failure there (an inductor or backend error on
            # this torch and device) costs the run nothing it cannot do eagerly: one step on a GPU that a
            # session gets for minutes must not throw away the corpus preparation before it
            warnings.warn(f"torch.compile failed at the first step ({type(exc).__name__}: {str(exc)[:500]}); "
                          "training continues without it (eager)", RuntimeWarning, stacklevel=2)
            decoder, acc["compiled"] = None, False
            losses = _loss_and_grads(model, batch, decoder, opt, acc)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        try:
            opt.step()
        except RuntimeError as exc:  # AdamW's update past float32 ("cannot be converted ... without overflow")
            if "overflow" not in str(exc):
                raise
            raise TrainingError("lr", f"the update at step {step + 1} overflows float32: lower the learning rate "
                                      f"(its peak is {lr:.3g})") from None
        step += 1
        _accumulate(acc, batch, *losses)
        if step % log_every == 0:
            records.append(_log(model, acc, step, start, cur_lr, heldout, on_log, mask_token_id, eos_token_id))
        if on_step is not None:
            on_step(step)
    if acc["n"]:
        records.append(_log(model, acc, step, start, cur_lr, heldout, on_log, mask_token_id, eos_token_id))
    if step:
        check_weights_finite(model, step, lr)
    model.eval()
    return records


def check_weights_finite(model, step: int, lr: float) -> None:
    """Raise TrainingError("lr") when a weight of `model` is NaN or infinite after `step` optimizer steps
    (`lr`: the run's peak learning rate). The losses are read before each update, so an update that
    diverged at the last step (or since the last log step, before a checkpoint) would be saved unseen: `--lr 1e10 --steps 2` saved a model of
    NaNs with exit 0, which the serving loader then refuses (helper-198). One device sync."""
    import torch

    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    if not bool(finite):
        raise TrainingError("lr", f"the weights are not finite after step {step}: training diverged; lower the "
                                  f"learning rate (its peak was {lr:.3g})")


def _loss_and_grads(model, batch: PackedBatch, decoder, opt, acc: dict) -> tuple:
    """The step's forward and backward: (loss, ar, mdm) tensors, gradients set (optimizer not stepped).
    `acc["compiled"]`: whether the compiled decoder ran (set here on its first success)."""
    loss, ar, mdm = objective_loss(model, batch, decoder)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if decoder is not None:
        acc["compiled"] = True
    return loss, ar, mdm


def _accumulate(acc: dict, batch: PackedBatch, loss, ar, mdm) -> None:
    # detached tensors: no host sync per step; _log reads them once per record
    acc["loss"] += loss.detach(); acc["ar"] += ar.detach(); acc["mdm"] += mdm.detach()  # noqa: E702
    n_tokens = sum(s >= 0 for row in batch.segments for s in row)
    acc["tokens"] += n_tokens; acc["total_tokens"] += n_tokens; acc["n"] += 1  # noqa: E702
    acc["slots"] += sum(len(row) for row in batch.segments)


def _log(model, acc: dict, step: int, start: float, lr: float, heldout, on_log, mask_id, eos_id) -> dict:
    n = max(acc["n"], 1)
    now = time.monotonic()
    record = {"step": step, "elapsed_s": round(now - start, 2), "lr": lr,
              "train_loss": float(acc["loss"]) / n, "train_ar_loss": float(acc["ar"]) / n,
              "train_mdm_loss": float(acc["mdm"]) / n,
              "train_tokens": acc["tokens"], "total_tokens": acc["total_tokens"],
              "tokens_per_s": round(acc["tokens"] / max(now - acc["since"], 1e-9), 1),
              "fill": round(acc["tokens"] / max(acc["slots"], 1), 4)}
    if "compiled" in acc:  # (compile_model: whether the compiled decoder runs, or fell back at the first step)
        record["compiled"] = acc["compiled"]
    if not math.isfinite(record["train_loss"]):
        raise TrainingError("lr", f"the training loss is {record['train_loss']} at step {step}: training diverged; "
                                  f"lower the learning rate (got {lr:.3g} at this step)")
    if heldout:
        record.update(heldout_losses(model, heldout, mask_token_id=mask_id, eos_token_id=eos_id))
        if not all(math.isfinite(record[k]) for k in ("heldout_ar_loss", "heldout_mdm_loss")):
            raise TrainingError("lr", f"the held-out loss is not finite at step {step}: training diverged; lower the "
                                      f"learning rate (got {lr:.3g} at this step)")
    acc.update(loss=0.0, ar=0.0, mdm=0.0, tokens=0, slots=0, n=0, since=time.monotonic())
    if on_log is not None:
        on_log(record)
    return record
