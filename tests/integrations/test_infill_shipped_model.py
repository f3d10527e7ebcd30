"""Infill on held-out function bodies with the shipped trained model (skipped until it is present).

Each case removes one line from a function of a held-out standard-library file (the split `refusion
train` used) and asks for it with the rest of the body as the suffix. Checked structurally — no suffix
line duplicated, single-line answers are one line — because a tiny model's exact-match rate is a
benchmark number (bench/editor_latency.py), not a pass/fail property. Runs in-process (engine +
EditorSession), so it costs model load plus a few completions.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from serve_testbed import local_editor_session

from integrations.editor import protocol as rpc

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "models" / "refusion-tiny-code"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present"),
]


def held_out_cases(n: int) -> list[dict]:
    sys.path.insert(0, str(REPO / "bench"))
    from editor_latency import held_out_cases as cases, heldout_fraction_of

    return cases(n, seed=1, heldout_fraction=heldout_fraction_of(SHIPPED_MODEL))


async def complete_all(cases: list[dict], multilines: tuple[bool, ...]) -> dict[bool, list[dict]]:
    """Complete every case once per multiline setting, on one engine."""
    async with local_editor_session(SHIPPED_MODEL) as (session, frames):
        for multiline in multilines:
            for i, case in enumerate(cases):
                params = {"uri": f"{case['uri']}:{multiline}", "prefix": case["prefix"], "suffix": case["suffix"],
                          "language": "python", "multiline": multiline, "max_time_ms": 20_000}
                await session.handle_frame(rpc.encode_request(f"{multiline}-{i}", "complete", params))
        await asyncio.wait_for(session.drain(), 300)
    responses = {f[1]: f for f in frames if f[0] == rpc.RESPONSE}
    errors = [f[2] for f in responses.values() if f[2] is not None]
    assert not errors, errors
    return {m: [responses[f"{m}-{i}"][3] for i in range(len(cases))] for m in multilines}


def _visible_lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


async def test_held_out_infill_is_consistent_with_the_suffix():
    cases = held_out_cases(4)
    by_mode = await complete_all(cases, (False, True))
    for multiline, results in by_mode.items():
        check(cases, results, multiline)


def check(cases: list[dict], results: list[dict], multiline: bool) -> None:
    matches = 0
    for case, result in zip(cases, results):
        text, suffix_lines = result["text"], _visible_lines(case["suffix"])
        if not multiline:
            assert "\n" not in text.strip("\n"), text
        # no line of the completion repeats the first line after the gap (the trimming rule held)
        if suffix_lines and len(suffix_lines[0]) >= 4:
            assert suffix_lines[0] not in _visible_lines(text), (text, suffix_lines[0])
        assert result["stop_reason"] in ("stop", "length", "deadline", "newline", "indent", "suffix", "invalid")
        matches += text.strip() == case["expected"]
    print(f"exact line matches ({'multi' if multiline else 'single'}-line): {matches}/{len(cases)}")


async def test_a_completion_of_whitespace_alone_comes_back_empty():
    """The shipped model answers "import os\n" (single line, greedy) with three spaces and its end of
    text: that reached the editor as a completion to insert (helper-164). Whitespace alone is nothing to
    insert (its indentation is the editor's, as for partials, which never show it): the text is empty,
    the rest of the answer as it was. A completion with text keeps its leading indentation."""
    async with local_editor_session(SHIPPED_MODEL) as (session, frames):
        for name, prefix in (("blank", "import os\n"), ("body", "def f(x):\n")):
            params = {"uri": name, "prefix": prefix, "suffix": "", "multiline": False, "temperature": 0}
            await session.handle_frame(rpc.encode_request(name, "complete", params))
        await asyncio.wait_for(session.drain(), 300)
    responses = {f[1]: f for f in frames if f[0] == rpc.RESPONSE}
    assert responses["blank"][2] is None and responses["body"][2] is None, responses
    blank, body = responses["blank"][3], responses["body"][3]
    assert blank["text"] == "" and blank["stop_reason"] == "stop" and blank["tokens"] >= 1, blank
    assert body["text"].startswith("    ") and body["text"].strip(), body
    assert not [f for f in frames if f[0] == rpc.NOTIFICATION and f[1] == "completion/partial"
                and f[2]["id"] == "blank"]  # (no partial showed the spaces either)


async def test_closers_an_editor_inserted_are_not_written_twice():
    """`print(d['` with `'])` after the cursor (an editor's auto-closed brackets): the shipped model writes
    `a']`, which went into the buffer as `print(d['a']'])` (helper-168). The closers the rest of the line
    holds are dropped where the line's brackets then balance: `a`."""
    async with local_editor_session(SHIPPED_MODEL) as (session, frames):
        for mode in ("ar", "refusion"):
            params = {"uri": mode, "prefix": "d = {'a': 1}\nprint(d['", "suffix": "'])\n", "multiline": False,
                      "temperature": 0, "mode": mode}
            await session.handle_frame(rpc.encode_request(mode, "complete", params))
        await asyncio.wait_for(session.drain(), 300)
    responses = {f[1]: f for f in frames if f[0] == rpc.RESPONSE}
    for mode in ("ar", "refusion"):
        assert responses[mode][2] is None, responses[mode]
        text = responses[mode][3]["text"]
        assert "']" not in text and text.strip(), (mode, text)
