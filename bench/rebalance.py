"""Queue rebalancing on and off: a burst that queues on one of two CPU engine replicas, in one run.

A burst of `--requests` streamed greedy AR completions (`--max-tokens` each) shares one prompt head, so
the prefix-affinity router prefers one engine replica for all of them. With `--threshold` 1000 (strict
affinity: the hot-key case, and the shape of a burst that arrived before the autoscaler's second
replica was up) every request goes to that replica, which runs `--max-running` at once and queues the
rest while the other replica idles; with the default 2 the router's load guard already spreads the
burst at arrival. For each (threshold, rebalance_after_s) pair the app is deployed afresh (2 engine
replicas x 1 torch thread on local Ray, num_cpus 2) and deleted afterwards. Measured at the client:
burst makespan (the median of `--repeats` bursts), per-request time to first token and end-to-end
latency; from /metrics: engine requests finished per replica and requests moved
(integrations/serve_rebalance.py).

    OMP_NUM_THREADS=1 python bench/rebalance.py                  # 4 deployments, a few minutes on 2 cores
    OMP_NUM_THREADS=1 python bench/rebalance.py --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_args import append_section, model_dir, positive_floats, positive_int, serve_num_blocks, writable_file  # noqa: E402
from bench.cluster_editor import local_serve  # noqa: E402
from bench.editor_latency import pct  # noqa: E402
from workers.kv_blocks import DEFAULT_BLOCK_SIZE  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "  # one prompt head: one affinity key


async def one_request(http, url: str, max_tokens: int, start: float) -> dict:
    """One streamed completion; {"ttft_s", "e2e_s", "status", "finish_reason", "error"} from `start` (error:
    an error answer's body)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0, "mode": "ar",
            "stream": True}
    out = {"ttft_s": None, "e2e_s": None, "status": None, "finish_reason": None, "error": None}
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        out["status"] = response.status_code
        if response.status_code != 200:
            out["error"] = (await response.aread()).decode(errors="replace")[:500]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if out["ttft_s"] is None and chunk.get("choices"):
                out["ttft_s"] = time.perf_counter() - start
            for choice in chunk.get("choices", []):
                out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    out["e2e_s"] = time.perf_counter() - start
    return out


async def burst(url: str, args) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=args.timeout_s) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(http, url, args.max_tokens, start) for _ in range(args.requests)),
                                       return_exceptions=True)

    def answered(r) -> bool:
        return isinstance(r, dict) and r["status"] == 200 and r["finish_reason"] == "length"

    good, failed = [r for r in results if answered(r)], [r for r in results if not answered(r)]
    return {"makespan_s": max((r["e2e_s"] for r in good), default=float("nan")), "ttft": [r["ttft_s"] for r in good if r["ttft_s"]],
            "e2e": [r["e2e_s"] for r in good], "failures": len(failed),
            "first_failure": failure_reason(failed[0]) if failed else None}


def failure_reason(result) -> str:
    """Why one request of a burst failed: its exception, its error answer, or how its stream ended."""
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    if result["status"] != 200:
        return f"HTTP {result['status']}: {result['error']}"
    return f"finish_reason {result['finish_reason']!r}, not 'length' (every request asks for exactly max_tokens)"


