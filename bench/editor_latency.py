"""Editor completion latency over the native protocol: time to the first partial and to a complete
one-line suggestion, with a warm prefix cache, measured at the client (WebSocket + msgpack included).

Cases are held-out lines of real Python (functions of the standard-library files `refusion train` held
out, training/corpus.py): the cursor sits after a line's indentation inside a function body, the line
itself is removed, the rest of the body is the suffix. Each case is
completed once to warm the prefix cache, then `--repeats` times measured. The suggestion is also
compared with the removed line (exact match), a rough quality signal for trained models.

    OMP_NUM_THREADS=1 python bench/editor_latency.py                       # shipped model, in-process server
    python bench/editor_latency.py --url ws://127.0.0.1:8000/v1/editor     # a running `refusion serve`
    ... --batch-load 4 [--no-aging]    # in-process: 4 BATCH requests kept running beside the editor
    ... --heavy 8 [--heavy-inflight 8]  # 8 other editor connections keep 8 multiline completions each in flight
    ... --append docs/benchmarks.md

With --batch-load N, N BATCH requests (AR, 256 sampled tokens each, resubmitted as each ends) share the
engine with the editor's INTERACTIVE ones; the table adds the batch tokens generated per second, the
progress scheduler aging (EngineConfig.aging_after) keeps for them; --no-aging sets it to 0 (strict
classes) for an A/B.

With --heavy N, N other editor connections (each its own client) keep --heavy-inflight multiline
completions in flight each (max_tokens 256; the default gap candidates, resubmitted as each ends): the
measured editor's one-line completions then compete with them for the engine's running slots
(scheduler fair share: EngineConfig.fair_share; --no-fair-share for an A/B).

In-process mode serves the editor router with uvicorn on a local port over a LocalEngineClient (no Ray):
it measures the protocol and engine, not Ray Serve's proxy hop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_args import append_section, at_most, count, positive_int, writable_file  # noqa: E402
from integrations.lsp.backend import EditorBackend  # noqa: E402
from integrations.editor.protocol import Limits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits()  # what the editor protocol takes per connection (a server announces them at initialize)


def held_out_cases(n: int, seed: int = 0, heldout_fraction: float = 0.03) -> list[dict]:
    """Cursor after the indentation of a random code line inside held-out functions; the line is removed.

    Units come from training.corpus (the split `refusion train` used), so a trained model never saw them.
    """
    from training.corpus import extract_units, is_heldout, source_files

    pool = []
    for root, path in source_files(["stdlib"]):
        rel = path.relative_to(root).as_posix()
        if not is_heldout(rel, heldout_fraction):
            continue
        for unit in extract_units(path.read_text(encoding="utf-8", errors="replace"), rel):
            lines = unit.response.splitlines(keepends=True)
            for j, line in enumerate(lines):
                body = line.strip()
                if line.startswith(" ") and len(body) >= 8 and not body.startswith(("#", '"', "'")):
                    pool.append((unit, lines, j))
    if len(pool) < n:
        raise SystemExit(f"--cases {n}: only {len(pool)} held-out lines found; ask for fewer")
    cases = []
    for unit, lines, j in random.Random(seed).sample(pool, n):
        indent = lines[j][: len(lines[j]) - len(lines[j].lstrip())]
        cases.append({"uri": f"file:///{unit.path}#{unit.name}:{j}", "prefix": unit.prompt + "".join(lines[:j]) + indent,
                      "suffix": "\n" + "".join(lines[j + 1:]), "expected": lines[j].strip()})
    return cases


def heldout_fraction_of(model_dir: Path) -> float:
    args_path = model_dir / "train_args.json"
    if args_path.exists():
        data = json.loads(args_path.read_text())
        return float(data.get("heldout_fraction", data.get("args", {}).get("heldout_fraction", 0.03)))
    return 0.03


async def measure(url: str, cases: list[dict], repeats: int, max_time_ms: int, mode: str,
                  api_key: str | None = None) -> dict:
    backend = EditorBackend(url, api_key)
    first, full, tpf, exact, reasons = [], [], [], 0, {}
    try:
        for case in cases:
            params = {"uri": case["uri"], "prefix": case["prefix"], "suffix": case["suffix"], "language": "python",
                      "multiline": False, "max_time_ms": max_time_ms, "mode": mode}
            await backend.complete(params)  # warm the prefix cache with this prompt
            for _ in range(repeats):
                seen: list[float] = []
                start = time.perf_counter()
                result = await backend.complete(
                    params, on_partial=lambda _t, seen=seen: seen.append(time.perf_counter()) if not seen else None)
                end = time.perf_counter()
                full.append((end - start) * 1000)
                first.append(((seen[0] if seen else end) - start) * 1000)
                if result.get("tokens_per_forward") is not None:
                    tpf.append(result["tokens_per_forward"])
                reasons[result["stop_reason"]] = reasons.get(result["stop_reason"], 0) + 1
            exact += result["text"].strip() == case["expected"]
    finally:
        await backend.close()
    return {"first": first, "full": full, "tpf": tpf, "exact": exact, "reasons": reasons, "server": backend.server_info}


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def batch_load(engine, n: int, done: asyncio.Event) -> int:
    """Keep n BATCH requests running on `engine` until `done`; the tokens they generated."""
    from scheduler.api import GenerationRequest, Mode, Priority

    tokens = 0

    async def one_stream(k: int) -> None:
        nonlocal tokens
        round_ = 0
        while not done.is_set():
            params = {"gen_length": 256, "temperature": 1.0, "seed": k * 1000 + round_, "ignore_eos": True}
            spec = GenerationRequest(f"batch-{k}-{round_}", [5 + k, 6, 7, 8], params, mode=Mode.AR, priority=Priority.BATCH)
            async for delta in engine.submit(spec):
                tokens += len(delta.token_ids)
                if done.is_set():
                    break
            round_ += 1

    await asyncio.gather(*(one_stream(k) for k in range(n)))
    return tokens


async def heavy_editors(url: str, n: int, inflight: int, done: asyncio.Event) -> None:
    """Keep `n` editor connections with `inflight` multiline completions in flight each until `done` (or
    until cancelled)."""

    async def one_connection(k: int) -> None:
        backend = EditorBackend(url)

        async def one_uri(j: int) -> None:
            round_ = 0
            while not done.is_set():
                params = {"uri": f"file:///heavy{k}/f{j}.py", "prefix": f"def heavy_{k}_{j}_{round_}(items):\n    ",
                          "suffix": "", "language": "python", "multiline": True, "max_tokens": 256,
                          "temperature": 1.0, "seed": round_}
                try:
                    await backend.complete(params)
                except Exception:  # noqa: BLE001 - an overloaded or cancelled one is resubmitted
                    await asyncio.sleep(0.05)
                round_ += 1

        try:
            await asyncio.gather(*(one_uri(j) for j in range(inflight)))
        finally:
            await backend.close()

    await asyncio.gather(*(one_connection(k) for k in range(n)))


async def with_local_server(model_dir: Path, run, batch: int = 0, engine_options: dict | None = None,
                            heavy: tuple[int, int] = (0, 0)):
    """Serve the editor router over an in-process engine on a free port; call run(url), with `batch`
    BATCH requests running beside it (batch_load) and heavy[0] editor connections with heavy[1]
    completions in flight each (heavy_editors); returns (run's result, batch tokens per second)."""
    import uvicorn
    from fastapi import FastAPI

    from integrations.editor.http import router
    from integrations.engine_client import LocalEngineClient
    from integrations.engine_host import build_engine

    engine, tokenizer = build_engine(model_dir, engine_options=engine_options)
    await engine.start()
    app = FastAPI()
    app.state.engine_client = LocalEngineClient(engine, tokenizer, model_dir.name)
    app.include_router(router)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    serve_task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    done = asyncio.Event()
    url = f"ws://127.0.0.1:{port}/v1/editor"
    load = asyncio.ensure_future(batch_load(engine, batch, done))
    editors = asyncio.ensure_future(heavy_editors(url, heavy[0], heavy[1], done))
    if heavy[0]:  # the other editors' completions fill the engine first (as far as they do within 60 s)
        deadline = time.monotonic() + 60
        while (len(engine.scheduler.running) < min(engine.config.max_running, heavy[0] * heavy[1])
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
    start = time.perf_counter()
    try:
        result = await run(url)
        done.set()
        return result, await load / (time.perf_counter() - start)
    finally:
        done.set()
        load.cancel()
        editors.cancel()
        await asyncio.gather(editors, return_exceptions=True)
        server.should_exit = True
        await serve_task
        await engine.stop(drain_timeout_s=2)


def report(stats: dict, args, where: str) -> str:
    n = len(stats["full"])
    import torch

    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
               f"torch {torch.__version__}; no GPU")
    tpf = f"{statistics.median(stats['tpf']):.2f}" if stats["tpf"] else "n/a (stopped early by a rule)"
    lines = [
        f"Machine: {machine}. Model: `{args.model}` ({where}), mode `{args.mode}`, single-line, {args.editors} editor(s), "
        f"{f'max_running {args.max_running}, ' if args.max_running else ''}"
        f"{args.cases} held-out stdlib function-body lines x {args.repeats} repeats (prefix cache warmed by one run per case), "
        f"max_time_ms {args.max_time_ms}.",
        "",
        "| measure | p50 ms | p95 ms | mean ms | n |",
        "|---|---:|---:|---:|---:|",
        f"| first partial | {pct(stats['first'], 50):.1f} | {pct(stats['first'], 95):.1f} | "
        f"{statistics.fmean(stats['first']):.1f} | {n} |",
        f"| complete one-line suggestion | {pct(stats['full'], 50):.1f} | {pct(stats['full'], 95):.1f} | "
        f"{statistics.fmean(stats['full']):.1f} | {n} |",
        "",
        f"Stop reasons: {dict(sorted(stats['reasons'].items()))}; median tokens/forward of finished requests: {tpf}; "
        f"exact match with the removed line: {stats['exact']}/{args.cases}.",
    ]
    if args.batch_load:
        lines.append(f"Beside it: {args.batch_load} BATCH requests (AR, 256 sampled tokens each, resubmitted), "
                     f"{stats['batch_tok_s']:.1f} batch tokens/s; scheduler aging "
                     f"{'off (--no-aging)' if args.no_aging else 'on'}.")
    if args.heavy:
        lines.append(f"Beside it: {args.heavy} other editor connections with {args.heavy_inflight} multiline completions "
                     f"(max_tokens 256, temperature 1) in flight each, resubmitted as each ends; scheduler fair share "
                     f"{'off (--no-fair-share)' if args.no_fair_share else 'on'}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "refusion-tiny-code"))
    parser.add_argument("--url", default=None, help="measure a running server instead of an in-process one")
    parser.add_argument("--api-key", default=os.environ.get("REFUSION_API_KEY"), help="for a server that needs one")
    parser.add_argument("--cases", type=positive_int, default=12)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--max-time-ms", type=at_most(LIMITS.max_time_ms), default=5000,
                        help=f"each completion's time limit (1 to {LIMITS.max_time_ms}, the editor protocol's)")
    parser.add_argument("--mode", choices=("auto", "refusion", "ar"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", type=writable_file, help="append the table to this markdown file")
    parser.add_argument("--editors", type=positive_int, default=1, help="editors completing at once (each runs every case)")
    parser.add_argument("--batch-load", type=count, default=0, help="in-process: BATCH requests kept running beside")
    parser.add_argument("--no-aging", action="store_true", help="in-process: scheduler aging off (A/B)")
    parser.add_argument("--max-running", type=positive_int, default=None,
                        help="in-process: the engine's max_running (default: the engine's own)")
    parser.add_argument("--heavy", type=count, default=0, help="in-process: other editor connections kept busy beside")
    parser.add_argument("--heavy-inflight", type=at_most(LIMITS.max_inflight), default=8,
                        help=f"completions in flight per --heavy connection (1 to {LIMITS.max_inflight}, the protocol's)")
    parser.add_argument("--no-fair-share", action="store_true", help="in-process: scheduler fair share off (A/B)")
    args = parser.parse_args(argv)
    if args.url and (args.batch_load or args.no_aging or args.max_running or args.heavy or args.no_fair_share):
        raise SystemExit("--batch-load, --no-aging, --max-running, --heavy and --no-fair-share need the in-process "
                         "server: drop --url")
    return args


def merge_editors(runs: list[dict]) -> dict:
    """The stats of several editors' runs (`measure`) as one: their latencies and tokens per forward
    pooled, stop reasons summed; exact matches and the server are the first editor's."""
    merged = {"first": [], "full": [], "tpf": [], "exact": runs[0]["exact"], "reasons": {}, "server": runs[0]["server"]}
    for one in runs:
        for key in ("first", "full", "tpf"):
            merged[key] += one[key]
        for reason, times in one["reasons"].items():
            merged["reasons"][reason] = merged["reasons"].get(reason, 0) + times
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = held_out_cases(args.cases, args.seed, heldout_fraction_of(Path(args.model)))

    async def run(url: str) -> dict:
        if args.editors == 1:
            return await measure(url, cases, args.repeats, args.max_time_ms, args.mode, args.api_key)
        runs = await asyncio.gather(*(measure(url, cases[k % len(cases):] + cases[:k % len(cases)], args.repeats,
                                              args.max_time_ms, args.mode, args.api_key) for k in range(args.editors)))
        return merge_editors(runs)

    if args.url:
        from websockets.exceptions import InvalidHandshake, InvalidURI

        try:
            stats, where = asyncio.run(run(args.url)), f"server at {args.url}"
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise SystemExit(f"--url {args.url}: no editor endpoint answered ({exc}); start the server, "
                             "give its ws://host:port/v1/editor, or drop --url for an in-process one") from None
    else:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").exists():
            raise SystemExit(f"--model {model_dir}: no config.json there; pass a model directory")
        options = {**({"max_running": args.max_running} if args.max_running else {}),
                   **({"aging_after": 0} if args.no_aging else {}),
                   **({"fair_share": False} if args.no_fair_share else {})}
        stats, batch_tok_s = asyncio.run(with_local_server(model_dir, run, args.batch_load, options,
                                                           (args.heavy, args.heavy_inflight)))
        stats["batch_tok_s"], where = batch_tok_s, "in-process engine + uvicorn"
    text = report(stats, args, where)
    print(text)
    append_section(args.append, text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from bench.bench_args import engine_log_to_stderr

    engine_log_to_stderr()
    sys.exit(main())
