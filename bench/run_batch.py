"""`refusion run-batch` throughput: the same OpenAI batch file answered with --concurrency 1 (one request
at a time, as a naive client loop would send them) and with more in flight (the engine batches them).

For each concurrency, one run of `integrations.cli_batch.run_batch` in this process on a model
directory (default: the shipped model) over --requests /v1/completions lines (prompts cut from this
repository's source, seeded sampling in AR mode, --tokens each): wall time from the first request to
the last result (model loading excluded), requests per second and generated tokens per second, and
whether every line succeeded. The results of the runs are the same texts (seeded), which is checked.

    python -m bench.run_batch [--model DIR] [--requests 128] [--tokens 32] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / "models" / "refusion-tiny-code"


def batch_lines(model_name: str, requests: int, tokens: int) -> list[str]:
    """`requests` completions lines: the first line of each function of scheduler/*.py as a prompt."""
    sources = "".join(p.read_text() for p in sorted((REPO / "scheduler").glob("*.py")))
    prompts = [line + "\n" for line in sources.splitlines() if line.startswith("def ") or line.startswith("    def ")]
    return [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {
        "model": model_name, "prompt": prompts[i % len(prompts)], "max_tokens": tokens, "temperature": 0.8,
        "seed": i, "mode": "ar"}}) for i in range(requests)]


def one_run(model_dir: Path, source: Path, concurrency: int) -> tuple[dict, list[str]]:
    from integrations.cli_batch import Progress, add_arguments, run_batch

    target = source.with_suffix(f".c{concurrency}.jsonl")
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the command's own flags and defaults (a flag added later needs no change here)
    args = parser.parse_args(["-i", str(source), "-o", str(target), "--model", str(model_dir),
                              "--concurrency", str(concurrency)])
    progress = Progress()
    asyncio.run(run_batch(args, progress))
    results = [json.loads(line) for line in target.read_text().splitlines()]
    texts = [r["response"]["body"]["choices"][0]["text"] if r["error"] is None else None for r in results]
    return {"seconds": progress.seconds(), "tokens": progress.completion_tokens, "failed": progress.failed,
            "requests": progress.requests}, texts


def main(argv: list[str] | None = None) -> int:
    from bench.bench_args import model_dir, positive_int, positive_ints

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(DEFAULT_MODEL))
    parser.add_argument("--requests", type=positive_int, default=128)
    parser.add_argument("--tokens", type=positive_int, default=32)
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32])
    args = parser.parse_args(argv)
    import structlog

    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # the table alone on stdout
    try:
        return _run(args)
    finally:
        structlog.configure(**saved)


def _run(args) -> int:
    model_dir = Path(args.model)
    levels = args.concurrency
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "batch.jsonl"
        source.write_text("\n".join(batch_lines(model_dir.name, args.requests, args.tokens)) + "\n")
        rows, reference = [], None
        for concurrency in levels:
            numbers, texts = one_run(model_dir, source, concurrency)
            reference = reference if reference is not None else texts
            rows.append((concurrency, numbers, texts == reference))
    print(f"# refusion run-batch, {model_dir.name}, {args.requests} completions of {args.tokens} tokens "
          f"(seeded AR sampling); {platform.machine()}, {platform.processor() or 'cpu'}, Python "
          f"{platform.python_version()}")
    print("| concurrency | seconds | requests / s | generated tok/s | failed | same texts as the first row |")
    print("|---:|---:|---:|---:|---:|---|")
    for concurrency, n, same in rows:
        print(f"| {concurrency} | {n['seconds']:.2f} | {n['requests'] / n['seconds']:.1f} | "
              f"{n['tokens'] / n['seconds']:.0f} | {n['failed']} | {'yes' if same else 'NO'} |")
    return 0 if all(same and n["failed"] == 0 for _, n, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
