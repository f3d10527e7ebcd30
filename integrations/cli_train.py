"""`refusion train`: train a Qwen3-shaped model from scratch (config from flags) or fine-tune a checkpoint
(--init) with the ReFusion objective, and save an HF-format directory the engine and transformers load.

    refusion train --corpus stdlib --out /tmp/m --minutes 30 --hidden 256 --layers 4 --vocab-size 4096

Output directory: config.json (with mask_token_id), model.safetensors, tokenizer files,
train_log.jsonl (one JSON record per log step: train AR/MDM losses and held-out AR/MDM losses, see
training/trainer.py) and train_args.json (the flags and corpus statistics, for reproduction). The flags
are in integrations/cli_train_flags.py, the checks made before the corpus is built in
integrations/cli_train_checks.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from integrations.cli_train_checks import check_flags, check_init_shape
from integrations.cli_train_flags import TrainArgumentError, add_arguments, fresh_model, training_minutes
from integrations.cli_train_out import created_out_dir, package_set, save_model_dir, start_run_records

# add_arguments and run: integrations/cli.py's contract; save_model_dir: its home is cli_train_out
__all__ = ["add_arguments", "run", "save_model_dir"]


def _fresh_model_and_tokenizer(args, train_units):
    """(model, tokenizer): a BPE tokenizer built on the training units and a fresh Qwen3 of the shape flags."""
    import torch

    from training.tokenizer_build import build_bpe_tokenizer

    torch.manual_seed(args.seed)
    tokenizer = build_bpe_tokenizer((u.prompt + u.response for u in train_units), args.vocab_size)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return fresh_model(args, len(tokenizer), eos).float(), tokenizer


def _init_model_and_tokenizer(args):
    """(model, tokenizer) of the --init checkpoint, <|mask|> ensured; loaded before the corpus is built, so
    a checkpoint that cannot load fails in seconds. Raises TrainArgumentError("--init") for any load
    failure (truncated weights, a bad config or tokenizer file, a tensor transformers would fill with
    random values): the directory is the user's input; before the weights load, `check_init_shape`'s
    TrainArgumentError for rows longer than its context or a run the memory cannot hold. The embedding
    grows to every id the tokenizer holds."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.tokenizer_build import ensure_mask_token
    from workers.loader import TRANSFORMERS_LOAD_ERRORS, ModelDirError, load_tokenizer

    def loaded(load):
        try:
            return load()
        except (*TRANSFORMERS_LOAD_ERRORS, RuntimeError, SafetensorError, ZeroDivisionError) as exc:  # a broken dir
            reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            reason = reason if len(reason) <= 300 else reason[:297] + "..."
            raise TrainArgumentError("--init", f"{args.init} cannot be loaded ({type(exc).__name__}: {reason}); give "
                                               "an HF model directory whose weights, config and tokenizer load") from None

    torch.manual_seed(args.seed)
    def counted(config) -> int:  # parameters, on the meta device: nothing allocated
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    try:  # the serving loader's tokenizer files check and message: transformers' raw text was cut at 300 chars
        tokenizer = load_tokenizer(Path(args.init))
    except ModelDirError as exc:
        raise TrainArgumentError("--init", str(exc)) from None
    config = loaded(lambda: AutoConfig.from_pretrained(args.init))
    if not tokenizer("def f(x):\n    return x\n")["input_ids"]:  # (no tokenizer files: an empty one loads)
        raise TrainArgumentError("--init", f"{args.init}: its tokenizer encodes text to nothing (tokenizer.json or "
                                           "the vocabulary files are missing?); give a model directory with its "
                                           "tokenizer")
    check_init_shape(args, config, loaded(lambda: counted(config)))
    model, loading = loaded(lambda: AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32,
                                                                         output_loading_info=True))
    missing = sorted(loading["missing_keys"])  # (pytorch_model.bin weights: check_flags read no header)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TrainArgumentError("--init", f"{args.init}: tensor {missing[0]!r}{more} missing from the checkpoint "
                                           "(transformers would fill it with random values); give a complete one")
    ensure_mask_token(tokenizer)
    rows, needed = model.get_input_embeddings().num_embeddings, max(tokenizer.get_vocab().values()) + 1
    if needed > rows:  # every token id needs its embedding row (an added <|mask|>, a tokenizer larger than the model)
        print(f"refusion train: the embedding grows from {rows} to {needed} rows (the tokenizer's ids)", flush=True)
        model.resize_token_embeddings(needed)
    return model, tokenizer


