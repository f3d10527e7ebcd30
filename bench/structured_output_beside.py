"""The second to fifth tables of bench/structured_output.py: free requests beside costly grammars (an
ambiguous grammar under grammar_token_ms, a ~780,000-character JSON schema, grammars of tens of
milliseconds per token under grammar_step_ms, and schemas the HTTP app checks for seconds and refuses).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from bench.step_clock import clock_steps
from bench.structured_output_cost import PROMPTS, collect

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
        starts = clock_steps(engine)
        try:
            free = [GenerationRequest(f"free-{i}", tokenizer.encode(PROMPTS[i % len(PROMPTS)]), {"gen_length": tokens},
                                      mode=Mode.AR) for i in range(requests)]
            await asyncio.gather(*(collect(engine, s) for s in free))  # warm-up
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
            await asyncio.gather(*(collect(engine, s) for s in free))
            wall = time.perf_counter() - start
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
            rows.append({"grammar_token_ms": budget_ms, "free_requests": requests, "free_wall_s": round(wall, 2),
                         "step_ms_p50": round(1000 * statistics.median(gaps), 1),
                         "step_ms_max": round(1000 * gaps[-1], 1),
                         "ambiguous_tokens": outcome["tokens"], "ambiguous_ended": outcome["ended"]})
        finally:
            await engine.stop(drain_timeout_s=1)
    return rows


async def _free_round(engine, prompt: list[int], tag: str) -> float:
    """Seconds for 4 free greedy AR requests of 32 tokens (EOS ignored) run together: one round of the
    third and fourth tables."""
    from scheduler.api import GenerationRequest, Mode

    free = {"gen_length": 32, "ignore_eos": True, "serial_num_blocks": 1}
    start = time.perf_counter()
    await asyncio.gather(*(collect(engine, GenerationRequest(f"{tag}-{i}", prompt, free, mode=Mode.AR))
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
            heavy = asyncio.gather(*(collect(engine, GenerationRequest(
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
            slow = asyncio.gather(*(collect(engine, GenerationRequest(
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
