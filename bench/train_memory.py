"""Training memory: the peak resident memory of `refusion train --steps 1` against the estimate its
memory check refuses runs by (integrations/cli_train_flags.py: TRAIN_BYTES_PER_PARAM per parameter plus
`activation_bytes`, one step's activations).

    python bench/train_memory.py [--shapes "SEQ_LEN ROWS LAYERS HIDDEN INTERMEDIATE" ...]

Each shape is a fresh model (heads 2, kv heads 1, head_dim 32, vocab 512) trained one step on a tiny
corpus (three standard-library modules copied to a temporary directory, so corpus memory stays small),
in a process of its own, one thread; its peak RSS is getrusage's ru_maxrss of that process. Prints one
markdown table: shape, measured peak, the check's estimate, and estimate / measured (above 1: the check is
on the safe side). CPU only: on CUDA the activations live in GPU memory, which this does not measure.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SHAPES = ["1024 1 2 64 128", "4096 1 2 64 128", "8192 1 2 64 128", "8192 2 2 64 128", "8192 1 4 64 128",
                  "16384 1 2 64 128", "2048 16 2 512 2048"]
VOCAB = 512
# Runs the command given after it and prints its peak RSS in KiB (ru_maxrss of its only child)
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL).returncode; print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def shape(text: str) -> tuple[int, int, int, int, int]:
    try:
        seq_len, rows, layers, hidden, intermediate = (int(x) for x in text.split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected \"SEQ_LEN ROWS LAYERS HIDDEN INTERMEDIATE\", got {text!r}") from None
    if min(seq_len, rows, layers, hidden, intermediate) < 1:
        raise argparse.ArgumentTypeError(f"every number must be positive, got {text!r}")
    return seq_len, rows, layers, hidden, intermediate


def measure(corpus: Path, out: Path, seq_len: int, rows: int, layers: int, hidden: int, intermediate: int) -> int:
    """Peak RSS in bytes of one `refusion train --steps 1` run of this shape."""
    command = [sys.executable, "-m", "integrations.cli", "train", "--corpus", str(corpus), "--out", str(out),
               "--hidden", str(hidden), "--layers", str(layers), "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
               "--intermediate", str(intermediate), "--vocab-size", str(VOCAB), "--seq-len", str(seq_len),
               "--batch-tokens", str(seq_len * rows), "--steps", "1", "--prep-workers", "1", "--threads", "1"]
    done = subprocess.run([sys.executable, "-c", PEAK, *command], cwd=REPO, capture_output=True, text=True, check=True)
    code, peak_kib = (int(x) for x in done.stdout.split())
    if code != 0:
        raise SystemExit(f"train_memory: the run of {seq_len} x {rows} rows exited {code}: {' '.join(command)}")
    return peak_kib * 1024


def main() -> int:
    import torch

    from integrations.cli_train_flags import TRAIN_BYTES_PER_PARAM, activation_bytes, fresh_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=shape, default=[shape(s) for s in DEFAULT_SHAPES])
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread\n")
    print("| seq_len | rows | layers | hidden | intermediate | measured peak GiB | estimate GiB | estimate / measured |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus"
        corpus.mkdir()
        for name in ("textwrap.py", "shlex.py", "string.py"):
            shutil.copy(stdlib / name, corpus / name)
        for k, (seq_len, rows, layers, hidden, intermediate) in enumerate(args.shapes):
            peak = measure(corpus, Path(work) / f"out{k}", seq_len, rows, layers, hidden, intermediate)
            flags = argparse.Namespace(hidden=hidden, layers=layers, heads=2, kv_heads=1, head_dim=32,
                                       intermediate=intermediate, seq_len=seq_len)
            with torch.device("meta"):
                n_params = sum(p.numel() for p in fresh_model(flags, vocab_size=VOCAB, eos=0).parameters())
            estimate = n_params * TRAIN_BYTES_PER_PARAM + sum(activation_bytes(rows, seq_len, layers, hidden,
                                                                               intermediate, VOCAB))
            print(f"| {seq_len} | {rows} | {layers} | {hidden} | {intermediate} | {peak / 2**30:.2f} | "
                  f"{estimate / 2**30:.2f} | {estimate / peak:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
