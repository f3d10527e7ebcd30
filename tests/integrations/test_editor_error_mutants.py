"""Gaps a mutation audit of the editor's KV refusal wording (editor/complete_request.completion_error)
found: each test fails on a small change to it that test_editor_kv_refusal.py (real engine) lets through.
Here the engine's errors are built as scheduler/submission.py raises them."""

from __future__ import annotations

from integrations.editor import protocol as rpc
from integrations.editor.complete_request import completion_error
from scheduler.api import InvalidRequestError

NEED = "prompt 12 + gen_length 256 tokens need 17 KV blocks, the cache has 12"


def test_a_gap_refusal_names_gaps_and_never_max_tokens():
    """The client chose the gaps and sent no max_tokens: nothing in the answer may name max_tokens (the
    field it never sent, which the refusal used to name)."""
    exc = InvalidRequestError("gen_length", f"{NEED}; ask for at most 166", asked=256, most=166)
    err = completion_error(exc, rpc.CompleteParams(uri="file:///a.py", prefix="x", gaps=(16, 256)))
    assert err.code == rpc.INVALID_PARAMS and err.data == {"field": "gaps"}
    assert "max_tokens" not in err.message and "gen_length" not in err.message, err.message
    assert err.message.endswith("; send gaps of at most 160 tokens"), err.message


def test_a_gen_length_refusal_without_a_most_is_answered():
    """A gen_length refusal that carries no `most` (a slot shape that does not fit: submission.py) is
    answered as INVALID_PARAMS on max_tokens, its text as the engine wrote it, not an error raised while
    answering (the request would get no answer)."""
    exc = InvalidRequestError("gen_length", "steps of slot_size 8 x serial_num_blocks 4 tokens do not fit: send "
                                            "slot_size 8 and serial_num_blocks 2 with gen_length at most 64")
    err = completion_error(exc, rpc.CompleteParams(uri="file:///a.py", prefix="x", max_tokens=256))
    assert err.code == rpc.INVALID_PARAMS and err.data == {"field": "max_tokens"}
    assert err.message.endswith("with max_tokens at most 64"), err.message
