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
    a("--minutes", type=float, default=None, help="wall-time budget in minutes")
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
    shape = parser.add_argument_group("model shape (fresh model only)")
    shape.add_argument("--hidden", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--head-dim", type=int, default=64)
    shape.add_argument("--intermediate", type=int, default=768)
    shape.add_argument("--vocab-size", type=int, default=4096)


def _check(args) -> None:
    if args.steps is None and args.minutes is None:
        raise TrainArgumentError("--steps", "give --steps N or --minutes M to bound training")
    if args.steps is not None and args.steps < 1:  # checked here, before minutes of corpus building
        raise TrainArgumentError("--steps", f"got {args.steps}; use at least 1 optimizer step")
    if args.minutes is not None and not args.minutes > 0:
        raise TrainArgumentError("--minutes", f"got {args.minutes}; use a positive number of minutes")
    if not 0.0 <= args.chat_fraction < 1.0:
        raise TrainArgumentError("--chat-fraction", f"got {args.chat_fraction}; use a fraction in [0, 1), e.g. 0.25")
    if args.batch_tokens < args.seq_len:
        raise TrainArgumentError("--batch-tokens", f"got {args.batch_tokens}; use at least --seq-len ({args.seq_len})")
    for name in ("seq_len", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate"):
        if getattr(args, name) < 1:
            raise TrainArgumentError("--" + name.replace("_", "-"), f"got {getattr(args, name)}; use a positive number")
    if args.heads % args.kv_heads:
        raise TrainArgumentError("--kv-heads", f"{args.kv_heads} does not divide --heads {args.heads}")
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not (Path(args.out) / "config.json").exists():
        raise TrainArgumentError("--out", f"{args.out} exists and is not a model directory; give a new or empty path")


def _fresh_model(args, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
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
        return _fresh_model(args, tokenizer).float(), tokenizer
    if not (Path(args.init) / "config.json").exists():
        raise TrainArgumentError("--init", f"{args.init} has no config.json; give an HF model directory")
    tokenizer = AutoTokenizer.from_pretrained(args.init)
    model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
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


def run(args) -> int:
    """Train and save; prints one progress line per log step. Returns 0 on success, 2 on bad flags."""
    from training.corpus import CorpusError
    from training.tokenizer_build import TokenizerBuildError
    from training.trainer import TrainingError

    try:
        _check(args)
        return _train(args)
    except (TrainArgumentError, CorpusError, TokenizerBuildError, TrainingError) as err:
        print(f"refusion train: {err}", file=sys.stderr)
        return 2


def _train(args) -> int:
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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

    def on_log(record: dict) -> None:
        if time.monotonic() - last_save[0] > 60 * args.checkpoint_minutes:  # float32 checkpoint, same layout
            save_model_dir(model, tokenizer, out, "float32")
            model.train()
            last_save[0] = time.monotonic()
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
    train_model(model, train_pairs, steps=args.steps, minutes=args.minutes, batch_tokens=args.batch_tokens,
                row_len=args.seq_len, lr=args.lr, compile_model=args.compile,
                data_workers=args.data_workers if args.data_workers is not None else (2 if device == "cuda" else 0),
                mask_token_id=mask_id, eos_token_id=eos_id, seed=args.seed, log_every=args.log_every,
                on_log=on_log, heldout=heldout_pairs or None)
    save_model_dir(model.cpu(), tokenizer, out, args.save_dtype)
    print(f"refusion train: saved {out} in {time.monotonic() - t0:.0f}s", flush=True)
    return 0
