"""Requests sharing a prompt that is being prefilled: wait for it (EngineConfig.prefix_wait_blocks, the
default 2) or compute it again in parallel (0)? What OpenAI `n`, an editor's gap candidates and agent
retries send: copies of one long prompt at once.

For each copies count, the engine on a model directory (default: the shipped model) runs that many
greedy AR requests with one prompt of about --prompt-tokens tokens, submitted together, once per
setting (alternating, --rounds times, each on a fresh engine so nothing is cached before): prompt tokens
the forwards computed, time to the first token of the first and of the last request, and the time
until all are done (medians over rounds).

    python -m bench.prefix_wait [--model DIR] [--copies 2,4] [--prompt-tokens 1024] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "refusion-tiny-code"


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    """About `tokens` ids of Python source from this repository (deterministic)."""
    text = "".join(p.read_text() for p in sorted((REPO / "scheduler").glob("*.py")))
    return tokenizer.encode(text)[:tokens]


async def one_round(model_dir: Path, copies: int, prompt_tokens: int, tokens: int, wait_blocks: int) -> dict:
    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest, Mode

    engine, tokenizer = build_engine(model_dir, engine_options={"prefix_wait_blocks": wait_blocks})
    await engine.start()
    prompt = prompt_ids(tokenizer, prompt_tokens)
    fed = []
    execute = engine.runner.execute

    def counting(segments, tables):
        fed.append(sum(min(s.num_kept, min(s.reads.rows(), default=len(s.token_ids))) for s in segments))
        return execute(segments, tables)

    engine.runner.execute = counting
    begin = time.perf_counter()

    async def run(i: int) -> tuple[float, float]:
        first = None
        spec = GenerationRequest(f"c{i}", prompt, {"gen_length": tokens, "temperature": 0.0, "serial_num_blocks": 1},
                                 mode=Mode.AR)
        async for delta in engine.submit(spec):
            if first is None and delta.token_ids:
                first = time.perf_counter() - begin
        return first or 0.0, time.perf_counter() - begin

    try:
        times = await asyncio.gather(*(run(i) for i in range(copies)))
    finally:
        engine.runner.execute = execute
        await engine.stop(drain_timeout_s=1)
    ttfts = sorted(t for t, _ in times)
    return {"prompt_tokens_computed": sum(fed), "ttft_first_s": ttfts[0], "ttft_last_s": ttfts[-1],
            "all_done_s": max(e for _, e in times)}


def main(argv: list[str] | None = None) -> int:
    from bench.bench_args import check_context, model_dir, positive_int, positive_ints
    from decoding.params import load_model_defaults

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(DEFAULT_MODEL))
    parser.add_argument("--copies", type=positive_ints, default=[2, 4], help="requests sharing the prompt, per row")
    parser.add_argument("--prompt-tokens", type=positive_int, default=1024,
                        help="the shared prompt's tokens; with --tokens within the model's context")
    parser.add_argument("--tokens", type=positive_int, default=32, help="tokens each request generates")
    parser.add_argument("--rounds", type=positive_int, default=3, help="runs of each setting (medians)")
    args = parser.parse_args(argv)
    slot = load_model_defaults(args.model)["slot_size"]  # (gen_length is decoded in whole slots)
    check_context(parser, args.model, args.prompt_tokens + -(-args.tokens // slot) * slot,
                  f"--prompt-tokens {args.prompt_tokens} + --tokens {args.tokens}")
    model_dir = Path(args.model)
    print(f"machine: {platform.machine()}, model {model_dir.name}, prompt ~{args.prompt_tokens} tokens, "
          f"{args.tokens} generated each, median of {args.rounds}")
    print("| copies | prefix_wait_blocks | prompt tokens computed | TTFT first s | TTFT last s | all done s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for copies in args.copies:
        runs: dict[int, list[dict]] = {0: [], 2: []}
        for _ in range(args.rounds):
            for wait in (0, 2):  # alternating: drift of the machine hits both alike
                runs[wait].append(asyncio.run(one_round(model_dir, copies, args.prompt_tokens, args.tokens, wait)))
        for wait, rows in runs.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"| {copies} | {wait} | {med['prompt_tokens_computed']:.0f} | {med['ttft_first_s']:.3f} | "
                  f"{med['ttft_last_s']:.3f} | {med['all_done_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from bench.bench_args import engine_log_to_stderr

    engine_log_to_stderr()
    sys.exit(main())
