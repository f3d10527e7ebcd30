"""`refusion train`: train a Qwen3-shaped model from scratch (config from flags) or fine-tune a checkpoint
(--init) with the ReFusion objective, and save an HF-format directory the engine and transformers load.

    refusion train --corpus stdlib --out /tmp/m --minutes 30 --hidden 256 --layers 4 --vocab-size 4096

Output directory: config.json (with mask_token_id), model.safetensors, tokenizer files,
train_log.jsonl (one JSON record per log step: train AR/MDM losses and held-out AR/MDM losses, see
training/trainer.py) and train_args.json (the flags and corpus statistics, for reproduction).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path


class TrainArgumentError(ValueError):
    """A `refusion train` flag is unusable. `field` names the flag; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `refusion train`."""
    a = parser.add_argument
    a("--corpus", nargs="+", default=["stdlib"], help="'stdlib' and/or directories of Python source")
    a("--out", required=True, help="output model directory (created)")
    a("--init", default=None, help="start from this HF model directory instead of a fresh config")
    a("--steps", type=int, default=None, help="optimizer steps (default: until --minutes runs out)")
    a("--minutes", type=float, default=None,
      help="wall-time budget of the training loop in minutes (the first step always runs)")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--batch-tokens", type=int, default=8192,
      help="tokens per optimizer step: --batch-tokens // --seq-len rows of --seq-len tokens, examples packed")
    a("--lr", type=float, default=2e-3)
    a("--seq-len", type=int, default=256, help="row length: longest prompt + response + EOS, in tokens")
    a("--compile", action="store_true", help="torch.compile the decoder stack (CUDA; one static batch shape)")
    a("--data-workers", type=int, default=None,
      help="processes arranging batches ahead of the step (default: 2 on CUDA, 0 on CPU)")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=25)
    a("--heldout-fraction", type=float, default=0.03, help="fraction of files held out (by path hash)")
    a("--heldout-max", type=int, default=128, help="held-out units scored at each log step")
    a("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    a("--chat-fraction", type=float, default=0.25,
      help="share of training pairs that are synthetic chat instructions and tool calls (training/chat_data.py)")
    a("--checkpoint-minutes", type=float, default=10.0, help="also save the model this often while training")
    a("--overwrite", action="store_true",
      help="let --out be a directory that already holds a model or another run's files (they are replaced)")
    shape = parser.add_argument_group("model shape (fresh model only)")
    shape.add_argument("--hidden", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--head-dim", type=int, default=64)
    shape.add_argument("--intermediate", type=int, default=768)
    shape.add_argument("--vocab-size", type=int, default=4096)


# Weight files an --init directory may hold (transformers' names)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check(args) -> None:
    """Every flag that can be checked before the corpus is built (minutes on stdlib). Raises
    TrainArgumentError naming the flag."""
    if args.steps is None and args.minutes is None:
        raise TrainArgumentError("--steps", "give --steps N or --minutes M to bound training")
    if args.steps is not None and args.steps < 1:
        raise TrainArgumentError("--steps", f"got {args.steps}; use at least 1 optimizer step")
    if args.minutes is not None and not 0 < args.minutes < math.inf:
        raise TrainArgumentError("--minutes", f"got {args.minutes}; use a positive, finite number of minutes")
    if not 0 < args.lr < math.inf:
        raise TrainArgumentError("--lr", f"got {args.lr}; use a positive, finite learning rate such as 2e-3")
    if not 0 < args.checkpoint_minutes <= math.inf:  # inf: no checkpoint before the end
        raise TrainArgumentError("--checkpoint-minutes", f"got {args.checkpoint_minutes}; use a positive number")
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
    if args.threads is not None and args.threads < 1:
        raise TrainArgumentError("--threads", f"got {args.threads}; use a positive number of CPU threads")
    if args.head_dim % 2:
        raise TrainArgumentError("--head-dim", f"got {args.head_dim}; rotary embeddings need an even head size")
    if args.heads % args.kv_heads:
        raise TrainArgumentError("--kv-heads", f"{args.kv_heads} does not divide --heads {args.heads}")
    if args.init is None and args.vocab_size < 300:
        raise TrainArgumentError("--vocab-size", f"got {args.vocab_size}; byte-level BPE needs at least 300 "
                                                 "(256 bytes + special tokens)")
    if any(not item.strip() for item in args.corpus):
        raise TrainArgumentError("--corpus", "an empty name; give 'stdlib', 'site-packages' or a directory")
    _check_device(args.device)
    if args.init is not None:
        _check_init(Path(args.init))
    else:
        _check_memory(args)
    _check_out(Path(args.out), args.overwrite)


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


# Bytes per parameter while training: float32 weights, gradients and AdamW's two moments (activations
# come on top, so this is a floor)
TRAIN_BYTES_PER_PARAM = 16


def _check_memory(args) -> None:
    """A fresh model whose training state (TRAIN_BYTES_PER_PARAM per parameter, counted on the meta
    device) exceeds the memory free on the training device is refused naming the shape flags. It was an
    allocator traceback after the corpus was built, or a machine driven into swap. Raises
    TrainArgumentError (field "--hidden")."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    free = _free_bytes(torch.device(device))
    if free is None:
        return
    with torch.device("meta"):
        n_params = sum(p.numel() for p in _fresh_model(args, vocab_size=args.vocab_size, eos=0).parameters())
    need = n_params * TRAIN_BYTES_PER_PARAM
    if need > free:
        raise TrainArgumentError("--hidden", f"a model of {n_params / 1e6:,.0f}M parameters needs at least "
                                 f"{need / 2**30:.1f} GiB to train ({TRAIN_BYTES_PER_PARAM} bytes per parameter: float32 "
                                 f"weights, gradients and AdamW's moments), more than the {free / 2**30:.1f} GiB free on "
                                 f"{device}; use a smaller --hidden, --intermediate, --layers or --vocab-size")


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
    """An --init directory transformers can load: config.json (a JSON object) and weights."""
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


