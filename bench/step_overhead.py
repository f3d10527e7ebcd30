"""Host time per engine step with a zero-cost model: what a step costs besides the model itself.

`ModelRunner.execute` runs on a Qwen3-shaped stand-in whose layers cost nothing (hidden() is one
embedding lookup, the LM head one broadcast multiply), so the time measured is packing +
validation + the host->device copy + the step's own device work outside the layers (attention indices
and mask, reads) + the device->host copy + unpacking. Shapes per running request:

    ar        AR decode: 1 token after the cache, argmax read
    ar-sample AR decode with temperature 0.8, top-k 50, top-p 0.95 (Gumbel noise + sort stages)
              (both AR shapes carry the mask token's ban, one logit bias pair, as every AR step the
              engine runs does: decoding.ar.ARDecoder._logit_bias; --no-ar-bias leaves it out)
    plan      ReFusion plan: S * slots mask tokens at their positions, dropped, argmax reads
    verify    ReFusion verify: 2 chosen slots (2 * S clean tokens), kept, shifted prob reads
    branches  ReFusion slot completion draft: 2 branches of S tokens (branch_lens), mask rows read

Block tables are built once outside the timing (owning KV is the scheduler's work, not the step's).
On a CPU "device" the execute column includes the reads' real arithmetic ([R, V] logsumexp, argmax;
Gumbel noise and the top-k/top-p sort when sampling); "device ops" counts the non-view aten ops of a
step outside the layers, i.e. roughly the kernel launches a GPU step adds to its model's.

    OMP_NUM_THREADS=1 python bench/step_overhead.py               # CPU, prints a markdown table
    OMP_NUM_THREADS=1 python bench/step_overhead.py --shapes ar,ar-sample --vocab 151936   # Qwen's vocab
    python bench/step_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.bench_args import at_most, count, positive_int, positive_ints, torch_device  # noqa: E402
from workers.batch import TOKEN_BAN, Reads, Sampling, Segment  # noqa: E402
from workers.kv_blocks import DEFAULT_BLOCK_SIZE  # noqa: E402
from workers.loader import ModelConfig  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

SHAPES = ("ar", "ar-sample", "plan", "verify", "branches")


class ZeroCostModel(nn.Module):
    """Qwen3-shaped for the runner (cfg, lm_head, hidden(), logits()), with free layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.lm_head = nn.Linear(1, cfg.vocab_size, bias=False)  # [V, 1]: its weight places the runner

    def hidden(self, token_ids: torch.Tensor, positions: torch.Tensor, attend, kernels=None) -> torch.Tensor:
        """[T] -> [T, hidden]: no layer runs, so `attend` is never called."""
        return self.embed(token_ids)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows[:, :1] * self.lm_head.weight[:, 0]).float()  # [R, V]: an outer product, not a matmul


def stand_in_runner(device: str, vocab: int, num_blocks: int) -> ModelRunner:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      eos_token_id=0, mask_token_id=1)
    model = ZeroCostModel(cfg).to(device).eval()
    return ModelRunner.from_model(model, mask_token_id=1, block_size=DEFAULT_BLOCK_SIZE, num_blocks=num_blocks,
                                  fuse_projections=False, cuda_graphs=False)  # eager on CUDA too: what the host does around a step


