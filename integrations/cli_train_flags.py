"""The flags of `refusion train` (integrations/cli_train.py): their definitions, the memory a run of them
needs (the estimate, and its check against the memory free on the device), the fresh model the shape
flags describe (a Qwen3 config; counted on the meta device by the memory check), and the training loop's
time budget (--minutes, --total-minutes). The checks made before the corpus is built are in
integrations/cli_train_checks.py.
"""

from __future__ import annotations

import argparse


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


def training_minutes(args, prep_s: float) -> float | None:
    """The training loop's wall-time budget: --minutes, or with --total-minutes what is left of it after
    `prep_s` seconds of preparation and SAVE_MARGIN_MINUTES for the save (the smaller of the two when both
    are given; a budget already spent still runs the first step)."""
    if args.total_minutes is None:
        return args.minutes
    left = max(args.total_minutes - prep_s / 60.0 - SAVE_MARGIN_MINUTES, 1e-6)
    if left < 0.005:  # (printed as "0.00 minutes left", then a step ran: helper-198)
        print(f"refusion train: nothing of --total-minutes {args.total_minutes:g} is left for training after "
              f"{prep_s:.0f}s of preparation and {SAVE_MARGIN_MINUTES:g} min kept for the save; training one step",
              flush=True)
    else:
        print(f"refusion train: {left:.2f} of --total-minutes {args.total_minutes:g} left for training after "
              f"{prep_s:.0f}s of preparation", flush=True)
    return left if args.minutes is None else min(left, args.minutes)