# The flag behind a field that training/ names in its errors (TrainingError, CorpusError, TokenizerBuildError)
_FLAGS = {"lr": "--lr", "steps": "--steps", "minutes": "--minutes", "batch_tokens": "--batch-tokens",
          "row_len": "--seq-len", "data_workers": "--data-workers", "examples": "--corpus", "corpus": "--corpus",
          "heldout_fraction": "--heldout-fraction", "vocab_size": "--vocab-size", "init": "--init"}


class _Interrupt:
    """SIGINT/SIGTERM while training asks the loop to stop after the step in flight (then the model is
    saved); before training starts, or a second time, it stops at once (KeyboardInterrupt).

    Python runs a handler between bytecodes, so two signals that arrive while one C call runs (a
    backward() of seconds on the CPU) reach it as one call. Each delivery also writes a byte to the
    wakeup pipe (signal.set_wakeup_fd), so the handler counts them there: a double Ctrl-C within one
    step stops at once, as two apart do."""

    def __init__(self):
        self.training = False
        self.requested = False
        self.checkpoint: str | None = None  # where the last checkpoint is, once one is saved
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) while installed
        self._previous: dict = {}

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (main thread only); `restore` undoes it."""
        self._wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._previous["wakeup"] = signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)

    def restore(self) -> None:
        signal.set_wakeup_fd(self._previous.pop("wakeup"))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._wakeup[0])
        os.close(self._wakeup[1])
        self._wakeup, self._previous = None, {}

    def _deliveries(self) -> int:
        """SIGINT/SIGTERM deliveries since the last handler call, read off the wakeup pipe (at least the
        one being handled: the pipe is absent when the handler is called directly)."""
        count = 0
        while self._wakeup is not None:
            try:
                data = os.read(self._wakeup[0], 512)
            except BlockingIOError:
                break
            count += sum(byte in (signal.SIGINT, signal.SIGTERM) for byte in data)
        return max(count, 1)

    def __call__(self, signum, frame):
        if self.training and not self.requested and self._deliveries() == 1:
            self.requested = True
            print(f"refusion train: {signal.Signals(signum).name}: stopping after this step and saving "
                  "(again: stop at once, unsaved)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt


def run(args) -> int:
    """Train and save; prints one progress line per log step. Returns 0 on success, 2 on bad flags or a
    diverged run, 130 when interrupted (SIGINT or SIGTERM: saved if training had started)."""
    from training.corpus import CorpusError
    from training.tokenizer_build import TokenizerBuildError
    from training.trainer import TrainingError

    interrupt = _Interrupt()
    interrupt.install()
    try:
        check_flags(args)
        return _train(args, interrupt)
    except (TrainArgumentError, CorpusError, TokenizerBuildError, TrainingError) as err:
        flag, message = _FLAGS.get(err.field), str(err)
        if flag:
            message = flag + ": " + message.split(": ", 1)[1]
        print(f"refusion train: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refusion train: interrupted {'while training' if interrupt.training else 'before training'}; "
              f"{interrupt.checkpoint or 'nothing saved'}", file=sys.stderr)
        return 130
    finally:
        interrupt.restore()


def _train(args, interrupt: _Interrupt) -> int:
    """Prepare the model and its examples, start this run's records in --out, then train and save; run's
    exit code (0, or 130 when interrupted)."""
    import torch

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # ("Loading weights", "Writing model shards" bars in the log)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    model, tokenizer, (train_pairs, chat, heldout_pairs) = _model_and_examples(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = created_out_dir(args)
    n_params = sum(p.numel() for p in model.parameters())
    train_minutes = training_minutes(args, time.monotonic() - t0)
    stats = {"train_units": len(train_pairs), "chat_pairs": len(chat), "heldout_units": len(heldout_pairs),
             "parameters": n_params, "vocab_size": len(tokenizer),  # what BPE reached (--vocab-size is a bound)
             "train_tokens_per_epoch": sum(len(p) + len(r) + 1 for p, r in train_pairs),
             "prep_s": round(time.monotonic() - t0, 1), "train_minutes": train_minutes, "device": device,
             "torch_threads": torch.get_num_threads(),
             "python": sys.version.split()[0], **package_set(args.corpus)}
    records_dir = start_run_records(args, out, stats)
    print(f"refusion train: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, {len(train_pairs)} train "
          f"({len(chat)} chat) / {len(heldout_pairs)} held-out units, {stats['train_tokens_per_epoch']} tokens per epoch, "
          f"device {device}", flush=True)
    (records_dir / "train_log.jsonl").write_text("")
    return _train_and_save(args, model, tokenizer, train_pairs, heldout_pairs, train_minutes, out, records_dir,
                           interrupt, t0)


def _model_and_examples(args):
    """(model, tokenizer, (train_pairs, chat, heldout_pairs)): the --init checkpoint loaded before the corpus
    is read (a checkpoint that cannot load fails in seconds), or a fresh model and a BPE tokenizer built on
    the corpus' training units; then the units tokenized."""
    from training.corpus import load_units

    if args.init is not None:
        print(f"refusion train: loading {args.init}", flush=True)
        model, tokenizer = _init_model_and_tokenizer(args)
    print(f"refusion train: reading the corpus ({' '.join(args.corpus)})", flush=True)
    workers = args.prep_workers or min(os.cpu_count() or 1, 32)
    train_units, heldout_units = load_units(args.corpus, args.heldout_fraction, workers)
    if args.init is None:
        print(f"refusion train: {len(train_units)} training units; building a {args.vocab_size}-token BPE tokenizer",
              flush=True)
        model, tokenizer = _fresh_model_and_tokenizer(args, train_units)
    return model, tokenizer, _tokenized_examples(args, tokenizer, train_units, heldout_units, workers)


