"""Engine throughput and per-request latency at concurrency 1, 2, 4, ..., 64: ReFusion, AR and AUTO.

For each concurrency level c, c closed-loop clients each send requests back to back until
`--requests` (at least c) have finished, through `scheduler.engine.Engine` on one ModelRunner. The
three modes run back to back per level (so machine noise hits them alike); each mode keeps one engine
for the whole run, so AUTO's live TPF estimates carry over between levels as in a real service.

Reported per level and mode: generated tokens per second of wall time and of process CPU time (the
second is robust to other jobs on a shared machine; all clients together), median time to
first token, median inter-token latency (per request: (e2e - TTFT) / (tokens - 1)), median end-to-end
latency, tokens per forward, and for AUTO the share of requests it served with ReFusion. The bar:
AUTO within 5% of the better fixed mode at every level.

    OMP_NUM_THREADS=1 python bench/concurrency.py --model models/refusion-tiny-code
    ... --random-model                        # no trained model yet: random tiny Qwen3 (development)
    ... --prompts long --gen-length 128       # long outputs, where ReFusion pays (router A/B)
    ... --append docs/benchmarks.md           # also append the table
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from bench.bench_args import append_section, check_gen_length, count, model_dir, positive_int, positive_ints, writable_file  # noqa: E402
from scheduler.api import GenerationRequest, InvalidRequestError, Mode  # noqa: E402
from scheduler.config import EngineConfig, RoutingConfig  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from workers.kv_blocks import DEFAULT_BLOCK_SIZE  # noqa: E402  (the runner's, which load_runner keeps)

PROMPTS = [
    "def read_config(path):\n    \"\"\"Load a JSON config file.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n",
    "    def __repr__(self):\n        return",
    "def merge_sorted(a, b):\n    result = []\n",
    "for line in open(path):\n    if line.startswith(",
]
# Prompts on which the shipped model writes to gen_length 128 in both modes (no early EOS), ReFusion at
# 1.2-2.6 tokens per forward: the long-output case where ReFusion's parallel slots pay and the router's
# choice matters most (--prompts long).
LONG_PROMPTS = ["        self.", "        with open(", "class _"]
MODES = (Mode.REFUSION, Mode.AR, Mode.AUTO)


async def run_level(engine: Engine, tokenizer, mode: Mode, concurrency: int, total: int, params: dict, tag: str,
                    prompts: list[str] = PROMPTS, stagger_s: float = 0.0, grammar=None, grammar_every: int = 1) -> dict:
    """`concurrency` closed-loop clients until `total` requests finished: per-request records + wall time.
    `stagger_s`: client k sends its first request k x stagger_s seconds after the first one's (arrivals
    spread as in real traffic, rather than a batch that starts, and so reaches block boundaries, together).
    `grammar` (decoding.grammar.GrammarSpec): structured output for every `grammar_every`-th request."""
    counter = iter(range(total))
    records = []

    async def client(k: int):
        if stagger_s:
            await asyncio.sleep(k * stagger_s)
        for i in counter:
            prompt = tokenizer.encode(prompts[i % len(prompts)])
            spec = GenerationRequest(f"{tag}-{mode.value}-{concurrency}-{i}", prompt, dict(params), mode=mode,
                                     grammar=grammar if i % grammar_every == 0 else None)
            start, first, tokens, final = time.perf_counter(), None, 0, None
            async for delta in engine.submit(spec):
                if delta.token_ids and first is None:
                    first = time.perf_counter()
                tokens += len(delta.token_ids)
                final = delta
            end = time.perf_counter()
            first = first or end
            records.append({
                "ttft": first - start, "e2e": end - start, "tokens": tokens,
                "itl": (end - first) / (tokens - 1) if tokens > 1 else 0.0,
                "mode": final.mode, "tpf": final.stats.get("tokens_per_forward", 0.0),
            })

    start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*[client(k) for k in range(concurrency)])
    return {"records": records, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu_start}


OVERLAP = {"auto": None, "on": True, "off": False}  # --overlap-streaming -> EngineConfig.overlap_streaming
OVERLAP_HELP = ("EngineConfig.overlap_streaming: auto (the default: on for CUDA runners, off on the CPU), on, off "
                "(each step's text streamed before the next is planned)")
ASYNC_HELP = ("EngineConfig.async_scheduling: auto (the default: on for CUDA runners, off on the CPU), on, off "
              "(each step planned after the last one's results are back); same choices as --overlap-streaming")


def summarize(runs: list[dict]) -> dict:
    """One level and mode over its rounds: throughput = all tokens / all wall time; latency medians."""
    records = [r for run in runs for r in run["records"]]
    med = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    return {
        "tok_s": sum(r["tokens"] for r in records) / sum(run["wall"] for run in runs),
        "tok_cpu_s": sum(r["tokens"] for r in records) / sum(run["cpu"] for run in runs),
        "ttft_ms": med("ttft") * 1e3, "itl_ms": med("itl") * 1e3, "e2e_ms": med("e2e") * 1e3,
        "tpf": statistics.mean(r["tpf"] for r in records),
        "refusion_share": sum(r["mode"] is Mode.REFUSION for r in records) / len(records),
    }


def round_ratios(runs: dict) -> dict:
    """Median over rounds of auto / better fixed mode, on wall and CPU throughput. Each round runs the
    three modes back to back, so a ratio within a round sees the same machine load."""
    ratios = {"wall": [], "CPU": []}
    for k in range(len(runs[Mode.AUTO])):
        for kind, key in (("wall", "wall"), ("CPU", "cpu")):
            tps = {m: sum(r["tokens"] for r in runs[m][k]["records"]) / runs[m][k][key] for m in MODES}
            ratios[kind].append(tps[Mode.AUTO] / max(tps[Mode.REFUSION], tps[Mode.AR]))
    return {kind: statistics.median(values) for kind, values in ratios.items()}


async def run(args, runner) -> list[tuple[int, Mode, dict]]:
    tokenizer = runner.tokenizer
    budget = args.token_budget
    routing = RoutingConfig(calibrate=True, calibration_tokens=RoutingConfig().calibration_tokens + (budget,))
    config = EngineConfig(max_running=64, token_budget=budget, overlap_streaming=OVERLAP[args.overlap_streaming],
                          async_scheduling=OVERLAP[args.async_scheduling], routing=routing)
    engines = {m: Engine(runner, tokenizer, config) for m in MODES}
    for engine in engines.values():
        await engine.start()
    params = {"gen_length": args.gen_length} if args.gen_length else {}
    prompts = LONG_PROMPTS if args.prompts == "long" else PROMPTS
    for mode, engine in engines.items():  # warm-up: first-call costs; AUTO learns live TPF of both modes
        for warm_mode in ((Mode.REFUSION, Mode.AR) if mode is Mode.AUTO else (mode,)):
            await run_level(engine, tokenizer, warm_mode, 2, 4, params, "warm", prompts)
        engine.clear_prefix_cache()
    rows = []
    for c in args.levels:
        runs = {m: [] for m in MODES}
        for k in range(args.rounds):  # modes interleaved, order rotated: machine noise hits all alike
            for mode in MODES[k % 3:] + MODES[: k % 3]:
                runs[mode].append(await run_level(engines[mode], tokenizer, mode, c, max(c, args.requests), params, f"b{k}", prompts))
                # The three engines take turns on one runner, each owning the KV blocks while it runs
                # (scheduler/kv.py): cached prefixes must not outlive a turn, another engine reuses the blocks.
                engines[mode].clear_prefix_cache()
        auto_vs_best = round_ratios(runs)
        for mode in MODES:
            result = summarize(runs[mode])
            if mode is Mode.AUTO:
                result["ratios"] = auto_vs_best
            rows.append((c, mode, result))
            print(f"c={c:3d} {mode.value:9s} {result['tok_s']:8.1f} tok/s {result['tok_cpu_s']:8.1f} tok/cpu-s  ttft {result['ttft_ms']:7.1f} ms  "
                  f"itl {result['itl_ms']:6.1f} ms  e2e {result['e2e_ms']:8.1f} ms  tpf {result['tpf']:.2f}  "
                  f"refusion {result['refusion_share']:.0%}", flush=True)
    args.curve = engines[Mode.AUTO].router.curve.points
    for engine in engines.values():
        await engine.stop()
    return rows


def table(rows, args, machine: str, model: str) -> str:
    lines = [
        f"Machine: {machine}. Model: {model}. Prompts: {args.prompts}. gen_length {args.gen_length or 'model default'}, token budget "
        f"{args.token_budget}, {args.rounds} interleaved rounds of max(c, {args.requests}) requests per level, closed-loop clients; "
        f"overlap_streaming {args.overlap_streaming}.",
        "Calibrated forward latency (packed tokens: ms): "
        + ", ".join(f"{n}: {s * 1e3:.1f}" for n, s in args.curve) + ".",
        "",
        "| c | mode | tok/s | tok/CPU-s | TTFT p50 ms | ITL p50 ms | e2e p50 ms | TPF | served by ReFusion | auto / best, median of rounds (wall, CPU) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_level = {}
    for c, mode, r in rows:
        by_level.setdefault(c, {})[mode] = r
    held = {"wall": [], "CPU": []}
    for c, results in by_level.items():
        ratios = results[Mode.AUTO]["ratios"]
        for kind in held:
            held[kind].append((c, ratios[kind] >= 0.95))
        for mode in MODES:
            r = results[mode]
            extra = f"{ratios['wall']:.2f}, {ratios['CPU']:.2f}" if mode is Mode.AUTO else ""
            lines.append(f"| {c} | {mode.value} | {r['tok_s']:.1f} | {r['tok_cpu_s']:.1f} | {r['ttft_ms']:.1f} | "
                         f"{r['itl_ms']:.1f} | {r['e2e_ms']:.1f} | {r['tpf']:.2f} | {r['refusion_share']:.0%} | {extra} |")
    lines.append("")
    for kind, checks in held.items():
        failed = [c for c, ok in checks if not ok]
        verdict = "holds" if not failed else f"does NOT hold at c = {failed}"
        lines.append(f"Bar on {kind} throughput (auto >= 0.95 x the better mode at every level): {verdict}.")
    return "\n".join(lines)


def check_kv_room(parser: argparse.ArgumentParser, args, tokenizer, defaults: dict, num_blocks: int,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Usage error naming --num-blocks when the engine's KV cache could not hold one request of the run:
    the longest of its prompts + gen_length (--gen-length, else the model's) + one ReFusion block of
    tentative tokens, by the engine's own admission rule (scheduler.kv.KVOwner.blocks_needed and
    capacity, on a pool of `num_blocks` less EngineConfig's reserve). The engine refused each request
    with "shorten the prompt", which the script reported as a fault of --gen-length."""
    from types import SimpleNamespace

    from scheduler.kv import KVOwner

    def owner(blocks: int) -> KVOwner:
        runner = SimpleNamespace(info=SimpleNamespace(num_kv_blocks=blocks, block_size=block_size))
        return KVOwner({"main": runner}, prefix_cache=False, reserve_fraction=EngineConfig().kv_reserve_fraction)

    gen_length = args.gen_length or defaults["gen_length"]
    params = SimpleNamespace(gen_length=gen_length, slot_size=defaults["slot_size"],
                             serial_num_blocks=defaults["serial_num_blocks"])
    prompt = max(len(tokenizer.encode(p)) for p in (LONG_PROMPTS if args.prompts == "long" else PROMPTS))
    need = owner(num_blocks).blocks_needed(prompt, 0, params)
    if owner(num_blocks).capacity() >= need:
        return
    least = next(n for n in range(need, 2 * need + 100) if owner(n).capacity() >= need)
    parser.error(f"--num-blocks {num_blocks}: the engine's KV cache ({num_blocks} blocks of {block_size} tokens) "
                 f"cannot hold one request: the longest prompt ({prompt} tokens) + gen_length {gen_length} + one "
                 f"ReFusion block of tentative tokens need {need} blocks; use --num-blocks {least} or more")