def _check_out(out: Path, overwrite: bool) -> None:
    """--out: a new or empty directory (created later), one where a run saved no model, or with
    --overwrite any directory."""
    if out.exists() and not out.is_dir():
        raise TrainArgumentError("--out", f"{out} is a file, not a directory; give a new directory path")
    if out.is_dir():
        # A run that saved no model (bad flag found late, diverged, interrupted early) left only its records
        if not overwrite and {p.name for p in out.iterdir()} - {"train_args.json", "train_log.jsonl"}:
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


def _fresh_model(args, vocab_size: int, eos: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(4096, args.seq_len), rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )
    return Qwen3ForCausalLM(config)


def _model_and_tokenizer(args, train_units):
    """(model, tokenizer): fresh BPE + fresh Qwen3 config, or the --init checkpoint with <|mask|> ensured."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.tokenizer_build import build_bpe_tokenizer, ensure_mask_token

    torch.manual_seed(args.seed)
    if args.init is None:
        tokenizer = build_bpe_tokenizer((u.prompt + u.response for u in train_units), args.vocab_size)
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        return _fresh_model(args, len(tokenizer), eos).float(), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:  # what transformers raises for a directory it cannot load
        raise TrainArgumentError("--init", f"{args.init} cannot be loaded: {str(exc).splitlines()[0]}") from None
    if ensure_mask_token(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def save_model_dir(model, tokenizer, out: Path, save_dtype: str = "float32") -> None:
    """Write an HF model directory whose config.json carries mask_token_id."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, save_dtype)).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mask_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    cfg_path.write_text(json.dumps(cfg, indent=2))


# The flag behind a field that training/ names in its errors (TrainingError, CorpusError, TokenizerBuildError)
_FLAGS = {"lr": "--lr", "steps": "--steps", "minutes": "--minutes", "batch_tokens": "--batch-tokens",
          "row_len": "--seq-len", "data_workers": "--data-workers", "examples": "--corpus", "corpus": "--corpus",
          "heldout_fraction": "--heldout-fraction", "vocab_size": "--vocab-size", "init": "--init"}


