"""The checks of `refusion train`'s flags (integrations/cli_train_flags.py) made before the corpus is built:
bounds, sizes, the corpus, the device, the model source (an --init checkpoint's files, or a fresh model's
memory) and --out; and an --init checkpoint's config before its weights load (check_init_shape). Each
failure is a TrainArgumentError naming the flag.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from integrations.cli_train_flags import (FRESH_LR, INIT_LR, SHAPE_DEFAULTS, TrainArgumentError,
                                          check_training_memory, fresh_model)
from integrations.cli_train_out import RUN_RECORDS
from workers.batch import SEED_MAX

# Fewest tokens a unit takes in a row (training.corpus.tokenize_units keeps len(prompt) + len(response)
# + EOS <= seq_len): a unit's prompt (its `def` or `class` line at least) and its response (a line that is
# not blank) are never empty, so any tokenizer gives each at least one token, then EOS. With the byte-level
# BPE a fresh model gets (training.tokenizer_build.build_bpe_tokenizer), whose pre-tokenizer splits text as
# GPT-2's does and no token spans two of its pieces, a prompt is at least 3 tokens (a word, a space with
# the name and punctuation, the newline: "def _():\n") and a response at least 2 (its text, its newline:
# " _\n"): 6 with EOS. (Here, not in training/: the serving packages never import it.)
MIN_UNIT_TOKENS = 3
MIN_BPE_UNIT_TOKENS = 6

# Weight files an --init directory may hold (transformers' names)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_flags(args) -> None:
    """Every flag that can be checked before the corpus is built (minutes on stdlib). Raises
    TrainArgumentError naming the flag."""
    _check_budget_flags(args)
    _check_size_flags(args)
    _check_corpus_flag(args.corpus)
    _check_device(args.device)
    if not args.out.strip():  # ("--out: . already holds files", helper-198)
        raise TrainArgumentError("--out", "is empty; give the path of a new directory for the model")
    _check_model_source(args)
    _check_out(Path(args.out), args.overwrite)


def _check_budget_flags(args) -> None:
    """The bounds of training (--steps, --minutes, --total-minutes: one at least), the learning rate
    (--lr, its default resolved here for a fresh model or a fine-tune) and --checkpoint-minutes."""
    if args.steps is None and args.minutes is None and args.total_minutes is None:
        raise TrainArgumentError("--steps", "give --steps N, --minutes M or --total-minutes M to bound training")
    if args.total_minutes is not None and not 0 < args.total_minutes < math.inf:
        raise TrainArgumentError("--total-minutes", f"got {args.total_minutes}; use a positive, finite number of "
                                                    "minutes")
    if args.steps is not None and args.steps < 1:
        raise TrainArgumentError("--steps", f"got {args.steps}; use at least 1 optimizer step")
    if args.minutes is not None and not 0 < args.minutes < math.inf:
        raise TrainArgumentError("--minutes", f"got {args.minutes}; use a positive, finite number of minutes")
    if args.lr is None:  # (resolved here: train_args.json records the rate used)
        args.lr = FRESH_LR if args.init is None else INIT_LR
    if not 0 < args.lr < math.inf:
        raise TrainArgumentError("--lr", f"got {args.lr}; use a positive, finite learning rate such as "
                                         f"{FRESH_LR if args.init is None else INIT_LR:g}")
    if not 0 < args.checkpoint_minutes <= math.inf:  # inf: no checkpoint before the end
        raise TrainArgumentError("--checkpoint-minutes", f"got {args.checkpoint_minutes}; use a positive number")


def _check_size_flags(args) -> None:
    """The fractions, counts and sizes: data split and batch, model shape, seed, threads and worker
    processes, each in its range; --seq-len long enough for a unit to fit (MIN_UNIT_TOKENS,
    MIN_BPE_UNIT_TOKENS for a fresh model's tokenizer); the shape's head size even and --kv-heads dividing
    --heads."""
    if not 0.0 <= args.chat_fraction < 1.0:
        raise TrainArgumentError("--chat-fraction", f"got {args.chat_fraction}; use a fraction in [0, 1), e.g. 0.25")
    if not 0.0 <= args.heldout_fraction < 1.0:
        raise TrainArgumentError("--heldout-fraction", f"got {args.heldout_fraction}; use a fraction in [0, 1), e.g. 0.03")
    if args.batch_tokens < args.seq_len:
        raise TrainArgumentError("--batch-tokens", f"got {args.batch_tokens}; use at least --seq-len ({args.seq_len})")
    for name in ("seq_len", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "log_every"):
        if getattr(args, name) < 1:
            raise TrainArgumentError("--" + name.replace("_", "-"), f"got {getattr(args, name)}; use a positive number")
    for name in ("heldout_max", "data_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise TrainArgumentError("--" + name.replace("_", "-"), f"got {getattr(args, name)}; use 0 or more")
    fewest = MIN_BPE_UNIT_TOKENS if args.init is None else MIN_UNIT_TOKENS
    if args.seq_len < fewest:  # (refused once the corpus was built, minutes on stdlib: "no unit fits")
        tokenizer = "the BPE tokenizer built for a fresh model" if args.init is None else "any tokenizer"
        raise TrainArgumentError("--seq-len", f"got {args.seq_len}; no unit can fit: with {tokenizer} a unit's prompt, "
                                              f"response and EOS take at least {fewest} tokens; use at least "
                                              f"{fewest} (the default 256 fits most units)")
    if not 0 <= args.seed <= SEED_MAX:  # generate's --seed range (2**70 was an OverflowError once the corpus was built)
        raise TrainArgumentError("--seed", f"got {args.seed}; use an integer in 0..{SEED_MAX} (a signed 64-bit integer)")
    if args.threads is not None and args.threads < 1:
        raise TrainArgumentError("--threads", f"got {args.threads}; use a positive number of CPU threads")
    most_workers = max(32, 2 * (os.cpu_count() or 1))  # each is a Python process holding part of the corpus
    if args.prep_workers is not None and not 1 <= args.prep_workers <= most_workers:
        raise TrainArgumentError("--prep-workers", f"got {args.prep_workers}; use 1 (none) to {most_workers} processes "
                                                   f"(this machine has {os.cpu_count()} cores)")
    if args.head_dim % 2:
        raise TrainArgumentError("--head-dim", f"got {args.head_dim}; rotary embeddings need an even head size")
    if args.heads % args.kv_heads:
        raise TrainArgumentError("--kv-heads", f"{args.kv_heads} does not divide --heads {args.heads}")
    if args.init is None and args.vocab_size < 300:
        raise TrainArgumentError("--vocab-size", f"got {args.vocab_size}; byte-level BPE needs at least 300 "
                                                 "(256 bytes + special tokens)")


def _check_corpus_flag(corpus: list[str]) -> None:
    """Each --corpus item 'stdlib', 'site-packages' or a directory that exists."""
    if any(not item.strip() for item in corpus):
        raise TrainArgumentError("--corpus", "an empty name; give 'stdlib', 'site-packages' or a directory")
    for item in corpus:  # here, before an --init checkpoint is loaded
        if item not in ("stdlib", "site-packages") and not Path(item).is_dir():
            what = "is not a directory" if Path(item).exists() else "does not exist"
            raise TrainArgumentError("--corpus", f"{item!r} {what}; give 'stdlib', 'site-packages' or a directory of "
                                                 ".py files")


def _check_model_source(args) -> None:
    """--init: a checkpoint directory that can be trained (_check_init), with no shape flag given (the
    checkpoint has its own shape); a fresh model: its training fits in memory (_check_memory)."""
    if args.init is not None and not args.init.strip():  # (". has no config.json", helper-187)
        raise TrainArgumentError("--init", "is empty; give an HF model directory to start from, or leave --init out "
                                           "for a fresh model")
    if args.init is not None:
        _check_init(Path(args.init))
        changed = [name for name, default in SHAPE_DEFAULTS.items() if getattr(args, name) != default]
        if changed:  # they were ignored silently: the checkpoint has its own shape
            flag = "--" + changed[0].replace("_", "-")
            raise TrainArgumentError(flag, f"the model's shape comes from the --init checkpoint; drop {flag} (shape "
                                           "flags apply to a fresh model only)")
    else:
        _check_memory(args)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise TrainArgumentError("--device", f"got {device!r}; use cpu or cuda") from None
    if kind not in ("cpu", "cuda"):
        raise TrainArgumentError("--device", f"got {device!r}; use cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainArgumentError("--device", "no CUDA device is available here; use --device cpu")


def _check_memory(args) -> None:
    """A fresh model whose training state (TRAIN_BYTES_PER_PARAM per parameter, counted on the meta
    device) and step activations (activation_bytes) exceed the memory free on the training device is
    refused naming the flag to change. It was an allocator traceback after the corpus was built, a
    machine driven into swap, or the kernel's OOM killer. Raises TrainArgumentError (field "--hidden",
    "--seq-len" or "--batch-tokens")."""
    import torch

    with torch.device("meta"):
        n_params = sum(p.numel() for p in fresh_model(args, vocab_size=args.vocab_size, eos=0).parameters())
    check_training_memory(args, n_params, args.layers, args.hidden, args.intermediate, args.vocab_size)


def _check_init(init: Path) -> None:
    """An --init directory transformers can load (config.json, a JSON object, and weights) whose trained
    model the engine would serve: config.json and the safetensors weights' headers pass the serving
    loader's checks (workers.model_config.read_config and workers.checkpoint.check_weights: a Qwen3 with
    default RoPE, every tensor there with the config's shape, none the model has no place for).
    transformers filled a missing tensor with random values and trained on. The tokenizer is not checked:
    training adds <|mask|> and grows the embedding to the tokenizer. Raises TrainArgumentError("--init")
    naming the file."""
    if not init.is_dir():
        raise TrainArgumentError("--init", f"{init} is not a directory; give an HF model directory")
    try:
        config = json.loads((init / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainArgumentError("--init", f"{init} has no config.json; give an HF model directory") from None
    except (OSError, ValueError) as exc:
        raise TrainArgumentError("--init", f"{init}/config.json cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise TrainArgumentError("--init", f"{init}/config.json must hold a JSON object")
    if not any((init / name).is_file() for name in WEIGHT_FILES):
        raise TrainArgumentError("--init", f"{init} has no weights ({', '.join(WEIGHT_FILES[::2])})")
    from workers.loader import ModelDirError, check_weights, read_config

    try:
        config = read_config(init)
        if any((init / name).is_file() for name in WEIGHT_FILES[:2]):  # (pytorch_model.bin: checked once loaded)
            check_weights(init, config)
    except ModelDirError as exc:
        raise TrainArgumentError("--init", str(exc)) from None


def _check_out(out: Path, overwrite: bool) -> None:
    """--out: a new or empty directory (created later), one where a run saved no model, or with
    --overwrite any directory."""
    if out.exists() and not out.is_dir():
        raise TrainArgumentError("--out", f"{out} is a file, not a directory; give a new directory path")
    if out.is_dir():
        # A run that saved no model (bad flag found late, diverged, interrupted early) left only its records
        if not overwrite and {p.name for p in out.iterdir()} - set(RUN_RECORDS):
            what = "a model" if (out / "config.json").exists() else "files"
            raise TrainArgumentError("--out", f"{out} already holds {what}; give a new or empty directory, or add "
                                              "--overwrite to replace them (to continue a model, pass it as --init)")
        if not os.access(out, os.W_OK):
            raise TrainArgumentError("--out", f"{out}: permission denied; give a directory you can write")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TrainArgumentError("--out", f"{out} cannot be created under {parent}; give a path you can write")


def check_init_shape(args, config, n_params: int, model_flag: str = "--init") -> None:
    """Checks of the --init checkpoint's config (transformers' PretrainedConfig) made before its weights
    load: rows no longer than its context (TrainArgumentError "--seq-len"), and training state and one
    step's activations within the memory free on the device (cli_train_flags.memory_problem; `n_params`
    counted on the meta device: a checkpoint too large was loaded in float32 first, and an 8B one was
    killed for memory before any word; helper-187), naming --seq-len, --batch-tokens or --init
    (`model_flag`: the flag that named the checkpoint, bench/train_throughput.py's --model)."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and args.seq_len > context:  # positions past what the model is made for
        raise TrainArgumentError("--seq-len", f"{args.seq_len} is longer than the {model_flag} model's context "
                                              f"(max_position_embeddings {context}); give at most {context}")
    check_training_memory(args, n_params, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                          config.vocab_size, (model_flag, "train a smaller model, or on a machine with more memory"))
