"""A completion whose gap the engine's KV cache cannot hold, on the shipped model with a 12-block cache
(192 tokens), through EditorSession over the real engine (serve_testbed.local_editor_session). The
error names what the client sent and a length that fits: `gaps [256]` was answered "max_tokens: ...
ask for at most 166", naming a field the client never sent, and `gaps [166]` (rounded up to whole
slots, 168) was refused again. A gap that does not fit beside others that do is left out, as one past
the model's context is: `gaps [16, 256]` answers with the 16-token gap (it failed the whole completion)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from serve_testbed import local_editor_session

from integrations.editor import protocol as rpc

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
SMALL_KV = {"num_blocks": 12}  # 12 blocks of 16 tokens: a 256-token gap does not fit, a 64-token one does

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present")

PARAMS = {"uri": "file:///a.py", "prefix": "def add(a, b):\n    return", "suffix": "\n"}


async def _answer(session, frames, msg_id, params: dict) -> list:
    await session.handle_frame(rpc.encode_request(msg_id, "complete", params))
    await asyncio.wait_for(session.drain(), 120)
    [answer] = [f for f in frames if f[0] == rpc.RESPONSE and f[1] == msg_id]
    return answer


def _free_blocks(session) -> tuple[int, int]:
    stats = session.client.engine.stats()
    return stats["kv_blocks_free"] + stats["prefix_cache_blocks"], stats["kv_blocks_total"]


@pytest.mark.parametrize("sent, named", [({"gaps": [256]}, "gaps"), ({"gaps": [200, 256]}, "gaps"),
                                         ({"gaps": [256], "max_tokens": 200}, "max_tokens")])
async def test_a_gap_the_kv_cache_cannot_hold_names_what_was_sent_and_a_length_that_fits(sent, named):
    async with local_editor_session(SHIPPED_MODEL, SMALL_KV) as (session, frames):
        _, _, err, _ = await _answer(session, frames, 1, {**PARAMS, **sent})
        assert err is not None and err["code"] == rpc.INVALID_PARAMS and err["data"] == {"field": named}, err
        assert err["message"].startswith(f"{named}: ") and "gen_length" not in err["message"], err
        most = int(err["message"].rsplit("at most ", 1)[1].split()[0])
        assert most % 8 == 0, err  # whole slots: a gap of it decodes no more than it says
        retry = {"gaps": [most]} if named == "gaps" else {"gaps": [256], "max_tokens": most}
        _, _, again, result = await _answer(session, frames, 2, {**PARAMS, **retry})
        assert again is None and result["gap"] == most, again
        assert _free_blocks(session) == (12, 12)


@pytest.mark.parametrize("sent, fitting", [({"gaps": [16, 256]}, [16]),
                                           ({"gaps": [16, 64, 256], "max_tokens": 200}, [16, 64])])
async def test_a_gap_the_kv_cache_cannot_hold_is_dropped_and_the_others_answer(sent, fitting):
    """Gaps the KV cache cannot hold are left out as those past the model's context are (gaps.fitting_gaps),
    and the ones that fit answer: `gaps [16, 256]` on a 12-block cache failed the whole completion naming
    gaps, while a gap past the context was dropped. The refused candidate takes no block (the cache is
    whole after) and leaves the answer as the fitting gaps alone give it."""
    async with local_editor_session(SHIPPED_MODEL, SMALL_KV) as (session, frames):
        _, _, err, result = await _answer(session, frames, 1, {**PARAMS, **sent, "temperature": 0})
        assert err is None and result["gap"] in fitting, err
        assert _free_blocks(session) == (12, 12)
        _, _, err, alone = await _answer(session, frames, 2, {**PARAMS, **sent, "gaps": fitting, "temperature": 0})
        assert err is None and (alone["gap"], alone["text"]) == (result["gap"], result["text"]), (alone, result)
        assert _free_blocks(session) == (12, 12)