class _Interrupt:
    """SIGINT/SIGTERM while training asks the loop to stop after the step in flight (then the model is
    saved); before training starts, or a second time, it stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.training = False
        self.requested = False

    def __call__(self, signum, frame):
        if self.training and not self.requested:
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
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _check(args)
        return _train(args, interrupt)
    except (TrainArgumentError, CorpusError, TokenizerBuildError, TrainingError) as err:
        flag, message = _FLAGS.get(err.field), str(err)
        if flag:
            message = flag + ": " + message.split(": ", 1)[1]
        print(f"refusion train: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refusion train: interrupted {'while training' if interrupt.training else 'before training'}; "
              f"nothing saved", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(args, interrupt: _Interrupt) -> int:
    import torch

    from training.chat_data import chat_pairs
    from training.corpus import load_units, tokenize_units
    from training.trainer import train_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    train_units, heldout_units = load_units(args.corpus, args.heldout_fraction)
    model, tokenizer = _model_and_tokenizer(args, train_units)
    train_pairs = tokenize_units(tokenizer, train_units, args.seq_len)
    chat = tokenize_units(tokenizer, chat_pairs(train_units), args.seq_len) if args.chat_fraction else []
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainArgumentError("--out", f"{out} cannot be created ({exc.strerror}); give a path you can write") from None
    n_params = sum(p.numel() for p in model.parameters())
    stats = {"train_units": len(train_pairs), "chat_pairs": len(chat), "heldout_units": len(heldout_pairs),
             "parameters": n_params,
             "train_tokens_per_epoch": sum(len(p) + len(r) + 1 for p, r in train_pairs),
             "prep_s": round(time.monotonic() - t0, 1), "device": device, "torch_threads": torch.get_num_threads()}
    (out / "train_args.json").write_text(json.dumps({"argv": sys.argv, "args": vars(args), **stats}, indent=2))
    print(f"refusion train: {n_params / 1e6:.2f}M parameters, {len(train_pairs)} train / {len(heldout_pairs)} "
          f"held-out units, {stats['train_tokens_per_epoch']} tokens per epoch, device {device}", flush=True)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")

    last_save = [time.monotonic()]

    def on_step(step: int) -> None:
        if time.monotonic() - last_save[0] > 60 * args.checkpoint_minutes:  # float32 checkpoint, same layout
            save_model_dir(model, tokenizer, out, "float32")
            model.train()
            last_save[0] = time.monotonic()

    def on_log(record: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        held = ""
        if "heldout_ar_loss" in record:
            held = f" | held-out ar {record['heldout_ar_loss']:.3f} mdm {record['heldout_mdm_loss']:.3f}"
        print(f"step {record['step']:6d} {record['elapsed_s']:8.1f}s lr {record['lr']:.2e} | train ar "
              f"{record['train_ar_loss']:.3f} mdm {record['train_mdm_loss']:.3f}{held} | "
              f"{record['tokens_per_s']:.0f} tok/s", flush=True)

    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    interrupt.training = True
    records = train_model(model, train_pairs, steps=args.steps, minutes=args.minutes, batch_tokens=args.batch_tokens,
                          row_len=args.seq_len, lr=args.lr, compile_model=args.compile,
                          data_workers=args.data_workers if args.data_workers is not None else (2 if device == "cuda" else 0),
                          mask_token_id=mask_id, eos_token_id=eos_id, seed=args.seed, log_every=args.log_every,
                          on_log=on_log, on_step=on_step, heldout=heldout_pairs or None,
                          should_stop=lambda: interrupt.requested)
    if not records:  # interrupted before the first step: an untrained model is not worth a directory
        print("refusion train: interrupted before the first step; nothing saved", file=sys.stderr, flush=True)
        return 130
    save_model_dir(model.cpu(), tokenizer, out, args.save_dtype)
    if interrupt.requested:
        print(f"refusion train: interrupted at step {records[-1]['step']}; saved {out} in "
              f"{time.monotonic() - t0:.0f}s", flush=True)
        return 130
    print(f"refusion train: saved {out} in {time.monotonic() - t0:.0f}s", flush=True)
    return 0
