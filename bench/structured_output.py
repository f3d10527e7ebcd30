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

    python -m bench.structured_output [--model DIR] [--requests 8] [--tokens 64] [--only refused-schemas]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "refusion-tiny-code"
PROMPTS = ["Write a function that parses a date.", "Give the settings as JSON.", "Add 2 and 3.",
           "What is the weather in Oslo?", "List three colors.", "def load(path):", "Return a user record.",
           "Sort the list."]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}


def grammars() -> dict:
    from integrations.openai_messages import ToolSpec
    from integrations.structured_output import json_grammar, regex_grammar, tool_grammar
    from decoding.grammar import GrammarSpec

    tools = [ToolSpec.model_validate(t) for t in TOOLS]
    return {"free": None, "json_schema": GrammarSpec(json_grammar(SCHEMA, "schema")),
            "tool_required": tool_grammar(tools, "", 0), "tools_auto": tool_grammar(tools, None, 0),
            "regex": GrammarSpec(regex_grammar(r"([a-z]+ ){1,40}[a-z]+\.", "regex"))}


async def run(model_dir: Path, requests: int, tokens: int) -> list[dict]:
    import decoding.grammar as grammar_module
    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest, Mode

    engine, tokenizer = build_engine(model_dir)
    await engine.start()
    timings: list[float] = []
    original = grammar_module.TokenConstraint.bitmask

    def timed(self):
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            timings.append(time.perf_counter() - start)

    compiles: list[float] = []
    original_init = grammar_module.Grammar.__init__

    def timed_init(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            original_init(self, *args, **kwargs)
        finally:
            compiles.append(time.perf_counter() - start)

    starts: list[float] = []
    execute = engine.runner.execute

    def timed_execute(segments, tables):
        starts.append(time.perf_counter())
        return execute(segments, tables)

    grammar_module.TokenConstraint.bitmask = timed
    grammar_module.Grammar.__init__ = timed_init
    engine.runner.execute = timed_execute
    rows = []
    try:
        # every case once as a warm-up (first steps of each shape, llguidance's lazy tables), then measured
        for measured, (name, grammar) in [(m, case) for m in (False, True) for case in grammars().items()]:
            timings.clear(), compiles.clear(), starts.clear()
            engine.grammars.close()  # each case compiles its grammar (once: its requests share it)
            specs = [GenerationRequest(f"{name}-{i}-{measured}", tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                                       {"gen_length": tokens}, mode=Mode.AR, grammar=grammar) for i in range(requests)]
            forwards_before, start = engine.forwards, time.perf_counter()
            outputs = await asyncio.gather(*(_collect(engine, s) for s in specs))
            wall = time.perf_counter() - start
            steps = engine.forwards - forwards_before
            masks_us = sorted(t * 1e6 for t in timings)
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            if not measured:
                continue
            rows.append({
                "grammar": name, "requests": requests, "tokens": sum(o[0] for o in outputs), "steps": steps,
                "tokens_per_forward": round(sum(o[0] for o in outputs) / max(1, sum(o[2] for o in outputs)), 2),
                "compile_ms": round(1000 * statistics.mean(compiles), 1) if compiles else 0.0,
                "step_ms_p50": round(1000 * statistics.median(gaps), 2) if gaps else 0.0,
                "mask_p50_us": round(statistics.median(masks_us), 1) if masks_us else 0.0,
                "mask_p95_us": round(masks_us[int(0.95 * (len(masks_us) - 1))], 1) if masks_us else 0.0,
                "mask_share_of_wall": round(sum(timings) / wall, 3) if timings else 0.0,
                "complete_json": (sum(_is_json(o[1]) for o in outputs) if name == "json_schema" else None),
            })
    finally:
        grammar_module.TokenConstraint.bitmask = original
        grammar_module.Grammar.__init__ = original_init
        engine.runner.execute = execute
        await engine.stop(drain_timeout_s=1)
    return rows


AMBIGUOUS = 'start: s\ns: s s | s s s | C\nC: /[a-z ]/'  # one character per lexeme, ambiguous


async def beside_ambiguous(model_dir: Path, requests: int, tokens: int) -> list[dict]:
    """Rows of the second table (module doc), one per grammar_token_ms setting."""
    from llguidance import LLMatcher

    from decoding.grammar import GrammarSpec
    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest, Mode
    from scheduler.config import EngineConfig

    rows = []
    for budget_ms in (EngineConfig().grammar_token_ms, 0.0):
        engine, tokenizer = build_engine(model_dir, engine_options={"grammar_token_ms": budget_ms})
        await engine.start()
        starts: list[float] = []
        execute = engine.runner.execute

        def timed_execute(segments, tables, execute=execute):
            starts.append(time.perf_counter())
            return execute(segments, tables)

        engine.runner.execute = timed_execute
        try:
            free = [GenerationRequest(f"free-{i}", tokenizer.encode(PROMPTS[i % len(PROMPTS)]), {"gen_length": tokens},
                                      mode=Mode.AR) for i in range(requests)]
            await asyncio.gather(*(_collect(engine, s) for s in free))  # warm-up
            starts.clear()
            heavy = GenerationRequest("ambiguous", tokenizer.encode(PROMPTS[0]), {"gen_length": 2048, "ignore_eos": True},
                                      mode=Mode.AR, grammar=GrammarSpec(LLMatcher.grammar_from_lark(AMBIGUOUS)))
            outcome: dict = {}

            async def ambiguous():
                n = 0
                try:
                    async for delta in engine.submit(heavy):
                        n += len(delta.token_ids)
                        if delta.finish_reason is not None:
                            outcome.update(tokens=n, ended=f"{delta.finish_reason.value}: {delta.error_field or ''}")
                finally:
                    outcome.setdefault("tokens", n)
                    outcome.setdefault("ended", "cancelled after the free requests")

            task = asyncio.create_task(ambiguous())
            start = time.perf_counter()
            free = [GenerationRequest(f"free-{i}-b", s.prompt_ids, s.params, mode=Mode.AR) for i, s in enumerate(free)]
            await asyncio.gather(*(_collect(engine, s) for s in free))
            wall = time.perf_counter() - start
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
            rows.append({"grammar_token_ms": budget_ms, "free_requests": requests, "free_wall_s": round(wall, 2),
                         "step_ms_p50": round(1000 * statistics.median(gaps), 1),
                         "step_ms_max": round(1000 * gaps[-1], 1),
                         "ambiguous_tokens": outcome["tokens"], "ambiguous_ended": outcome["ended"]})
        finally:
            engine.runner.execute = execute
            await engine.stop(drain_timeout_s=1)
    return rows


async def _free_round(engine, prompt: list[int], tag: str) -> float:
    """Seconds for 4 free greedy AR requests of 32 tokens (EOS ignored) run together: one round of the
    third and fourth tables."""
    from scheduler.api import GenerationRequest, Mode

    free = {"gen_length": 32, "ignore_eos": True, "serial_num_blocks": 1}
    start = time.perf_counter()
    await asyncio.gather(*(_collect(engine, GenerationRequest(f"{tag}-{i}", prompt, free, mode=Mode.AR))
                           for i in range(4)))
    return time.perf_counter() - start


def large_schema(objects: int = 4, properties: int = 4000) -> dict:
    """A JSON schema of `objects` objects of `properties` required constants each: ~780,000 characters
    of grammar that forces ~350,000 tokens (a break-test's, helper-122)."""
    return {"type": "object", "required": [f"o{j}" for j in range(objects)], "properties": {
        f"o{j}": {"type": "object", "properties": {f"k{i}": {"const": "v" * 20} for i in range(properties)},
                  "required": [f"k{i}" for i in range(properties)]} for j in range(objects)}}


async def beside_large_schema(model_dir: Path, choices: tuple[int, ...] = (1, 4, 16)) -> list[dict]:
    """Rows of the third table: rounds of 4 free 32-token requests while `n` requests with the large
    schema (max 16 tokens, as `n` choices of one request) compile and run; the worst round's wall."""
    from decoding.grammar import GrammarSpec
    from integrations.engine_host import build_engine
    from integrations.structured_output import json_grammar
    from scheduler.api import GenerationRequest

    grammar = GrammarSpec(json_grammar(large_schema(), "response_format.json_schema.schema"))
    rows = []
    for n in choices:
        engine, tokenizer = build_engine(model_dir)
        await engine.start()
        prompt = tokenizer.encode(PROMPTS[5])

        try:
            baseline = [await _free_round(engine, prompt, f"base-{i}") for i in range(3)]
            heavy = asyncio.gather(*(_collect(engine, GenerationRequest(
                f"schema-{i}", prompt, {"gen_length": 16, "serial_num_blocks": 1}, grammar=grammar)) for i in range(n)))
            start, rounds = time.perf_counter(), []
            while not heavy.done():
                rounds.append(await _free_round(engine, prompt, f"during-{len(rounds)}"))
            await heavy
            rows.append({"schema_requests": n, "grammar_chars": len(grammar.grammar),
                         "schema_requests_done_s": round(time.perf_counter() - start, 2),
                         "free_round_s_alone": round(max(baseline), 2), "free_round_s_worst": round(max(rounds), 2),
                         "compiles": getattr(getattr(engine, "grammars", None), "compiles", None)})  # (None: older code)
        finally:
            await engine.stop(drain_timeout_s=1)
    return rows


def plateau_grammar(k: int) -> str:
    """Blocks of k one-character terminals parsed every possible way, then a forced ".": its matching cost
    per token levels off (below grammar_token_ms for k up to ~28 here) instead of growing (helper-122)."""
    rules = ["start: blk+", f'blk: t{k} "."', "t1: C"]
    rules += [f"t{j}: " + " | ".join(f"t{i} t{j - i}" for i in range(1, j)) for j in range(2, k + 1)]
    return "\n".join(rules + ["C: /[a-z ]/"]) + "\n"


async def beside_slow_grammars(model_dir: Path, n: int = 16, k: int = 24) -> list[dict]:
    """Rows of the fourth table: rounds of 4 free 32-token requests while `n` requests of
    plateau_grammar(k) (each under the per-token budget) run, with grammar_step_ms at its default and
    off: the worst and median free round, and how long the slow requests took."""
    from llguidance import LLMatcher

    from decoding.grammar import GrammarSpec
    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest
    from scheduler.config import EngineConfig

    grammar = GrammarSpec(LLMatcher.grammar_from_lark(plateau_grammar(k)))
    rows = []
    for step_ms in (EngineConfig().grammar_step_ms, 0.0):
        engine, tokenizer = build_engine(model_dir, engine_options={"grammar_step_ms": step_ms})
        await engine.start()
        prompt = tokenizer.encode(PROMPTS[5])

        try:
            alone = statistics.median([await _free_round(engine, prompt, f"alone-{i}") for i in range(3)])
            slow = asyncio.gather(*(_collect(engine, GenerationRequest(
                f"slow-{i}", prompt, {"gen_length": 32, "serial_num_blocks": 1, "temperature": 0.8, "seed": i, "ignore_eos": True},
                grammar=grammar)) for i in range(n)), return_exceptions=True)
            start, rounds = time.perf_counter(), []
            while not slow.done():
                rounds.append(await _free_round(engine, prompt, f"during-{len(rounds)}"))
            outcomes = await slow
            rows.append({"grammar_step_ms": step_ms, "slow_requests": n, "slow_done_s": round(time.perf_counter() - start, 1),
                         "slow_failed": sum(isinstance(o, Exception) for o in outcomes),
                         "free_round_s_alone": round(alone, 2), "free_round_s_median": round(statistics.median(rounds), 2),
                         "free_round_s_worst": round(max(rounds), 2)})
        finally:
            await engine.stop(drain_timeout_s=1)
    return rows


async def beside_refused_schemas(model_dir: Path, schemas: int = 12, properties: int = 5000) -> list[dict]:
    """Plain streamed chats' first-token times alone, then while `schemas` requests whose schema the app
    takes seconds to check (and refuses) are in flight: the fifth table."""
    import httpx

    from integrations.engine_client import LocalEngineClient, read_model_card
    from integrations.engine_host import build_engine
    from integrations.openai_api import APISettings, create_app
    from integrations.request_limits import RequestLimits

    engine, tokenizer = build_engine(model_dir)
    card = read_model_card(model_dir)
    settings = APISettings(model_name=card["model"], decode_defaults=card["defaults"],
                           limits=RequestLimits(context_length=card["limits"]["context_length"]))
    app = create_app(settings, LocalEngineClient(engine, tokenizer, card["model"]))
    field = {"type": "string", "description": "a field of the record, as the API returns it"}
    big = {"type": "json_schema", "json_schema": {"name": "record", "schema": {
        "type": "object", "properties": {f"p{i}": field for i in range(properties)}}}}
    await engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=None) as http:
            async def first_token() -> float:
                start = time.perf_counter()
                async with http.stream("POST", "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8, "stream": True,
                        "mode": "ar"}) as response:
                    async for line in response.aiter_lines():
                        if '"content"' in line:
                            break
                return time.perf_counter() - start

            alone = [await first_token() for _ in range(4)]
            started = time.perf_counter()
            refused = [asyncio.ensure_future(http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 4, "response_format": big}))
                for _ in range(schemas)]
            await asyncio.sleep(0.3)  # the checks have started
            beside = [await first_token() for _ in range(4)]
            codes = sorted({(await r).status_code for r in refused})
            checked_s = time.perf_counter() - started
    finally:
        await engine.stop(drain_timeout_s=0)
    return [{"case": case, "first token s (4 chats)": " / ".join(f"{t:.3f}" for t in times),
             "max s": round(max(times), 3), "schema requests": f"{schemas}: {codes}, all answered in {checked_s:.1f} s"
             if case != "alone" else "-"} for case, times in (("alone", alone), ("beside the schemas", beside))]


async def _collect(engine, spec) -> tuple[int, str, int]:
    """(tokens, text, decode forwards) of one request."""
    n, text, forwards = 0, "", 0
    async for delta in engine.submit(spec):
        n, text = n + len(delta.token_ids), text + delta.text
        forwards = delta.stats.get("forwards", forwards)
    return n, text, forwards


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    from bench.bench_args import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--requests", type=positive_int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=["refused-schemas"], help="run only this part")
    args = parser.parse_args(argv)
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
