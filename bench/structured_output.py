"""What grammar-constrained decoding costs (decoding/grammar.py, docs/api.md "Structured outputs").

Runs the engine on a model directory (default: the shipped model) with N concurrent greedy AR requests,
once free and once per grammar (a JSON schema, a forced tool call, text with tool calls, a regex), and
reports per grammar: tokens per decode forward (grammar-forced tokens are fed without forwards of their
own, decoding/ar.py), the time to compile it (decoding.grammar.Grammar, on a compile thread at submit;
the case's requests share one compile, scheduler.grammars), the host time of each token's bitmask (llguidance, p50/p95 in microseconds), the
engine's median step time (start of one forward to the start of the next: host work, masks and
device-side masking, workers.reads.apply_token_bitmask, included) and the masks' share of the run.

A second table: N free requests beside one request whose grammar is ambiguous (its matching time per
token grows with its text), with the engine's grammar_token_ms budget at its default and off (0): the
free requests' wall time and step times, and how the ambiguous request ended (cancelled once the free
ones are done when nothing stops it). A third: rounds of 4 free requests while 1, 4 or 16 requests with
a ~780,000-character JSON schema compile and run (`large_schema`): the worst round against a round alone.
A fourth: rounds of 4 free requests beside 16 requests whose grammar costs tens of milliseconds per
token, under grammar_token_ms (`plateau_grammar`), with grammar_step_ms at its default and off.
A fifth, through the HTTP app (in-process, ASGI): the first-token time of plain streamed chats while
12 requests carry a 5,000-property schema that the app checks for seconds and refuses (llguidance's
item limit; integrations.request_limits.grammar_off_loop), against the same chats alone.
The first table is bench/structured_output_cost.py's, the others bench/structured_output_beside.py's.

    python -m bench.structured_output [--model DIR] [--requests 8] [--tokens 64] [--only refused-schemas]

--tokens is each request's gen_length: a multiple of the model's slot_size x serial_num_blocks (64 for the
shipped model); another is a usage error naming it (bench_args.check_gen_length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "refusion-tiny-code"


def main(argv: list[str] | None = None) -> int:
    from bench.bench_args import check_gen_length, model_dir, positive_int
    from bench.structured_output_beside import (beside_ambiguous, beside_large_schema, beside_refused_schemas,
                                                beside_slow_grammars)
    from bench.structured_output_cost import run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(DEFAULT_MODEL))
    parser.add_argument("--requests", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=64,
                        help="tokens per request: a multiple of the model's slot_size x serial_num_blocks")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=["refused-schemas"], help="run only this part")
    args = parser.parse_args(argv)
    check_gen_length(parser, "--tokens", args.tokens, args.model)
    import torch

    torch.set_num_threads(1)  # as bench/model_card.py: steadier step times on a shared 2-core machine
    refused = asyncio.run(beside_refused_schemas(Path(args.model)))
    if args.only:
        tables = {"beside_refused_schemas": refused}
        print(json.dumps(tables) if args.json else _markdown(refused))
        return 0
    rows = asyncio.run(run(Path(args.model), args.requests, args.tokens))
    beside = asyncio.run(beside_ambiguous(Path(args.model), args.requests, args.tokens))
    large = asyncio.run(beside_large_schema(Path(args.model)))
    slow = asyncio.run(beside_slow_grammars(Path(args.model)))
    if args.json:
        print(json.dumps({"grammars": rows, "beside_ambiguous": beside, "beside_large_schema": large,
                          "beside_slow_grammars": slow, "beside_refused_schemas": refused}))
        return 0
    for table in (rows, beside, large, slow, refused):
        print(_markdown(table))
    return 0


def _markdown(table: list[dict]) -> str:
    keys = list(table[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in table]) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from bench.bench_args import engine_log_to_stderr

    engine_log_to_stderr()
    sys.exit(main())
