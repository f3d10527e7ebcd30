"""Bytes the model writes that are no UTF-8 never reach the editor as U+FFFD (postprocess rule 0),
unless the document holds U+FFFD itself. The shipped model writes such byte runs on some non-ASCII
prefixes (found by search: a string of Japanese text, greedy, ReFusion, a 32-token gap). In-process
engine and EditorSession (serve_testbed.local_editor_session), as tests/integrations/test_infill_shipped_model.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from serve_testbed import local_editor_session

from integrations.editor import protocol as rpc

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present"),
]


async def _complete(cases: dict[str, tuple[str, str]]) -> dict[str, dict]:
    async with local_editor_session(SHIPPED_MODEL) as (session, frames):
        for name, (prefix, suffix) in cases.items():
            params = {"uri": name, "prefix": prefix, "suffix": suffix, "multiline": True, "mode": "refusion",
                      "gaps": [32], "temperature": 0}
            await session.handle_frame(rpc.encode_request(name, "complete", params))
        await asyncio.wait_for(session.drain(), 300)
    responses = {f[1]: f for f in frames if f[0] == rpc.RESPONSE}
    assert all(responses[name][2] is None for name in cases), responses
    return {name: responses[name][3] for name in cases}


async def test_a_completion_ends_before_bytes_that_are_no_utf8():
    results = await _complete({"japanese": ("s = '日本語日本語", "'\n"),
                               "holds_fffd": ("# \ufffd\nprint(\"🚀 ", "\")\n")})
    cut = results["japanese"]
    assert cut["stop_reason"] == "invalid" and "\ufffd" not in cut["text"]
    # The document holds U+FFFD: the rule is off, and this model's byte run comes back as written
    kept = results["holds_fffd"]
    assert kept["stop_reason"] != "invalid" and "\ufffd" in kept["text"]
