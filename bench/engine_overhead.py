"""Host time per engine step: the whole engine (scheduler, decoders, KV ownership, detokenizing,
streaming) on a model whose forward costs nothing, at 1/8/32/64 concurrent requests, AR and ReFusion.

On a GPU an engine step costs its device time plus whatever the host does between forwards that it
cannot do during them. Serially, planning a step needs the last step's tokens (schedule -> execute ->
absorb, scheduler/engine.py) and only the streaming of a step's text runs during the next forward
(EngineConfig.overlap_streaming); under asynchronous scheduling (EngineConfig.async_scheduling; AR
only) the next step is planned and launched before the last one's results are back, so the host's
whole step overlaps the device. Both are on by default for CUDA runners. This measures the host part
on any machine: `ModelRunner` runs bench/step_overhead.py's zero-cost stand-in (no layer; the LM head
an outer product), made to predict one token with a chosen confidence so requests run to
`--gen-length` and ReFusion takes the path a real model would:

    confident    the token's probability ~1: ReFusion's drafts verify, slots are accepted in parallel
    uncertain    a small margin (argmax stable, probability ~1/V): ReFusion's single-slot fallback

Reported per level: ms per engine step (wall / forwards), of which inside the runner's launch and
collect (packing, validation, copies, the step's reads, unpacking, and the simulated device wait:
bench/step_overhead.py's column) and outside them (scheduler, decoders, KV bookkeeping, detokenizer,
asyncio, streaming); tokens per forward; the host ceiling: tokens per second if the device took
no time at all; and the share of steps launched ahead (asynchronous scheduling; the rest drained the
pipeline: an arrival, an end, a request that cannot plan ahead). Issue "CUDA fast path": AR at 32 requests >= 4,000 tok/s needs a whole step under
8 ms, device time included.

    OMP_NUM_THREADS=1 python bench/engine_overhead.py
    ... --profile 32          # also cProfile one AR level of 32 requests: the top functions by own time
    ... --profile 32 --profile-mode refusion   # the same for ReFusion
    ... --device-ms 8 --modes ar --overlap-streaming on --async-scheduling on
            # as if each forward took 8 ms on a device with a queue (TimedRunner: collect sleeps, GIL
            # released, until the simulated device is done): what the overlaps hide; the A/B is the
            # same with "off" (the defaults, auto, are off for this CPU stand-in)
    ... --device-ms 8 --modes auto,ar --confidence uncertain --async-scheduling on --stagger-ms 8.8
            # AUTO requests (the API's default mode) arriving a step apart, against pinned AR: what
            # drains the pipeline besides arrivals and ends (the last column: steps launched ahead)
    ... --device-ms 8 --modes ar --async-scheduling on --params '{"frequency_penalty": 0.5, "ignore_eos": true}'
            # every request with a penalty (or any other decoding parameter)
    ... --device-ms 8 --modes ar --async-scheduling on --regex '[a-z ]+' --grammar-every 4
            # every 4th request with structured output (a grammar's bitmask per step)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import structlog  # noqa: E402
import torch  # noqa: E402

from concurrency import ASYNC_HELP, OVERLAP, OVERLAP_HELP, run_level, summarize  # noqa: E402

from bench.bench_args import append_section, positive_int, positive_ints, regex, torch_device, writable_file  # noqa: E402
from scheduler.api import Mode  # noqa: E402
from scheduler.config import EngineConfig, RoutingConfig  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from step_overhead import stand_in_runner  # noqa: E402
from workers.kv_blocks import DEFAULT_BLOCK_SIZE  # noqa: E402
from workers.loader import load_tokenizer  # noqa: E402

SHIPPED = ROOT / "models" / "refusion-tiny-code"
CONFIDENCE = {"confident": 40.0, "uncertain": 0.5}  # logit of the predicted token; every other logit is 0


def runner_predicting(token: int, logit: float, vocab: int, num_blocks: int, device: str):
    """The zero-cost runner whose every row's logits are `logit` at `token` and 0 elsewhere."""
    runner = stand_in_runner(device, vocab, num_blocks)
    with torch.no_grad():
        runner.model.embed.weight.fill_(1.0)  # hidden rows: ones, so logits = weight column
        runner.model.lm_head.weight.zero_()
        runner.model.lm_head.weight[token, 0] = logit
    return runner


