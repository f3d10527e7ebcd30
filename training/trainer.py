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
defaults to the longest example + EOS). The loss is the objective's (training/losses.objective_loss): the
mean CE over every clean-slot (AR) label of the batch, plus the masked slots' sum(w * CE) divided by the
batch's number of examples. On CUDA the forward runs under bf16 autocast (weights and optimizer state
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
import time
import warnings
from typing import Callable, Sequence

from decoding.objective import SLOT_SIZES
from training.batch_stream import PackedStream, batch_stream
from training.batches import PackedBatch, Pair
from training.losses import ar_loss, heldout_losses, objective_loss, row_cross_entropy

# The losses are re-exported: tests and docs name them here (their home is training/losses.py)
__all__ = ["TrainingError", "check_better_than_uniform", "check_weights_finite", "heldout_losses", "objective_loss",
           "row_cross_entropy", "train_model"]


UNIFORM_ROUNDING = 1e-5  # nats: an AR loss this close to ln(V) is a uniform guess to float32 rounding (1e-6 seen)
STAND_IN_EXAMPLES = 16  # training examples scored before and after training (one batch): check_better_than_uniform


class TrainingError(ValueError):
    """Bad training arguments. `field` names the argument; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


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
    at a log step, or a weight is not after the last step (`check_weights_finite`), or the trained weights'
    AR loss is no better than a uniform guess over the vocabulary (`check_better_than_uniform`, on up
    to 16 training examples, scored before the first step too): the run diverged, and
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
    scored = _scored_examples(examples)
    start_loss = ar_loss(model, scored, eos_token_id=eos_token_id)  # (where the run starts: check_better_than_uniform)
    model.train()
    records: list[dict] = []
    acc = {"loss": 0.0, "ar": 0.0, "mdm": 0.0, "tokens": 0, "slots": 0, "n": 0, "total_tokens": 0,
           "since": time.monotonic()}
    start, budget_s = time.monotonic(), (minutes * 60.0 if minutes is not None else None)
    stream = PackedStream(examples, seed=rng.randrange(2**31), rows=batch_tokens // row_len, row_len=row_len,
                          mask_id=mask_token_id, eos_id=eos_token_id, slot_sizes=slot_sizes)
    batches, step = batch_stream(stream, data_workers), 0
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
        losses, decoder = _optimizer_step(model, batch, decoder, opt, acc, step, lr, grad_clip)
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
        final = ar_loss(model, scored, eos_token_id=eos_token_id)
        check_better_than_uniform(model, final, start_loss, step, lr)
    model.eval()
    return records


def _optimizer_step(model, batch: PackedBatch, decoder, opt, acc: dict, step: int, lr: float,
                    grad_clip: float) -> tuple:
    """Step `step` (0-based) of train_model on `batch`: forward, backward, gradient clipping, AdamW.
    Returns ((loss, ar, mdm), decoder): decoder None once the first compiled step failed and the run
    went on eagerly. `lr`: the run's peak, named when the update overflows."""
    import torch

    try:
        losses = _loss_and_grads(model, batch, decoder, opt, acc)
    except Exception as exc:  # noqa: BLE001 - only the first compiled step falls back; anything else raises
        if decoder is None or step:
            raise
        # torch.compile compiles at the first call. Its failure there (an inductor or backend error on
        # this torch and device) costs the run nothing it cannot do eagerly: one step on a GPU that a
        # session gets for minutes must not throw away the corpus preparation before it
        warnings.warn(f"torch.compile failed at the first step ({type(exc).__name__}: {str(exc)[:500]}); "
                      "training continues without it (eager)", RuntimeWarning, stacklevel=3)
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
    return losses, decoder


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


def check_better_than_uniform(model, loss: float, start_loss: float, step: int, lr: float) -> None:
    """Raise TrainingError("lr") when `loss` (the AR loss: next-token cross-entropy per token of `model` after `step`
    optimizer steps, on training examples, `_scored_examples`; `lr`: the run's peak learning rate) says the run diverged:
    above both ln(V), what a uniform guess over the model's V output tokens scores, and `start_loss`, the
    same examples' loss before the first step (so: above ln(V) for a fine-tune, which starts below it); or
    ln(V) itself to float32 rounding (UNIFORM_ROUNDING), the uniform distribution whatever the input: an
    update past float32's range (`--lr 1e30 --steps 1`) left finite weights of 1e30 that scored ln(V) to
    1e-6 and were saved. A fresh model starts above ln(V) (its random logits) and its first steps at a
    small rate (inside the warm-up, a tiny --lr or --minutes budget) may leave it there, below its start:
    that run did not diverge (ln(V) alone refused a fresh `--steps 1` run at the default rate, 5.706
    against ln 300 = 5.704 on tests/integrations/test_cli_train.py's tiny model, from 5.734)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    uniform = math.log(vocab)
    if loss > max(uniform, start_loss) or abs(loss - uniform) <= UNIFORM_ROUNDING or not math.isfinite(loss):
        raise TrainingError("lr", f"the training-example AR loss after step {step} is {loss:.4f} ({start_loss:.4f} "
                                  f"before training), no better than ln({vocab}) = {uniform:.4f}, what a uniform guess "
                                  "over the vocabulary scores: training diverged; lower the learning rate (its peak was "
                                  f"{lr:.3g})")


def _scored_examples(examples) -> Sequence[Pair]:
    """The examples whose AR loss judges the run (check_better_than_uniform): up to STAND_IN_EXAMPLES
    training examples spread over them. Training ones, not held-out ones: a model that learned its
    training data past what generalizes (a small corpus) can score above ln(V) on held-out files, and
    that is overfitting, not a diverged optimizer (helper-214: 400 steps refused, training AR loss 0.02,
    held-out 8.6). Not the last training loss: it is read before the last update, which `--lr 1e30
    --steps 1` made unseen."""
    return list(examples[:: max(1, len(examples) // STAND_IN_EXAMPLES)])[:STAND_IN_EXAMPLES]


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