def load_runner(args):
    from workers.runner import ModelRunner

    if not args.random_model:
        return ModelRunner(args.model, num_blocks=args.num_blocks), str(args.model)
    sys.path.insert(0, str(ROOT / "tests"))
    from model_factory import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:  # weights are in memory once loaded
        return ModelRunner(make_tiny_model(Path(tmp)), num_blocks=args.num_blocks), "random tiny Qwen3 (tests/model_factory)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=ROOT / "models" / "refusion-tiny-code")
    parser.add_argument("--random-model", action="store_true", help="use a random tiny model (development)")
    parser.add_argument("--levels", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--requests", type=positive_int, default=6,
                        help="requests per level and round (at least the concurrency)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved repetitions of every level")
    parser.add_argument("--gen-length", type=count, default=0,
                        help="tokens per request, a multiple of the model's slot_size x serial_num_blocks; 0 (the "
                             "default) = the model's own gen_length")
    parser.add_argument("--prompts", choices=("short", "long"), default="short",
                        help="short: code openings the shipped model ends soon (the default); long: openings it writes "
                             "to gen_length in both modes (use with --gen-length 128)")
    parser.add_argument("--token-budget", type=positive_int, default=512)
    parser.add_argument("--num-blocks", type=positive_int, default=2048,
                        help=f"KV blocks of {DEFAULT_BLOCK_SIZE} tokens; at least one request's (prompt + gen_length + a ReFusion block)")
    parser.add_argument("--overlap-streaming", choices=tuple(OVERLAP), default="auto", help=OVERLAP_HELP)
    parser.add_argument("--async-scheduling", choices=tuple(OVERLAP), default="auto", help=ASYNC_HELP)
    parser.add_argument("--append", type=writable_file, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    if args.gen_length and not args.random_model:  # (the random model's shape is known once it is built)
        check_gen_length(parser, "--gen-length", args.gen_length, args.model)
    if not args.random_model:
        from decoding.params import load_model_defaults
        from workers.loader import load_tokenizer

        check_kv_room(parser, args, load_tokenizer(args.model), load_model_defaults(args.model), args.num_blocks)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    import torch

    runner, model = load_runner(args)
    if args.random_model:
        from scheduler.decoders import ModelDecoderFactory

        check_kv_room(parser, args, runner.tokenizer, ModelDecoderFactory(runner).defaults, runner.info.num_kv_blocks,
                      runner.info.block_size)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
               f"torch {torch.__version__}, device {runner.info.device}")
    start = time.perf_counter()
    try:
        rows = asyncio.run(run(args, runner))
    except InvalidRequestError as exc:  # the engine's check of the decode shape
        parser.error(f"--gen-length {args.gen_length}: {exc}")
    text = table(rows, args, machine, model)
    print(text)
    print(f"bench wall time: {time.perf_counter() - start:.0f} s")
    append_section(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
