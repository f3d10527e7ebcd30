"""What returning log probabilities costs (docs/api.md "Log probabilities", workers/reads.py).

Three measurements, one table:
  reads     workers.reads.compute_reads on random logits [R, V] (greedy rows), without and with the
            log-probability stage (log_softmax, the chosen token's value and the top 20 by topk), and
            with it and ranks (prompt scoring: one more comparison pass over the vocabulary), at
            vocabularies of the shipped model and of Qwen3 (151,936) and R = 8 / 64 read rows: median ms
  engine    the engine on a model directory (default: the shipped model), N concurrent greedy requests
            per mode (AR, ReFusion), once without and once with logprobs (5 alternatives): median step
            time (start of one forward to the start of the next) and tokens per second
  format    the ingress's work per token (integrations/openai_logprobs.py): the OpenAI objects of 5
            alternatives per token, completions and chat shapes, microseconds per token
  scoring   prompt scoring (`echo` + `logprobs`, docs/api.md "Prompt log probabilities"): N distinct
            random prompts of L tokens scored with max_tokens 0 (prompt_logprobs 1: a PROB read on every
            prompt row), against the same prompts prefilled plainly for one AR token: prompt tokens per
            second (no prefix-cache hits: the prompts share no block)

    python -m bench.logprobs [--model DIR] [--device cpu] [--requests 8] [--tokens 64] [--repeats 20]
                             [--score-prompt-tokens 512] [--parts reads,engine,format,scoring]
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
PROMPTS = ["def load(path):\n", "class Stack:\n    def __init__(self):\n", "import os\n\n\ndef main():\n",
           "for i in range(10):\n"]


def bench_reads(device: str, vocabs: list[int], rows: list[int], repeats: int) -> list[dict]:
    import torch

    from workers.reads import ReadParams, compute_reads

    out = []
    for vocab in vocabs:
        for r in rows:
            logits = torch.randn(r, vocab, device=device)
            zeros = torch.zeros(r, dtype=torch.long, device=device)
            params = ReadParams(given=zeros - 1, temperature=zeros.double(), top_k=zeros, top_p=zeros.double() + 1,
                                min_p=zeros.double(),
                                gumbel=zeros, sample=zeros, seed=zeros, step=zeros, position=zeros)
            row = {"vocab": vocab, "rows": r}
            for name, flag, ranks in (("plain_ms", False, False), ("logprobs_ms", True, False),
                                      ("ranks_ms", True, True)):
                times = []
                for _ in range(repeats + 2):
                    start = time.perf_counter()
                    compute_reads(logits, params, False, False, flag, ranks=ranks).cpu()
                    times.append(time.perf_counter() - start)
                row[name] = round(1000 * statistics.median(times[2:]), 3)
            out.append(row)
    return out


async def bench_engine(model_dir: Path, requests: int, tokens: int) -> list[dict]:
    from bench.step_clock import clock_steps
    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest, Mode

    engine, tokenizer = build_engine(model_dir)
    await engine.start()
    starts = clock_steps(engine)
    rows = []
    try:
        for measured in (False, True):  # a warm-up round of every case first
            for mode in (Mode.AR, Mode.REFUSION):
                for logprobs in (None, 5):
                    starts.clear()
                    params = {"gen_length": tokens, "temperature": 0.0} | ({"logprobs": logprobs} if logprobs is not None else {})
                    specs = [GenerationRequest(f"{mode.value}-{logprobs}-{i}-{measured}",
                                               tokenizer.encode(PROMPTS[i % len(PROMPTS)]), dict(params), mode=mode)
                             for i in range(requests)]
                    begin = time.perf_counter()
                    counts = await asyncio.gather(*(_count(engine, s) for s in specs))
                    wall = time.perf_counter() - begin
                    gaps = [b - a for a, b in zip(starts, starts[1:])]
                    if measured:
                        rows.append({"mode": mode.value, "logprobs": logprobs if logprobs is not None else "-",
                                     "requests": requests, "tokens": sum(counts),
                                     "step_ms_p50": round(1000 * statistics.median(gaps), 2) if gaps else 0.0,
                                     "tok_per_s": round(sum(counts) / wall, 1)})
    finally:
        await engine.stop(drain_timeout_s=1)
    return rows


async def _count(engine, spec) -> int:
    n = 0
    async for delta in engine.submit(spec):
        n += len(delta.token_ids)
        assert (delta.logprobs is not None) == ("logprobs" in spec.params)
    return n


def bench_format(model_dir: Path, tokens: int = 2000) -> dict:
    import random

    from transformers import AutoTokenizer

    from integrations.openai_logprobs import LogprobFormatter
    from workers.batch import TokenLogprob

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    vocab = len(tokenizer)
    entries = [TokenLogprob(rng.randrange(vocab), -rng.random(), tuple((rng.randrange(vocab), -rng.random())
                                                                        for _ in range(5))) for _ in range(tokens)]
    out = {}
    for shape in ("completion", "chat"):
        formatter = LogprobFormatter(tokenizer, 5)  # a fresh one per response: its token cache starts empty
        start = time.perf_counter()
        for k in range(0, tokens, 8):  # streamed: 8 tokens per chunk
            getattr(formatter, shape)(entries[k:k + 8])
        out[f"{shape}_us_per_token"] = round(1e6 * (time.perf_counter() - start) / tokens, 1)
    return out


async def bench_scoring(model_dir: Path, requests: int, prompt_tokens: int) -> list[dict]:
    import random

    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest, Mode

    engine, tokenizer = build_engine(model_dir)
    await engine.start()
    special = set(tokenizer.all_special_ids)
    ordinary = [t for t in range(len(tokenizer)) if t not in special]
    rng = random.Random(0)
    rows = []

    async def one(spec) -> tuple[int, int]:
        scored = generated = 0
        async for delta in engine.submit(spec):
            scored += len(delta.prompt_logprobs or ())
            generated += len(delta.token_ids)
        return scored, generated

    try:
        for measured in (False, True):  # a warm-up round first
            for case, params, cap in (("prefill + 1 AR token", {"gen_length": 8, "serial_num_blocks": 1}, 1),
                                      ("scored, max_tokens 0", {"gen_length": 8, "serial_num_blocks": 1,
                                                                "prompt_logprobs": 1}, 0)):
                prompts = [[rng.choice(ordinary) for _ in range(prompt_tokens)] for _ in range(requests)]
                specs = [GenerationRequest(f"{case}-{i}-{measured}", p, dict(params), mode=Mode.AR, max_tokens=cap)
                         for i, p in enumerate(prompts)]
                begin = time.perf_counter()
                counts = await asyncio.gather(*(one(s) for s in specs))
                wall = time.perf_counter() - begin
                assert all(scored == (prompt_tokens - 1 if cap == 0 else 0) for scored, _ in counts), counts
                if measured:
                    rows.append({"case": case, "requests": requests, "prompt_tokens": prompt_tokens,
                                 "wall_s": round(wall, 3), "tok_per_s": round(requests * prompt_tokens / wall, 1)})
    finally:
        await engine.stop(drain_timeout_s=1)
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.bench_args import check_gen_length, model_dir, positive_int, positive_ints, torch_device
    from decoding.params import DecodeParamError
    from scheduler.api import InvalidRequestError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(DEFAULT_MODEL))
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--requests", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=64,
                        help="tokens per request: a multiple of the model's slot_size x serial_num_blocks")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--vocabs", type=positive_ints, default=[8192, 151936],
                        help="vocabulary sizes of the reads part's logits, comma-separated")
    parser.add_argument("--rows", type=positive_ints, default=[8, 64], help="read rows of the reads part, comma-separated")
    parser.add_argument("--score-prompt-tokens", type=positive_int, default=512)
    parser.add_argument("--parts", default="reads,engine,format,scoring", help="the tables to measure")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    parts = set(args.parts.split(","))
    unknown = parts - {"reads", "engine", "format", "scoring"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose among reads, engine, format, scoring")
    if "engine" in parts:
        check_gen_length(parser, "--tokens", args.tokens, model_dir)
    print(f"machine: {platform.processor() or platform.machine()}, device {args.device}, model {model_dir.name}")
    if "reads" in parts:
        reads = bench_reads(args.device, args.vocabs, args.rows, args.repeats)
        print("| reads: vocab | rows | plain ms | with logprobs ms | with logprobs and ranks ms |\n|---|---|---|---|---|")
        for r in reads:
            print(f"| {r['vocab']} | {r['rows']} | {r['plain_ms']} | {r['logprobs_ms']} | {r['ranks_ms']} |")
    if "engine" in parts:
        try:
            engine = asyncio.run(bench_engine(model_dir, args.requests, args.tokens))
        except (DecodeParamError, InvalidRequestError) as exc:  # what the engine refuses past the shape (KV room)
            parser.error(f"--tokens {args.tokens}: {exc}")
        print("\n| engine: mode | logprobs | requests | tokens | step ms p50 | tok/s |\n|---|---|---|---|---|---|")
        for r in engine:
            print(f"| {r['mode']} | {r['logprobs']} | {r['requests']} | {r['tokens']} | {r['step_ms_p50']} "
                  f"| {r['tok_per_s']} |")
    if "format" in parts:
        fmt = bench_format(model_dir)
        print(f"\nformat (ingress): completions {fmt['completion_us_per_token']} us/token, chat "
              f"{fmt['chat_us_per_token']} us/token (5 alternatives, a fresh token cache)")
    if "scoring" in parts:
        scoring = asyncio.run(bench_scoring(model_dir, args.requests, args.score_prompt_tokens))
        print("\n| scoring: case | requests | prompt tokens each | wall s | prompt tok/s |\n|---|---|---|---|---|")
        for r in scoring:
            print(f"| {r['case']} | {r['requests']} | {r['prompt_tokens']} | {r['wall_s']} | {r['tok_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from bench.bench_args import engine_log_to_stderr

    engine_log_to_stderr()
    sys.exit(main())