class TimedRunner:
    """Wraps a runner's launch and collect (the engine calls them in a thread; execute is the two) to add
    up the time spent inside them. `device_s`: a simulated device of that many seconds per forward with
    a queue, as a GPU's stream: a launched step is done `device_s` after it was launched or after the
    step launched before it is done, whichever is later, and collect sleeps (GIL released) until then
    (0: none). So a step launched ahead (EngineConfig.async_scheduling) overlaps the host's work as it
    would on a GPU."""

    def __init__(self, runner, device_s: float = 0.0):
        self.runner, self.seconds, self.calls = runner, 0.0, 0
        inner_launch, inner_collect = runner.launch, runner.collect
        inner_finish = getattr(runner, "finish_reads", None)
        done_at = [0.0]  # when the simulated device is done with every step launched so far

        def launch(segments, block_tables):
            start = time.perf_counter()
            try:
                launched = inner_launch(segments, block_tables)
                done_at[0] = max(time.perf_counter(), done_at[0]) + device_s
                launched.simulated_done_s = done_at[0]
                return launched
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        def finish_reads(launched, bitmasks):  # (the step's reads are queued behind its forward)
            start = time.perf_counter()
            try:
                inner_finish(launched, bitmasks)
                launched.simulated_done_s = max(launched.simulated_done_s, time.perf_counter())
            finally:
                self.seconds += time.perf_counter() - start

        def collect(launched):
            start = time.perf_counter()
            try:
                wait = launched.simulated_done_s - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                return inner_collect(launched)
            finally:
                self.seconds += time.perf_counter() - start

        runner.launch, runner.collect = launch, collect
        if inner_finish is not None:
            runner.finish_reads = finish_reads


async def measure(args, mode: Mode, confidence: str, tokenizer, profile_level: int | None) -> list[dict]:
    token = tokenizer.encode(" x")[0]
    runner = runner_predicting(token, CONFIDENCE[confidence], len(tokenizer), args.num_blocks, args.device)
    timed = TimedRunner(runner, args.device_ms / 1e3)
    config = EngineConfig(max_running=max(64, max(args.levels)), token_budget=args.token_budget,
                          overlap_streaming=OVERLAP[args.overlap_streaming],
                          async_scheduling=OVERLAP[args.async_scheduling], routing=RoutingConfig(calibrate=False))
    engine = Engine(runner, tokenizer, config)
    params = request_params(args)
    grammar = None
    if args.regex is not None:
        from llguidance import LLMatcher

        from decoding.grammar import GrammarSpec

        grammar = GrammarSpec(LLMatcher.grammar_from_regex(args.regex))
    await engine.start()
    rows = []
    try:
        for c in args.levels:
            total = max(2 * c, 4)
            await run_level(engine, tokenizer, mode, c, c, params, f"warm{c}", grammar=grammar,
                            grammar_every=args.grammar_every)  # untimed: allocator, caches
            engine.clear_prefix_cache()
            forwards, inside, ahead = engine.forwards, timed.seconds, engine.ahead_steps
            profiler = cProfile.Profile() if profile_level == c and mode.value == args.profile_mode else None
            if profiler:
                profiler.enable()
            run = await run_level(engine, tokenizer, mode, c, total, params, f"c{c}", stagger_s=args.stagger_ms / 1e3,
                                  grammar=grammar, grammar_every=args.grammar_every)
            if profiler:
                profiler.disable()
            steps, inside, ahead = engine.forwards - forwards, timed.seconds - inside, engine.ahead_steps - ahead
            summary = summarize([run])
            tokens = sum(r["tokens"] for r in run["records"])
            rows.append({"mode": mode.value, "confidence": confidence, "requests": c, "steps": steps,
                         "tokens": tokens, "ms_per_step": run["wall"] / steps * 1e3,
                         "runner_ms": inside / steps * 1e3, "outside_ms": (run["wall"] - inside) / steps * 1e3,
                         "tpf": summary["tpf"], "ceiling_tok_s": tokens / run["wall"], "ahead": ahead / steps,
                         "profile": _top(profiler, args.profile_rows) if profiler else None})
            print(f"[engine_overhead] {mode.value} {confidence} c={c}: {rows[-1]['ms_per_step']:.2f} ms/step",
                  flush=True)
    finally:
        await engine.stop(drain_timeout_s=0)
    return rows


