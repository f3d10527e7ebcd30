"""Per-forward latency of ModelRunner.execute at batch 1 against the weight-read floor.

One sequence with `--context` cached tokens runs a segment of N query tokens (N = 1, 8, 32, 128), all
dropped, with an argmax read on every row (the shape of a ReFusion plan step), through a
workers.session.RunnerSession (which owns the KV blocks; its bookkeeping is part of the time). The floor is the time to
read every weight once: weight bytes / memory bandwidth (measured with a large device copy unless
--bandwidth-gbs is given). A forward at small N is memory-bound, so latency / floor shows the overhead.

    OMP_NUM_THREADS=1 python bench/forward_latency.py --device cpu          # small float32 config
    python bench/forward_latency.py --device cuda                          # 8B-shaped bf16, random weights
    ... --append docs/benchmarks.md                                         # also append the table
    ... --tokens 434 --context 1500 --beside 63 --beside-context 150       # a prompt chunk beside decode steps

With --beside N the timed segment shares its step with N one-token decode steps of sequences holding
--beside-context cached tokens (a chunked prefill beside running requests), and the table adds the same
step attended whole (ModelRunner.group_attention off; workers.attention_groups).

Weights are random and built directly on the device (workers.model.random_model): the 8B shape is never
allocated on the host.
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

from bench.bench_args import append_section, at_most, count, positive_float, positive_int, positive_ints, torch_device, writable_file  # noqa: E402

from workers.batch import Reads, Segment  # noqa: E402
from workers.loader import ModelConfig  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

CONFIGS = {
    # Small enough for a 2-core CPU; GQA 8/4 like the real model.
    "small": ModelConfig(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                         num_kv_heads=4, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, eos_token_id=0, mask_token_id=1),
    # Qwen3-8B / ReFusion-8B shape.
    "8b": ModelConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, eos_token_id=151645, mask_token_id=151670),
}


def weight_read_bytes(model) -> int:
    """Bytes one forward must read: every weight, except an untied embedding table (only rows gathered)."""
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


def measure_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefilled_session(runner: ModelRunner, context: int) -> RunnerSession:
    """A session whose sequence "bench" holds `context` cached tokens (what time_forward continues)."""
    session = RunnerSession(runner)
    if context:
        session.execute([Segment("bench", 0, [5] * context, list(range(context)), context)])
    return session


def time_forward(session: RunnerSession, context: int, n: int, repeats: int, beside: list[Segment] = ()) -> list[float]:
    """Seconds per execute() of an n-token dropped segment after `context` cached tokens (in one step
    with the dropped segments `beside`)."""
    seg = Segment("bench", context, [7] * n, list(range(context, context + n)), 0, Reads(argmax=tuple(range(n))))
    step = [seg, *beside]
    for _ in range(2):
        session.execute(step)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.execute(step)  # returns host values: already synchronised
        times.append(time.perf_counter() - start)
    return times


def decodes_beside(session: RunnerSession, count: int, context: int) -> list[Segment]:
    """`count` sequences holding `context` cached tokens each, and a dropped one-token decode step of each."""
    for i in range(count):
        session.execute([Segment(f"beside{i}", 0, [5] * context, list(range(context)), context)])
    return [Segment(f"beside{i}", context, [7], [context], 0, Reads(argmax=(0,))) for i in range(count)]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}"


def run(args) -> str:
    device = torch.device(args.device)
    cfg = CONFIGS[args.config or ("8b" if device.type == "cuda" else "small")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(cfg, dtype=dtype, device=device)
    max_tokens = max(args.tokens)
    runner = ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id,
                                    num_blocks=(args.context + max_tokens) // 16 + 2
                                    + args.beside * (args.beside_context // 16 + 2))
    session = prefilled_session(runner, args.context)
    beside = decodes_beside(session, args.beside, args.beside_context)
    weight_bytes = weight_read_bytes(model)
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth(device)
    floor_ms = weight_bytes / bandwidth * 1e3
    lines = [
        f"Machine: {machine(device)}. Model: {args.config or ('8b' if device.type == 'cuda' else 'small')} "
        f"({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {str(dtype)[6:]}), "
        f"context {args.context} cached tokens, argmax read on every row, runner {runner.stats()['attention']}"
        f"{', compiled layers' if runner.compile_layers else ''}"
        f"{', CUDA graphs' if runner.stats()['cuda_graphs'] else ''} (the runner's defaults on this device).",
        f"Weight bytes read per forward: {weight_bytes / 1e9:.3f} GB; bandwidth "
        f"{'given' if args.bandwidth_gbs else 'measured (device copy)'}: {bandwidth / 1e9:.1f} GB/s; "
        f"floor {floor_ms:.2f} ms.",
        "",
        "| query tokens | median ms | min ms | floor ms | median / floor | query tokens / s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    if beside:
        lines[0] += (f" Beside the timed segment in each step: {args.beside} one-token decode steps at "
                     f"{args.beside_context} cached tokens each.")
        lines[-2] += " whole step median ms (no attention groups) |"
        lines[-1] += "---:|"
    for n in args.tokens:
        times = time_forward(session, args.context, n, args.repeats, beside)
        med = statistics.median(times) * 1e3
        row = f"| {n} | {med:.2f} | {min(times) * 1e3:.2f} | {floor_ms:.2f} | {med / floor_ms:.1f}x | {n / med * 1e3:.0f} |"
        if beside:
            runner.group_attention = False
            row += f" {statistics.median(time_forward(session, args.context, n, args.repeats, beside)) * 1e3:.2f} |"
            runner.group_attention = runner.attention == "sdpa"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="default: 8b on cuda, small on cpu")
    # a segment's masks are tokens x tokens per sequence and head; the 8B shape's context is 40,960
    parser.add_argument("--tokens", type=at_most(4096, positive_ints), default=[1, 8, 32, 128],
                        help="query tokens per timed forward, comma-separated (each 1-4096)")
    parser.add_argument("--context", type=at_most(32768), default=256, help="cached tokens (1-32768)")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--beside", type=at_most(256, count), default=0,
                        help="one-token decode steps sharing each timed step (0-256)")
    parser.add_argument("--beside-context", type=at_most(32768), default=256, help="their cached tokens (1-32768)")
    parser.add_argument("--bandwidth-gbs", type=positive_float,
                        help="memory bandwidth in GB/s (above 0) for the floor, instead of measuring it (the default)")
    parser.add_argument("--append", type=writable_file, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.config == "8b":
        parser.error("the 8b config is for CUDA only (16 GB of bf16 weights); use --config small on CPU")
    table = run(args)
    print(table)
    append_section(args.append, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