def scrape(url: str) -> dict:
    """Per-replica finished and moved request counts from the service's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {"finished": {}, "moved": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "refusion_requests_finished_total" and "replica" in s.labels:
                out["finished"][s.labels["replica"]] = out["finished"].get(s.labels["replica"], 0.0) + s.value
            elif s.name == "refusion_requests_moved_total" and "replica" in s.labels:
                out["moved"] += s.value
    return out


def measure(url: str, threshold: float, rebalance_after_s: float, args) -> dict:
    """Deploy a fresh app with these settings, run the burst, delete the app; one table row."""
    from ray import serve

    from integrations.serve_app import build_app

    config = {"model": str(args.model), "runner": {"num_blocks": args.num_blocks}, "drain_timeout_s": 2.0,
              "engine": {"max_running": args.max_running, "max_queue": args.requests, "routing": {"calibrate": False}},
              "rebalance_after_s": rebalance_after_s,
              "engine_deployment": {"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1, "health_check_period_s": 30,
                                    "graceful_shutdown_timeout_s": 5, "router": {"imbalanced_threshold": threshold}}}
    serve.run(build_app(config), name="refusion", route_prefix="/")  # returns once every replica is up
    try:
        before = scrape(url)
        bursts = [asyncio.run(burst(url, args)) for _ in range(args.repeats)]  # one after another
        after = scrape(url)
    finally:
        serve.delete("refusion")
    row = {"makespan_s": statistics.median(b["makespan_s"] for b in bursts), "ttft": [t for b in bursts for t in b["ttft"]],
           "e2e": [t for b in bursts for t in b["e2e"]], "failures": sum(b["failures"] for b in bursts),
           "requests": args.requests * args.repeats,
           "first_failure": next((b["first_failure"] for b in bursts if b["first_failure"]), None)}
    split = sorted((after["finished"].get(r, 0) - before["finished"].get(r, 0) for r in after["finished"]), reverse=True)
    row.update(threshold=threshold, rebalance_after_s=rebalance_after_s, split=[int(n) for n in split],
               moved=int(after["moved"] - before["moved"]))
    print(f"threshold {threshold:g}, rebalance_after_s {rebalance_after_s:g}: makespan {row['makespan_s']:.2f} s, "
          f"split {row['split']}, moved {row['moved']}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| imbalanced_threshold | rebalance_after_s | burst makespan s (median) | TTFT p50 / p95 s | e2e p50 / p95 s | "
             "requests per replica | moved | failures |", "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threshold']:g} | {r['rebalance_after_s']:g}{' (off)' if not r['rebalance_after_s'] else ''} | "
                     f"{r['makespan_s']:.2f} | {pct(r['ttft'], 50):.2f} / {pct(r['ttft'], 95):.2f} | "
                     f"{pct(r['e2e'], 50):.2f} / {pct(r['e2e'], 95):.2f} | {' / '.join(map(str, r['split']))} | "
                     f"{r['moved']} | {r['failures']} |")
    return "\n".join(lines)


def report(rows: list[dict], args, argv: list[str]) -> str:
    import torch

    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return "\n".join([
        f"### Queue rebalancing: a burst on one replica's key ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
        f"{torch.__version__}, no GPU; local Ray (num_cpus 2), 2 engine replicas x 1 torch thread, max_running "
        f"{args.max_running} each. Model `{Path(args.model).name}`.",
        f"Command: `{threads}{shlex.join(['python', 'bench/rebalance.py', *argv])}`",
        "",
        f"Workload: {args.requests} streamed greedy AR completions of exactly {args.max_tokens} tokens sent at once, "
        f"one prompt head (one affinity key), {args.repeats} bursts in a row per deployment. Latencies at the client "
        "from the burst's start, pooled over the bursts; requests per replica and moved: all bursts.",
        "",
        table(rows),
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=model_dir, default=REPO / "models" / "refusion-tiny-code")
    parser.add_argument("--requests", type=positive_int, default=24)
    parser.add_argument("--max-tokens", type=positive_int, default=96)
    parser.add_argument("--max-running", type=positive_int, default=4, help="engine max_running per replica")
    parser.add_argument("--thresholds", type=positive_floats, default=[1000.0, 2.0],
                        help="router imbalanced_threshold values (comma-separated)")
    parser.add_argument("--rebalance-after-s", type=float, default=1.0, help="the setting measured against 0 (off)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="bursts per deployment, one after another")
    parser.add_argument("--num-blocks", type=serve_num_blocks, default=512, help=f"KV blocks per replica ({DEFAULT_BLOCK_SIZE} tokens each)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--append", type=writable_file, help="append the dated section to this markdown file")
    args = parser.parse_args(argv)
    if not 0 < args.rebalance_after_s < float("inf"):
        parser.error("--rebalance-after-s: give a positive number of seconds (it is compared with 0, off)")
    with local_serve() as url:
        rows = [measure(url, threshold, after, args) for threshold in args.thresholds
                for after in (0.0, args.rebalance_after_s)]
    text = report(rows, args, argv)
    print(text)
    append_section(args.append, text)
    return 1 if report_failed_rows(rows) else 0


def report_failed_rows(rows: list[dict]) -> int:
    """For each row whose every request failed (its numbers are nan), its first failure's reason on stderr;
    how many such rows."""
    failed = [r for r in rows if r["failures"] >= r["requests"]]
    for r in failed:
        print(f"rebalance: every request of the row threshold {r['threshold']:g}, rebalance_after_s "
              f"{r['rebalance_after_s']:g} failed ({r['failures']}); the first: {r['first_failure']}", file=sys.stderr)
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