def request_params(args) -> dict:
    """Every request's decoding parameters: --gen-length in 4 blocks of 8-token slots, then --params."""
    return {"gen_length": args.gen_length, "slot_size": 8, "serial_num_blocks": 4, **args.params}


def check_params(parser: argparse.ArgumentParser, args) -> None:
    """Usage error naming --params unless it is a JSON object the engine's own parsing takes
    (scheduler.validation.parse_params through the stand-in runner's decoder factory, as each request's
    params are parsed): a bad one was a traceback from the first request, after the tokenizer loaded."""
    from scheduler.api import InvalidRequestError
    from scheduler.decoders import ModelDecoderFactory
    from scheduler.validation import parse_params

    if not isinstance(args.params, dict):
        parser.error(f"--params {json.dumps(args.params)}: give a JSON object of decoding parameters, "
                     'e.g. \'{"frequency_penalty": 0.5}\'')
    try:
        parse_params(ModelDecoderFactory(stand_in_runner("cpu", 64, 64)), request_params(args))
    except InvalidRequestError as exc:
        parser.error(f"--params {json.dumps(args.params)}: {exc}")


def _top(profiler: cProfile.Profile, n: int) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(n)
    return out.getvalue()


def table(rows: list[dict], args) -> str:
    lines = [f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch "
             f"{torch.__version__}, device {args.device}. Zero-cost stand-in model (vocab of the shipped tokenizer), "
             f"gen_length {args.gen_length}, slot size 8, token budget {args.token_budget}; requests = closed-loop "
             f"clients, 2 x requests (at least 4) finished per level after an untimed round; overlap_streaming "
             f"{args.overlap_streaming}, async_scheduling {args.async_scheduling}; a simulated device of "
             f"{args.device_ms:g} ms per forward (a queue; collect waits for it)"
             + (f"; clients start {args.stagger_ms:g} ms apart" if args.stagger_ms else "")
             + (f"; every request with {json.dumps(args.params)}" if args.params else "")
             + (f"; {'every' if args.grammar_every == 1 else f'every {args.grammar_every}th'} request constrained to "
                f"the regex {args.regex!r}" if args.regex is not None else "") + ".", "",
             "| mode | stand-in model | requests | steps | ms / step | in the runner ms | outside ms | "
             "tokens / forward | host ceiling tok/s | steps launched ahead |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        requests = f"{r['requests']} (profiled)" if r["profile"] else r["requests"]
        lines.append(f"| {r['mode']} | {r['confidence']} | {requests} | {r['steps']} | {r['ms_per_step']:.2f} | "
                     f"{r['runner_ms']:.2f} | {r['outside_ms']:.2f} | {r['tpf']:.2f} | {r['ceiling_tok_s']:,.0f} | "
                     f"{r['ahead']:.0%} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Host time per engine step on a zero-cost model (module docstring).")
    parser.add_argument("--device", default="cpu", type=torch_device, help="cpu, or cuda where this machine has it")
    parser.add_argument("--levels", type=positive_ints, default=[1, 8, 32, 64],
                        help="concurrent requests per level, comma-separated (default 1,8,32,64)")
    parser.add_argument("--gen-length", type=int, default=128, help="tokens per request, a multiple of 32 (slot size 8, "
                                                                     "4 blocks)")
    parser.add_argument("--token-budget", type=positive_int, default=2048, help="engine query tokens per forward")
    parser.add_argument("--num-blocks", type=int, default=2048, help=f"KV blocks of {DEFAULT_BLOCK_SIZE} tokens")
    parser.add_argument("--modes", default="ar,refusion",
                        help="ar, refusion and/or auto (the router decides; with the uncertain stand-in it picks AR), "
                             "comma-separated")
    parser.add_argument("--confidence", default="confident,uncertain",
                        help="stand-in model(s), comma-separated: confident, uncertain; ReFusion runs each, AR the first")
    parser.add_argument("--profile", type=int, help="cProfile the level with this many requests of --profile-mode (that row is "
                                                    "marked: the profiler slows it; the runner runs in a worker "
                                                    "thread the profile does not see)")
    parser.add_argument("--profile-mode", default="ar", choices=["ar", "refusion"], help="the mode --profile profiles")
    parser.add_argument("--profile-rows", type=int, default=25, help="functions listed in the profile")
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="each forward also waits this long with the GIL released, as on a GPU (default 0)")
    parser.add_argument("--overlap-streaming", choices=tuple(OVERLAP), default="auto", help=OVERLAP_HELP)
    parser.add_argument("--async-scheduling", choices=tuple(OVERLAP), default="auto", help=ASYNC_HELP)
    parser.add_argument("--stagger-ms", type=float, default=0.0,
                        help="client k of a level starts k x this many ms after the first (default 0: all at once, "
                             "so their block boundaries fall on the same steps; about --device-ms spreads them)")
    parser.add_argument("--params", type=json.loads, default={},
                        help='extra decoding parameters of every request, as JSON (e.g. \'{"frequency_penalty": 0.5}\')')
    parser.add_argument("--regex", type=regex, help="structured output: requests constrained to this regular expression "
                                         "(llguidance; AR only), every --grammar-every-th request")
    parser.add_argument("--grammar-every", type=int, default=1, help="with --regex: every k-th request (default 1: all)")
    parser.add_argument("--append", type=writable_file, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    if args.grammar_every < 1:
        parser.error(f"--grammar-every {args.grammar_every}: use an integer >= 1")
    if not 0 <= args.device_ms < 1e4:
        parser.error(f"--device-ms {args.device_ms}: use a number of milliseconds in [0, 10000)")
    if args.gen_length < 32 or args.gen_length % 32:
        parser.error(f"--gen-length {args.gen_length}: use a multiple of 32 (4 blocks of whole 8-token slots)")
    if bad := [m for m in args.modes.split(",") if m not in ("ar", "refusion", "auto")]:
        parser.error(f"--modes: {bad[0]!r} is not ar, refusion or auto")
    if not 0 <= args.stagger_ms < 1e4:
        parser.error(f"--stagger-ms {args.stagger_ms}: use a number of milliseconds in [0, 10000)")
    if bad := [c for c in args.confidence.split(",") if c not in CONFIDENCE]:
        parser.error(f"--confidence: {bad[0]!r} is not one of {', '.join(CONFIDENCE)}")
    if args.num_blocks < 64:
        parser.error(f"--num-blocks {args.num_blocks}: use at least 64 (every level's requests hold KV at once)")
    check_params(parser, args)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Every (mode, stand-in model, level) row of the table."""
    tokenizer = load_tokenizer(SHIPPED)
    confidences = args.confidence.split(",")
    rows = []
    for mode in (Mode(m) for m in args.modes.split(",")):
        for confidence in confidences if mode is Mode.REFUSION else confidences[:1]:
            rows += asyncio.run(measure(args, mode, confidence, tokenizer, args.profile))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    for r in rows:
        if r["profile"]:
            print(f"\ncProfile, {r['mode']} {r['requests']} requests, by own time:\n{r['profile']}")
    append_section(args.append, text)
    return 0


if __name__ == "__main__":
    # the engine logs every request at info level; configured here, not in main(), because structlog's
    # configuration is process-wide (tests call main() in the test process)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sys.exit(main())
