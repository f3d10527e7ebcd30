"""The flags of `refusion train` (integrations/cli_train.py): their definitions, the checks made before
the corpus is built (each failure a TrainArgumentError naming the flag), and the fresh model the shape
flags describe (a Qwen3 config; counted on the meta device by the memory check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from workers.batch import SEED_MAX


class TrainArgumentError(ValueError):
    """A `refusion train` flag is unusable. `field` names the flag; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `refusion train`."""
    a = parser.add_argument
    a("--corpus", nargs="+", default=["stdlib"], help="'stdlib', 'site-packages' (the running interpreter's installed packages) and/or directories of Python source")
    a("--out", required=True, help="output model directory (created; a new or empty one, or see --overwrite)")
    a("--init", default=None, help="start from this HF model directory instead of a fresh config")
    a("--steps", type=int, default=None, help="optimizer steps (default: until --minutes runs out)")
    a("--minutes", type=float, default=None,
      help="wall-time budget of the training loop in minutes (the first step always runs)")
    a("--total-minutes", type=float, default=None,
      help="wall-time budget of the whole run, corpus preparation included: the training loop gets what is "
           f"left after preparation, less {SAVE_MARGIN_MINUTES} min for the final save (with --minutes, the "
           "smaller); for a machine lent for a fixed time")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--batch-tokens", type=int, default=8192,
      help="tokens per optimizer step: --batch-tokens // --seq-len rows of --seq-len tokens, examples packed "
           "(default: %(default)s)")
    a("--lr", type=float, default=None,
      help=f"peak learning rate of AdamW (linear warm-up, then cosine down to a tenth of it; default: "
           f"{FRESH_LR:g} for a fresh model, {INIT_LR:g} with --init, a fine-tune)")
    a("--seq-len", type=int, default=256,
      help="row length: longest prompt + response + EOS, in tokens (default: %(default)s)")
    a("--compile", action="store_true", help="torch.compile the decoder stack (CUDA; one static batch shape)")
    a("--data-workers", type=int, default=None,
      help="processes arranging batches ahead of the step (default: 2 on CUDA, 0 on CPU)")
    a("--prep-workers", type=int, default=None,
      help="processes cutting the corpus and making chat pairs (default: every CPU core, at most 32; 1: none)")
    a("--seed", type=int, default=0, help="seed of the weights, batches and masks (default: %(default)s)")
    a("--log-every", type=int, default=25, help="optimizer steps per log line and held-out score (default: %(default)s)")
    a("--heldout-fraction", type=float, default=0.03, help="fraction of files held out (by path hash; default: %(default)s)")
    a("--heldout-max", type=int, default=128, help="held-out units scored at each log step (default: %(default)s)")
    a("--save-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights (default: %(default)s)")
    a("--chat-fraction", type=float, default=0.25,
      help="share of training pairs that are synthetic chat instructions and tool calls (training/chat_data.py; "
           "default: %(default)s)")
    a("--checkpoint-minutes", type=float, default=10.0, help="also save the model this often while training (default: %(default)s)")
    a("--overwrite", action="store_true",
      help="let --out be a directory that already holds a model or another run's files: a model's files there "
           "(weights, config, tokenizer, refusion.json, its README.md card) are replaced when the new model is "
           "first saved (an interrupted run leaves them whole); other files stay")
    shape = parser.add_argument_group("model shape (fresh model only; with --init the checkpoint's)")
    for name, default in SHAPE_DEFAULTS.items():
        shape.add_argument("--" + name.replace("_", "-"), type=int, default=default, help="(default: %(default)s)")


# --lr when not given: a fresh model's, and a fine-tune's (--init; the shipped model's stages 3-5 used 5e-4 to
# 3e-4: 2e-3 on it took the MDM loss from 5.1 to 15.4 in 4 steps, helper-198)
FRESH_LR, INIT_LR = 2e-3, 5e-4

# Of --total-minutes, what is kept for the final held-out loss and save after the training loop
SAVE_MARGIN_MINUTES = 0.5

# The shape flags of a fresh model and their defaults (args attribute -> value)
SHAPE_DEFAULTS = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 64, "intermediate": 768,
                  "vocab_size": 4096}


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
    processes, each in its range; the shape's head size even and --kv-heads dividing --heads."""
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


# Bytes per parameter while training: float32 weights, gradients and AdamW's two moments (16), and a
# quarter more for activations and the copy made when saving (a 1.42B-parameter shape estimated at 22.7
# GiB peaked at 24.1 GB of resident memory)
TRAIN_BYTES_PER_PARAM = 20


def activation_bytes(rows: int, seq_len: int, layers: int, hidden: int, intermediate: int,
                     vocab: int) -> tuple[int, int]:
    """(bytes growing with seq_len squared, the rest): what one training step's activations take on the
    CPU beyond the training state. The first: the packed rows' 4D attention mask and what each layer's
    attention keeps for backward, rows x seq_len^2 x (1 + 4.5 x layers). The rest: each layer's other
    activations (10 x hidden + 4 x intermediate floats a token), the logits with their log-softmax and
    gradient (3 x vocab floats a token) and 0.5 GiB for the process. Fitted to the peak RSS of `--steps 1`
    runs on this project's 2-core machine (bench/train_memory.py, docs/benchmarks.md 2026-12-06: seq_len
    1024-16384, 1-16 rows, 2-4 layers, hidden 64-512: the sum with the parameters' state is 1.05-1.2x
    the peak); --seq-len 100000 had been killed by the kernel at 24 GB."""
    tokens = rows * seq_len
    return (rows * seq_len * seq_len * (2 + 9 * layers) // 2,
            tokens * 4 * (layers * (10 * hidden + 4 * intermediate) + 3 * vocab) + 2**29)


