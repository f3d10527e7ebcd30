"""Bytes the model writes that are no UTF-8 never reach the editor as U+FFFD (postprocess rule 0),
unless the document holds U+FFFD itself. The shipped model writes such byte runs on some non-ASCII
prefixes (found by search: a string of Japanese text, greedy, ReFusion, a 32-token gap). In-process
engine and EditorSession, as tests/integrations/test_infill_shipped_model.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from integrations.editor import protocol as rpc
from integrations.editor.session import EditorSession

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present"),
]


async def _complete(cases: dict[str, tuple[str, str]]) -> dict[str, dict]:
    from integrations.engine_client import LocalEngineClient
    from integrations.engine_host import build_engine

    engine, tokenizer = build_engine(SHIPPED_MODEL, {}, {"routing": {"calibrate": False}})
    await engine.start()
    frames: list = []

    async def send(data: bytes) -> None:
        frames.append(msgpack.unpackb(data, raw=False))

    session = EditorSession(LocalEngineClient(engine, tokenizer, SHIPPED_MODEL.name), send)
    try:
        for name, (prefix, suffix) in cases.items():
            params = {"uri": name, "prefix": prefix, "suffix": suffix, "multiline": True, "mode": "refusion",
                      "gaps": [32], "temperature": 0}
            await session.handle_frame(rpc.encode_request(name, "complete", params))
        await asyncio.wait_for(session.drain(), 300)
    finally:
        await engine.stop(drain_timeout_s=1)
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