def segments_for(shape: str, n: int, context: int, s: int, slots: int, mask: int,
                 ar_bias: bool = True) -> list[Segment]:
    """n segments of one shape; request i has `context + i` cached tokens. ar_bias: AR segments carry the
    mask token's ban (TOKEN_BAN), the one logit bias pair the engine's AR decoder always sends."""
    segs = []
    ban = ((mask, TOKEN_BAN),) if ar_bias else ()
    for i in range(n):
        ctx, sid = context + i, f"r{i}"
        if shape in ("ar", "ar-sample"):
            sampling = Sampling(0.8, 50, 0.95, seed=i, step=3) if shape == "ar-sample" else Sampling()
            reads = Reads(sample=(0,)) if shape == "ar-sample" else Reads(argmax=(0,))
            segs.append(Segment(sid, ctx, [7], [ctx], 1, reads, sampling=sampling, logit_bias=ban))
        elif shape == "plan":
            k = s * slots
            segs.append(Segment(sid, ctx, [mask] * k, list(range(ctx, ctx + k)), 0, Reads(argmax=tuple(range(k)))))
        elif shape == "verify":
            k = 2 * s
            rows = tuple(range(k - 1))
            segs.append(Segment(sid, ctx, [9] * k, list(range(ctx, ctx + k)), k,
                                Reads(prob=rows, prob_tokens=(9,) * len(rows))))
        else:  # branches: two slots, the first token of each verified, the rest masks
            toks = ([11] + [mask] * (s - 1)) * 2
            pos = list(range(ctx, ctx + s)) + list(range(ctx + 2 * s, ctx + 3 * s))
            rows = tuple(j for j in range(2 * s) if j % s)
            segs.append(Segment(sid, ctx, toks, pos, 0, Reads(argmax=rows), branch_lens=[s, s]))
    return segs


def tables_for(segments: list[Segment], block_size: int) -> list[list[int]]:
    """Disjoint block tables covering each segment's context + kept tokens."""
    tables, at = [], 0
    for seg in segments:
        n = -(-(seg.context_len + seg.num_kept) // block_size)
        tables.append(list(range(at, at + n)))
        at += n
    return tables


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops dispatched (on CUDA: roughly the kernel launches, copies included)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.ops


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(args) -> str:
    runner = stand_in_runner(args.device, args.vocab, num_blocks=64 * (args.context + 64 + 3 * 16) // 16 + 64)
    lines = [
        f"Machine: {machine(runner.device)}. Zero-cost stand-in model (vocab {args.vocab}), context "
        f"{args.context}+i cached tokens, S={args.slot_size}, {args.slots} slots; AR steps "
        f"{'with the mask-token ban (one logit bias pair)' if args.ar_bias else 'without a logit bias'}; "
        f"median of {args.repeats}.",
        "",
        "| shape | requests | T | R | pack + validate ms | execute ms | device ops |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in args.shapes:
        for n in args.requests:
            segs = segments_for(shape, n, args.context, args.slot_size, args.slots, runner.info.mask_token_id,
                                args.ar_bias)
            tables = tables_for(segs, runner.info.block_size)
            layout = runner.pack(segs, tables).layout
            pack = time_ms(lambda: runner.pack(segs, tables), args.repeats)
            total = time_ms(lambda: runner.execute(segs, tables), args.repeats)
            ops = count_ops(lambda: runner.execute(segs, tables))
            lines.append(f"| {shape} | {n} | {layout.num_tokens} | {layout.num_reads} | {pack:.3f} | {total:.3f} "
                         f"| {ops} |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", type=torch_device, help="cpu, or cuda where this machine has it")
    parser.add_argument("--requests", type=positive_ints, default=[1, 8, 32, 64])
    parser.add_argument("--shapes", type=lambda v: v.split(","), default=list(SHAPES))
    parser.add_argument("--repeats", type=positive_int, default=200, help="timed runs per row (median)")
    parser.add_argument("--vocab", type=positive_int, default=512)
    parser.add_argument("--context", type=at_most(32768, count), default=128,
                        help="cached tokens before request i's step: this + i (0-32768)")
    parser.add_argument("--slot-size", type=positive_int, default=4, help="S: tokens per ReFusion slot")
    parser.add_argument("--slots", type=positive_int, default=4, help="slots of a ReFusion plan step")
    parser.add_argument("--ar-bias", action=argparse.BooleanOptionalAction, default=True,
                        help="AR steps carry the mask-token ban as the engine's do (default); --no-ar-bias: none")
    args = parser.parse_args(argv)
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