FRESH_MODEL_FIX = ("--hidden", "use a smaller --hidden, --intermediate, --layers or --vocab-size")


def memory_problem(n_params: int, rows: int, seq_len: int, layers: int, hidden: int, intermediate: int, vocab: int,
                   free: int, device: str, model_fix: tuple[str, str] = FRESH_MODEL_FIX) -> tuple[str, str] | None:
    """(flag, message) when training a model of `n_params` parameters (TRAIN_BYTES_PER_PARAM each) in
    `rows` rows of `seq_len` tokens (activation_bytes) needs more than the `free` bytes of `device`; None
    when it fits. The flag: model_fix's (flag, advice) when the parameters alone do not fit (a fresh
    model's shape flags; an --init checkpoint's own), else --batch-tokens when the activations that grow
    with the step's tokens do not fit beside them (a smaller --seq-len alone cannot help), else --seq-len
    (the part growing with it squared is what does not fit)."""
    state = n_params * TRAIN_BYTES_PER_PARAM
    squared, rest = activation_bytes(rows, seq_len, layers, hidden, intermediate, vocab)
    need = state + squared + rest
    if need <= free:
        return None
    said = (f"needs about {need / 2**30:.1f} GiB to train, more than the {free / 2**30:.1f} GiB free on {device}: "
            f"{state / 2**30:.1f} GiB for {n_params / 1e6:,.{1 if n_params < 1e7 else 0}f}M parameters ({TRAIN_BYTES_PER_PARAM} "
            f"bytes each: float32 weights, gradients, AdamW's moments, room for saving) and {(squared + rest) / 2**30:.1f} GiB "
            f"for a step's activations ({rows} row{'s' if rows != 1 else ''} of {seq_len} tokens; the attention masks grow "
            "with --seq-len squared)")
    if state > free:
        return model_fix[0], f"the model {said}; {model_fix[1]}"
    if state + rest > free:  # a smaller --seq-len alone cannot make it fit (helper-187: it led from refusal to refusal)
        return "--batch-tokens", f"{rows * seq_len} tokens a step: the run {said}; use fewer --batch-tokens"
    return "--seq-len", f"rows of {seq_len} tokens: the run {said}; use a smaller --seq-len or fewer --batch-tokens"


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


def check_training_memory(args, n_params: int, layers: int, hidden: int, intermediate: int, vocab: int,
                          model_fix: tuple[str, str] = FRESH_MODEL_FIX) -> None:
    """memory_problem for a run of `args` (--batch-tokens, --seq-len, --device; cuda when available) on
    a model of this shape, against the memory free on its device (nothing checked where that cannot be
    read). Raises TrainArgumentError naming the flag (model_fix's for the parameters alone)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    free = _free_bytes(torch.device(device))
    problem = free is not None and memory_problem(n_params, args.batch_tokens // args.seq_len, args.seq_len, layers,
                                                  hidden, intermediate, vocab, free, device, model_fix)
    if problem:
        raise TrainArgumentError(*problem)


def _free_bytes(device) -> int | None:
    """Memory free for a new model on `device`: CUDA's free memory, or the kernel's MemAvailable on the
    CPU; None where it cannot be read (no /proc)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024  # kB
    except (OSError, KeyError, ValueError):
        return None


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


def fresh_model(args, vocab_size: int, eos: int):
    """A new Qwen3ForCausalLM (random weights, on torch's current default device) of the shape flags, with
    `vocab_size` tokens and EOS id `eos` (also the padding id); tied input/output embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(4096, args.seq_len), rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )
    return Qwen3ForCausalLM(config)


# What a model directory holds (transformers' files, the server's refusion.json, a run's records): with
# --overwrite they are removed when the new model is first saved (cli_train.save_model_dir), so no file of
# the old model (its decode settings above all) is read with the new one
RUN_RECORDS = ("train_args.json", "train_log.jsonl")  # written by this run when it starts
MODEL_FILES = ("config.json", "generation_config.json", "refusion.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "train_args.json", "train_log.jsonl")
MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def remove_model_files(out: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the model files of `out` (MODEL_FILES, MODEL_PATTERNS, and README.md when the directory held
    a config.json: a model card) but those named in `keep`; returns the names removed. Other files and
    every folder stay."""
    names = (set(MODEL_FILES) | ({"README.md"} if (out / "config.json").is_file() else set())) - set(keep)
    doomed = [p for p in out.iterdir() if p.is_file() and (p.name in names or any(p.match(g) for g in MODEL_PATTERNS))]
    for path in doomed:
        path.unlink()
    return sorted(p.name for p in doomed)