def _tokenized_examples(args, tokenizer, train_units, heldout_units, workers: int):
    """(train_pairs, chat, heldout_pairs): the units as (prompt, response) token pairs of at most --seq-len,
    --chat-fraction of the training pairs chat pairs (included in train_pairs), at most --heldout-max held
    out. Raises TrainArgumentError when no unit fits (--seq-len) or one step's rows outnumber the training
    examples (--batch-tokens)."""
    from training.chat_data import chat_pairs
    from training.corpus import tokenize_units

    train_pairs = tokenize_units(tokenizer, train_units, args.seq_len)
    chat = tokenize_units(tokenizer, chat_pairs(train_units, workers), args.seq_len) if args.chat_fraction else []
    limit = int(len(train_pairs) * args.chat_fraction / (1.0 - args.chat_fraction))
    chat = chat[:: max(1, -(-len(chat) // max(limit, 1)))][:limit]  # evenly spread over the corpus' packages
    train_pairs += chat
    heldout_pairs = tokenize_units(tokenizer, heldout_units, args.seq_len)[: args.heldout_max]
    if not train_pairs:
        raise TrainArgumentError("--seq-len", f"no unit fits in {args.seq_len} tokens; raise --seq-len")
    rows = args.batch_tokens // args.seq_len
    if rows > len(train_pairs):  # each row holds at least one example: one step would repeat the corpus
        raise TrainArgumentError("--batch-tokens", f"{args.batch_tokens} tokens make {rows} rows of --seq-len "
                                 f"{args.seq_len}, more than the corpus' {len(train_pairs)} training examples; use "
                                 f"at most {len(train_pairs) * args.seq_len}")
    return train_pairs, chat, heldout_pairs


def _train_and_save(args, model, tokenizer, train_pairs, heldout_pairs, train_minutes: float | None, out: Path,
                    records_dir: Path, interrupt: _Interrupt, t0: float) -> int:
    """Train, with a float32 checkpoint every --checkpoint-minutes and one line and train_log.jsonl record
    per log step, then save the model in --save-dtype; 0, or 130 when interrupted (nothing saved before the
    first step). A diverged run's TrainingError names the checkpoint it left."""
    from training.trainer import TrainingError, check_weights_finite

    records_at = [records_dir]  # where this run's records are written: aside while an old model's own stand (--overwrite)
    last_save, saved_step = [time.monotonic()], [None]

    def on_step(step: int) -> None:
        if time.monotonic() - last_save[0] > 60 * args.checkpoint_minutes:  # float32 checkpoint, same layout
            check_weights_finite(model, step, args.lr)  # (not a checkpoint of diverged weights)
            save(model, "float32")
            model.train()
            last_save[0], saved_step[0] = time.monotonic(), step
            interrupt.checkpoint = f"the checkpoint of step {step} is in {out}"

    def save(model, dtype: str) -> None:  # --overwrite: the old model's files go at the first save
        save_model_dir(model, tokenizer, out, dtype, replace_old=args.overwrite and saved_step[0] is None,
                       records=records_at[0])
        records_at[0] = out

    def on_log(record: dict) -> None:
        with (records_at[0] / "train_log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        _print_log_record(record)

    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    interrupt.training = True
    try:
        records = _run_training(args, train_minutes, model, train_pairs, heldout_pairs, mask_id, eos_id, on_log,
                                on_step, interrupt)
    except TrainingError as err:  # diverged: a checkpoint taken on the way may hold the diverged weights
        if saved_step[0] is None:
            raise
        raise TrainingError(err.field, f"{str(err).split(': ', 1)[1]}; the checkpoint saved at step {saved_step[0]} is "
                            f"left in {out} and may hold diverged weights: delete it") from None
    if not records:  # interrupted before the first step: an untrained model is not worth a directory
        print("refusion train: interrupted before the first step; nothing saved", file=sys.stderr, flush=True)
        return 130
    save(model.cpu(), args.save_dtype)
    if interrupt.requested:
        print(f"refusion train: interrupted at step {records[-1]['step']}; saved {out} in "
              f"{time.monotonic() - t0:.0f}s", flush=True)
        return 130
    print(f"refusion train: saved {out} in {time.monotonic() - t0:.0f}s", flush=True)
    return 0


def _print_log_record(record: dict) -> None:
    """One progress line of a log step's record: train AR/MDM losses, held-out ones when measured, speed."""
    held = ""
    if "heldout_ar_loss" in record:
        held = f" | held-out ar {record['heldout_ar_loss']:.3f} mdm {record['heldout_mdm_loss']:.3f}"
    print(f"step {record['step']:6d} {record['elapsed_s']:8.1f}s lr {record['lr']:.2e} | train ar "
          f"{record['train_ar_loss']:.3f} mdm {record['train_mdm_loss']:.3f}{held} | "
          f"{record['tokens_per_s']:.0f} tok/s", flush=True)


def _run_training(args, minutes: float | None, model, train_pairs, heldout_pairs, mask_id: int, eos_id: int,
                  on_log, on_step, interrupt: _Interrupt) -> list[dict]:
    """training.trainer.train_model with the flags' settings (and the loop's budget in minutes); its log
    records."""
    from training.trainer import train_model

    workers = args.data_workers if args.data_workers is not None else (2 if next(model.parameters()).is_cuda else 0)
    return train_model(model, train_pairs, steps=args.steps, minutes=minutes, batch_tokens=args.batch_tokens,
                       row_len=args.seq_len, lr=args.lr, compile_model=args.compile, data_workers=workers,
                       mask_token_id=mask_id, eos_token_id=eos_id, seed=args.seed, log_every=args.log_every,
                       on_log=on_log, on_step=on_step, heldout=heldout_pairs or None,
                       should_stop=lambda: interrupt.requested)
