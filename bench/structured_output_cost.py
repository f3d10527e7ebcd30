"""The first table of bench/structured_output.py: what each grammar costs N concurrent greedy AR requests
(tokens per decode forward, compile time, the bitmask's host time, step time, the masks' share of the
run); and the prompts and the request collector every table uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path

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
    """The table's rows: each grammar's N requests run once as a warm-up, then measured (`_row`)."""
    from bench.step_clock import clock_steps
    from integrations.engine_host import build_engine
    from scheduler.api import GenerationRequest, Mode

    engine, tokenizer = build_engine(model_dir)
    await engine.start()
    rows = []
    try:
        with _grammar_clock() as (timings, compiles):
            starts = clock_steps(engine)
            # every case once as a warm-up (first steps of each shape, llguidance's lazy tables), then measured
            for measured, (name, grammar) in [(m, case) for m in (False, True) for case in grammars().items()]:
                timings.clear(), compiles.clear(), starts.clear()
                engine.grammars.close()  # each case compiles its grammar (once: its requests share it)
                specs = [GenerationRequest(f"{name}-{i}-{measured}", tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                                           {"gen_length": tokens}, mode=Mode.AR, grammar=grammar)
                         for i in range(requests)]
                forwards_before, start = engine.forwards, time.perf_counter()
                outputs = await asyncio.gather(*(collect(engine, s) for s in specs))
                wall = time.perf_counter() - start
                if measured:
                    rows.append(_row(name, requests, outputs, engine.forwards - forwards_before, wall,
                                     timings, compiles, starts))
    finally:
        await engine.stop(drain_timeout_s=1)
    return rows


@contextlib.contextmanager
def _grammar_clock():
    """Time every grammar's compile (decoding.grammar.Grammar.__init__) and every token bitmask
    (TokenConstraint.bitmask) while inside: yields the two lists of seconds (bitmasks, compiles)
    they are appended to; the methods are restored on leaving."""
    import decoding.grammar as grammar_module

    timings: list[float] = []
    compiles: list[float] = []
    original, original_init = grammar_module.TokenConstraint.bitmask, grammar_module.Grammar.__init__
    grammar_module.TokenConstraint.bitmask = _timed(original, timings)
    grammar_module.Grammar.__init__ = _timed(original_init, compiles)
    try:
        yield timings, compiles
    finally:
        grammar_module.TokenConstraint.bitmask = original
        grammar_module.Grammar.__init__ = original_init


def _timed(method, seconds: list[float]):
    """`method` wrapped to append each call's seconds to `seconds`."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return timed


def _row(name: str, requests: int, outputs: list[tuple], steps: int, wall: float, timings: list[float],
         compiles: list[float], starts: list[float]) -> dict:
    """One grammar's measured row, from its requests' `collect` outputs, the engine steps and seconds it
    took, and the bitmask times, compile times and step starts recorded meanwhile."""
    masks_us = sorted(t * 1e6 for t in timings)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return {
        "grammar": name, "requests": requests, "tokens": sum(o[0] for o in outputs), "steps": steps,
        "tokens_per_forward": round(sum(o[0] for o in outputs) / max(1, sum(o[2] for o in outputs)), 2),
        "compile_ms": round(1000 * statistics.mean(compiles), 1) if compiles else 0.0,
        "step_ms_p50": round(1000 * statistics.median(gaps), 2) if gaps else 0.0,
        "mask_p50_us": round(statistics.median(masks_us), 1) if masks_us else 0.0,
        "mask_p95_us": round(masks_us[int(0.95 * (len(masks_us) - 1))], 1) if masks_us else 0.0,
        "mask_share_of_wall": round(sum(timings) / wall, 3) if timings else 0.0,
        "complete_json": (sum(_is_json(o[1]) for o in outputs) if name == "json_schema" else None),
    }


async def collect(engine, spec) -> tuple[int, str, int]:
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
