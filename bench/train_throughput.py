"""Trainer throughput: example tokens per second (and per CPU-second) of `training.trainer.train_model`.

    OMP_NUM_THREADS=1 python bench/train_throughput.py [--model models/refusion-tiny-code] [--steps 20] [--warmup 3]
        [--batch-tokens 8192] [--seq-len 256] [--threads 1] [--device cpu|cuda] [--compile] [--append]

Trains --model (a copy in memory; nothing is saved) on --corpus (default: the interpreter's standard
library) for --warmup + --steps optimizer steps and times the last --steps. Prints one markdown table
row: device, parameters, batch shape, fill (share of batch tokens that are example tokens, the rest is
row-end padding), example tokens per wall second and per process CPU-second (the CPU figure is less
disturbed by other load on the machine), and on CUDA the model FLOP utilisation against --peak-tflops
(6 x parameters x tokens; attention FLOPs left out). --append adds the row to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def check_shape(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors before the corpus is read or the model loads: --batch-tokens below one row of --seq-len
    (the trainer's TrainingError traceback), and what `refusion train --init` refuses of a checkpoint
    (integrations.cli_train_checks.check_init_shape on its config, parameters counted on the meta
    device): --seq-len past the model's context, or a step that needs more memory than the device has
    free (--batch-tokens 200000 --seq-len 100000 was killed for memory at 23 GB)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from integrations.cli_train_checks import check_init_shape
    from integrations.cli_train_flags import TrainArgumentError

    if args.batch_tokens < args.seq_len:
        parser.error(f"--batch-tokens {args.batch_tokens}: use at least --seq-len ({args.seq_len}), one row")
    config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    try:
        check_init_shape(args, config, n_params, model_flag="--model")
    except TrainArgumentError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    from bench.bench_args import count, model_dir, positive_int, torch_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(REPO / "models" / "refusion-tiny-code"))
    parser.add_argument("--corpus", nargs="+", default=["stdlib"])
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--warmup", type=count, default=3, help="untimed steps first (0: none)")
    parser.add_argument("--batch-tokens", type=positive_int, default=8192)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="measured bf16 matmul peak (H200)")
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)
    check_shape(parser, args)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.corpus import load_units, tokenize_units
    from training.trainer import train_model

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    units, _ = load_units(args.corpus)
    pairs = tokenize_units(tokenizer, units[:20000], args.seq_len)
    mask_id, eos_id = tokenizer.mask_token_id, tokenizer.eos_token_id
    common = dict(batch_tokens=args.batch_tokens, row_len=args.seq_len, lr=1e-4, mask_token_id=mask_id,
                  eos_token_id=eos_id, seed=0, compile_model=args.compile)
    if args.warmup:  # warm-up (and compilation)
        train_model(model, pairs, steps=args.warmup, log_every=10**9, **common)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    (record,) = train_model(model, pairs, steps=args.steps, log_every=10**9, **common)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n_params = sum(p.numel() for p in model.parameters())
    tokens = record["total_tokens"]
    mfu = ""
    if args.device.startswith("cuda"):
        mfu = f"{100 * 6 * n_params * tokens / wall / (args.peak_tflops * 1e12):.2f}%"
    rows = args.batch_tokens // args.seq_len
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    row = (f"| {machine}, torch {torch.__version__}, {args.threads} thread(s) | {n_params / 1e6:.1f}M | "
           f"{rows} x {args.seq_len}{' compiled' if args.compile else ''} | {record['fill']:.3f} | "
           f"{tokens / wall:,.0f} | {tokens / max(cpu, 1e-9):,.0f} | {mfu or 'n/a'} |")
    print("| machine | parameters | batch (rows x len) | fill | tokens/s | tokens/CPU-s | MFU |")
    print("|---|---|---|---|---|---|---|")
    print(row)
    if args.append:
        with (REPO / "docs" / "benchmarks.md").open("a") as f:
            f.write(f"\n<!-- bench/train_throughput.py {' '.join(sys.argv[1:])} -->\n{row}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
