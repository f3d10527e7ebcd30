"""The editor session over a scripted engine: frames, streaming, cancel, supersession, telemetry.
(The same behaviour against the real Ray Serve app and engine: test_editor_serve.py.)"""

from __future__ import annotations

import threading

import msgpack
import pytest
from test_editor_fakes import bpe_tokenizer, fake_client  # noqa: F401 - fixtures

from integrations.editor import protocol as rpc
from integrations.editor.session import _KEEP_FINISHED, EditorSession
from scheduler.api import InvalidRequestError, OverloadedError, Priority


class Wire:
    """Collects what the session sends, decoded."""

    def __init__(self):
        self.frames: list = []

    async def send(self, data: bytes) -> None:
        self.frames.append(msgpack.unpackb(data, raw=False))

    def responses(self, msg_id=None):
        return [f for f in self.frames if f[0] == rpc.RESPONSE and (msg_id is None or f[1] == msg_id)]

    def partials(self, msg_id):
        return [f[2]["text"] for f in self.frames if f[0] == rpc.NOTIFICATION and f[2]["id"] == msg_id]


def complete_params(**over):
    params = {"uri": "file:///a.py", "prefix": "def add(a, b):\n    ", "suffix": "\n    return total\n",
              "multiline": True, "language": "python"}
    params.update(over)
    return params


@pytest.fixture
def session(fake_client):  # noqa: F811
    wire = Wire()
    return EditorSession(fake_client, wire.send), wire


async def test_initialize_announces_version_model_limits_capabilities(session):
    s, wire = session
    await s.handle_frame(rpc.encode_request(1, "initialize", {"client": {"name": "t"}}))
    [[_, msg_id, err, result]] = wire.responses()
    assert (msg_id, err) == (1, None)
    assert result["protocol_version"] == rpc.PROTOCOL_VERSION and result["model"] == "fake-model"
    assert result["limits"]["max_frame_bytes"] == rpc.Limits().max_frame_bytes
    assert "complete" in result["capabilities"]["methods"]


async def test_complete_streams_partials_then_final_result(session, fake_client):  # noqa: F811
    s, wire = session
    repeat = "total = a + b\n    return total\n"  # the suffix written again: the rule cuts it
    fake_client.script = {32: repeat, 64: repeat + "\n\ndef sub(a, b):\n    return a - b\n"}
    await s.handle_frame(rpc.encode_request(7, "complete", complete_params()))
    await s.drain()
    [[_, _, err, result]] = wire.responses(7)
    assert err is None
    assert result["text"] == "total = a + b" and result["stop_reason"] == "suffix"
    partials = wire.partials(7)
    assert partials and partials[-1] == "total = a + b"
    assert all(result["text"].startswith(p) or p.startswith(result["text"]) for p in partials)
    assert result["timings"]["first_partial_ms"] is not None and result["timings"]["total_ms"] > 0
    reqs = fake_client.requests
    assert {r.params["gen_length"] for r in reqs} == {32, 64}
    assert all(r.priority == Priority.INTERACTIVE and r.suffix_ids for r in reqs)
    # the repeat was detected while streaming: the 64 candidate was stopped early in the engine
    assert any(rid.endswith("-g64") for rid in fake_client.cancelled)


async def test_a_lone_surrogate_as_javascript_encodes_it_is_served_by_its_id(session, fake_client):  # noqa: F811
    """JavaScript msgpack encoders write a lone UTF-16 surrogate (a half-typed emoji) as 3 bytes that are
    not UTF-8: the frame was refused with id nil, so the client's request 77 was never answered. It is
    read with U+FFFD per bad byte and served."""
    s, wire = session
    fake_client.script = {32: "total = a + b\n    return total\n"}
    frame = rpc.encode_request(77, "complete", complete_params(prefix="s = 'XYZ'\ndef add(a, b):\n    "))
    await s.handle_frame(frame.replace(b"XYZ", b"\xed\xa0\x80"))  # U+D800 as WTF-8, same length
    await s.drain()
    [[_, msg_id, err, result]] = wire.responses()
    assert (msg_id, err) == (77, None) and result["text"] == "total = a + b"
    assert fake_client.tokenizer.decode(fake_client.requests[0].prompt_ids).startswith("s = '\ufffd\ufffd\ufffd'")


async def test_single_line_completion_stops_the_engine_at_the_newline(session, fake_client):  # noqa: F811
    s, wire = session
    fake_client.script = {16: "total = a + b\n    more = 1\n    and_more = 2\n"}
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await s.drain()
    [[_, _, err, result]] = wire.responses(1)
    assert err is None and result["text"] == "total = a + b" and result["stop_reason"] == "newline"
    assert fake_client.cancelled == [fake_client.requests[0].request_id]


async def test_cancel_answers_request_cancelled_and_cancels_in_engine(session, fake_client, wait_until):  # noqa: F811
    s, wire = session
    fake_client.hold = threading.Event()  # the request stays in the engine until cancelled
    fake_client.default_text = "x = 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8\n"
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await wait_until(lambda: fake_client.requests, "the completion to reach the engine")
    await s.handle_frame(rpc.encode_request(2, "cancel", {"id": 1}))
    await s.drain()
    assert wire.responses(2)[0][3] == {"cancelled": True}
    [[_, _, err, _]] = wire.responses(1)
    assert err["code"] == rpc.REQUEST_CANCELLED and err["data"]["reason"] == "cancelled"
    assert fake_client.cancelled and not fake_client.completed
    await s.handle_frame(rpc.encode_request(3, "cancel", {"id": 1}))  # idempotent
    assert wire.responses(3)[0][3] == {"cancelled": False}


async def test_new_complete_for_same_uri_supersedes_at_once(session, fake_client, wait_until):  # noqa: F811
    s, wire = session
    fake_client.hold = threading.Event()  # request 1 is in the engine, unfinished, when 2 supersedes it
    fake_client.default_text = "value = compute(a, b, c, d, e)\n"
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await wait_until(lambda: fake_client.requests, "the completion to reach the engine")
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(multiline=False, prefix="def add(a, b):\n    v")))
    # a cancel of 1 before its superseded task ends: it was taken as the reason (helper-197)
    await s.handle_frame(rpc.encode_request(9, "cancel", {"id": 1}))
    fake_client.hold.set()  # request 1's task was cancelled above: only 2 and 3 run on
    await s.handle_frame(rpc.encode_request(3, "complete", complete_params(multiline=False, uri="file:///other.py")))
    await s.drain()
    [[_, _, err1, _]] = wire.responses(1)
    assert err1["code"] == rpc.REQUEST_CANCELLED
    assert err1["data"] == {"reason": "superseded", "superseded_by": 2}
    assert wire.responses(9)[0][3] == {"cancelled": False}  # already superseded
    assert wire.responses(2)[0][2] is None and wire.responses(3)[0][2] is None  # other uri untouched
    first_engine_id = fake_client.requests[0].request_id
    assert first_engine_id in fake_client.cancelled and first_engine_id not in fake_client.completed


@pytest.mark.parametrize(
    "frame, code",
    [
        ("text frame", rpc.PARSE_ERROR),
        (b"\xc1\xc1\xc1", rpc.PARSE_ERROR),
        (msgpack.packb({"not": "an array"}), rpc.INVALID_REQUEST),
        (msgpack.packb([0, 1, "complete"]), rpc.INVALID_REQUEST),
        (msgpack.packb([0, 1.5, "initialize", {}]), rpc.INVALID_REQUEST),
        (rpc.encode_request(4, "no/such/method", {}), rpc.METHOD_NOT_FOUND),
        (rpc.encode_request(5, "complete", {"prefix": "x"}), rpc.INVALID_PARAMS),
        (rpc.encode_request(6, "complete", {"uri": "u", "prefix": 3}), rpc.INVALID_PARAMS),
        (rpc.encode_request(7, "complete", {"uri": "u", "prefix": "", "max_tokens": 10**6}), rpc.INVALID_PARAMS),
        (rpc.encode_request(8, "complete", {"uri": "u", "prefix": "", "mode": "fast"}), rpc.INVALID_PARAMS),
        (rpc.encode_request(9, "complete", {"uri": "u", "prefix": "", "context": [{"path": 1}]}), rpc.INVALID_PARAMS),
        (rpc.encode_request(10, "cancel", {}), rpc.INVALID_PARAMS),
        (rpc.encode_request(11, "complete", {"uri": "u", "prefix": "x" * (2 << 20)}), rpc.MESSAGE_TOO_LARGE),
    ],
)
async def test_bad_frames_get_error_responses_and_the_session_lives_on(session, frame, code):
    s, wire = session
    await s.handle_frame(frame)
    [[kind, msg_id, err, result]] = wire.responses()
    assert kind == rpc.RESPONSE and result is None and err["code"] == code and err["message"]
    if code == rpc.MESSAGE_TOO_LARGE:  # answered with its id (it was nil: "exactly one per request", helper-125)
        assert msg_id == 11
    await s.handle_frame(rpc.encode_request(99, "initialize", {}))
    assert wire.responses(99)[0][2] is None


async def test_invalid_params_error_names_the_field(session):
    s, wire = session
    await s.handle_frame(rpc.encode_request(1, "complete", {"uri": "u", "prefix": "", "max_tokens": 0}))
    err = wire.responses(1)[0][2]
    assert err["data"]["field"] == "max_tokens" and "between 1 and" in err["message"]


@pytest.mark.parametrize("field, message, named, says", [
    ("prompt_ids", "prompt (2006 tokens) + suffix (40) + gen_length (64) need 131 KV blocks but the engine's KV cache "
                   "has 46 (the runner's num_blocks or kv_memory_bytes); shorten the prompt",
     "prefix", "+ max_tokens (64) need 131 KV blocks but the engine's KV cache has 46 (the runner's num_blocks or "
               "kv_memory_bytes); send a shorter prefix, suffix or context"),
    ("gen_length", "prompt (20 tokens) + gen_length (64) need 9 KV blocks but the engine's KV cache has 6 "
                   "(the runner's num_blocks or kv_memory_bytes); ask for at most 16",
     "max_tokens", "+ max_tokens (64) need 9 KV blocks"),
])
async def test_a_kv_refusal_names_the_protocols_fields(session, fake_client, field, message, named, says):  # noqa: F811
    """A KV cache smaller than the editor's prompt budgets refused with the engine's `prompt_ids` and
    `gen_length`, which no editor sends."""
    s, wire = session
    fake_client.fail_with = InvalidRequestError(field, message)
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await s.drain()
    err = wire.responses(1)[0][2]
    assert err["code"] == rpc.INVALID_PARAMS and err["data"]["field"] == named, err
    assert says in err["message"] and "gen_length" not in err["message"] and "prompt_ids" not in err["message"], err


@pytest.mark.parametrize("params, says", [({}, "is required"), ({"id": [1]}, "must be an integer or a string")])
async def test_a_bad_cancel_id_is_named_for_what_is_wrong_with_it(session, params, says):
    s, wire = session
    await s.handle_frame(rpc.encode_request(1, "cancel", params))
    err = wire.responses(1)[0][2]
    assert err["data"]["field"] == "id" and says in err["message"]


@pytest.mark.parametrize(
    "exc, code",
    [(InvalidRequestError("gen_length", "too long for the context"), rpc.INVALID_PARAMS),
     (OverloadedError("queue full", 2.5), rpc.OVERLOADED)],
)
async def test_engine_errors_map_to_error_codes(session, fake_client, exc, code):  # noqa: F811
    s, wire = session
    fake_client.fail_with = exc
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await s.drain()
    err = wire.responses(1)[0][2]
    assert err["code"] == code
    if code == rpc.OVERLOADED:
        assert err["data"]["retry_after_s"] == 2.5


async def test_a_completion_a_stopping_engine_cut_is_overloaded_to_retry(session, fake_client):  # noqa: F811
    """The shortest gap's candidate (its partials were shown) ended by a stopping engine at its drain
    timeout: OVERLOADED with retry_after_s (a retry reaches a running replica), not the partial text as
    if the model had stopped there. A longer gap's cut candidate is dropped, even where its text extends
    the shortest's: the shortest's answers."""
    s, wire = session
    fake_client.default_text = "value = compute(alpha, beta, gamma, delta, epsilon, zeta, eta, theta)"
    fake_client.stopped_at = {16: 0}
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False, gaps=[16, 32])))
    await s.drain()
    [[_, _, err, result]] = wire.responses(1)
    assert result is None and err["code"] == rpc.OVERLOADED and err["data"] == {"retry_after_s": 1.0}
    assert "engine stopped" in err["message"]
    fake_client.stopped_at = {32: 24}  # cut past the shortest gap's end
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(multiline=False, gaps=[16, 32])))
    await s.drain()
    [[_, _, err, result]] = wire.responses(2)
    ids = fake_client.tokenizer.encode(fake_client.default_text, add_special_tokens=False)
    assert len(ids) > 24 and err is None and (result["gap"], result["stop_reason"]) == (16, "length")
    assert result["text"] == fake_client.tokenizer.decode(ids[:16])


async def test_inflight_limit_per_connection(fake_client):  # noqa: F811
    wire = Wire()
    fake_client.delay_s = 0.05
    s = EditorSession(fake_client, wire.send, rpc.Limits(max_inflight=1))
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(uri="a")))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="b")))
    assert wire.responses(2)[0][2]["code"] == rpc.TOO_MANY_REQUESTS
    await s.close()


async def test_accept_and_reject_are_recorded_and_checked(session, fake_client):  # noqa: F811
    s, wire = session
    fake_client.default_text = "total = 1\n"
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await s.drain()
    text = wire.responses(1)[0][3]["text"]
    await s.handle_frame(rpc.encode_request(2, "accept", {"id": 1, "accepted_length": len(text)}))
    await s.handle_frame(rpc.encode_request(3, "reject", {"id": 1}))
    await s.handle_frame(rpc.encode_request(4, "accept", {"id": 1, "accepted_length": len(text) + 5}))
    assert wire.responses(2)[0][3] == {"ok": True, "known": True}
    assert wire.responses(4)[0][2]["data"]["field"] == "accepted_length"
    # once per completion: the reject after the accept and the refused accept are not counted again
    assert s.feedback == {"accept": 1, "reject": 0, "accepted_chars": len(text)}
    await s.handle_frame(rpc.encode_request(5, "complete", complete_params(uri="file:///b.py", multiline=False)))
    await s.drain()
    for msg_id, accepted in ((6, 2), (7, 5), (8, 3)):  # a partial accept growing, then a shorter repeat
        await s.handle_frame(rpc.encode_request(msg_id, "accept", {"id": 5, "accepted_length": accepted}))
    await s.handle_frame(rpc.encode_request(9, "reject", {"id": "never-sent"}))
    assert s.feedback == {"accept": 2, "reject": 1, "accepted_chars": len(text) + 5}


async def test_feedback_knows_the_last_keep_finished_completions(session, fake_client):  # noqa: F811
    """Exactly the last _KEEP_FINISHED finished completions are remembered for accept/reject: the one
    before them is unknown."""
    s, wire = session
    fake_client.default_text = "x\n"
    count = _KEEP_FINISHED + 1
    for msg_id in range(1, count + 1):
        await s.handle_frame(rpc.encode_request(msg_id, "complete", complete_params(uri=f"file:///{msg_id}.py")))
        await s.drain()  # finished in id order
    for msg_id in (1, 2, count):
        await s.handle_frame(rpc.encode_request(f"r{msg_id}", "reject", {"id": msg_id}))
    assert [wire.responses(f"r{m}")[0][3]["known"] for m in (1, 2, count)] == [False, True, True]


async def test_close_cancels_everything_in_flight(fake_client, wait_until):  # noqa: F811
    wire = Wire()
    fake_client.hold = threading.Event()  # both candidates stay in the engine until the close
    s = EditorSession(fake_client, wire.send)
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await wait_until(lambda: len(fake_client.requests) == 2, "both candidate gaps to reach the engine")
    await s.close()
    assert not s.inflight and len(fake_client.cancelled) == 2 and not wire.responses(1)


async def test_explicit_gaps_override_the_strategy(session, fake_client):  # noqa: F811
    s, wire = session
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(gaps=[40, 8, 40])))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="b", gaps=[0])))
    await s.drain()
    assert sorted(r.params["gen_length"] for r in fake_client.requests) == [8, 40]
    assert wire.responses(2)[0][2]["data"]["field"] == "gaps"


async def test_explicit_gaps_are_capped_by_max_tokens(session, fake_client):  # noqa: F811
    """A gap of 256 with max_tokens 64 decoded 256 tokens to return 64, and a KV cache that could not
    hold it refused naming max_tokens (64: the client could lower nothing it sent)."""
    s, wire = session
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(gaps=[16, 256], max_tokens=40)))
    await s.drain()
    assert sorted(r.params["gen_length"] for r in fake_client.requests) == [16, 40]
    assert all(r.max_tokens == 40 for r in fake_client.requests)


async def test_a_superseded_completion_ending_leaves_its_successor_supersedable(session, fake_client, wait_until):  # noqa: F811
    """1 ends (superseded by 2) while 2 runs: its bookkeeping must not forget that 2 is the uri's completion,
    or a third completion on the uri runs beside 2 instead of superseding it."""
    s, wire = session
    fake_client.hold = threading.Event()  # every request stays in the engine until released
    fake_client.default_text = "value = compute(a, b, c, d, e)\n"
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await wait_until(lambda: fake_client.requests, "the completion to reach the engine")
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(multiline=False)))
    await wait_until(lambda: wire.responses(1), "the superseded completion to answer")
    await wait_until(lambda: len(fake_client.requests) == 2, "the second completion to reach the engine")
    await s.handle_frame(rpc.encode_request(3, "complete", complete_params(multiline=False)))
    fake_client.hold.set()
    await s.drain()
    [[_, _, err2, _]] = wire.responses(2)
    assert err2 is not None and err2["data"] == {"reason": "superseded", "superseded_by": 3}
    assert wire.responses(3)[0][2] is None and wire.responses(3)[0][3]["text"]


async def test_supersession_frees_the_slot_under_the_inflight_limit(fake_client):  # noqa: F811
    wire = Wire()
    fake_client.delay_s = 0.05
    s = EditorSession(fake_client, wire.send, rpc.Limits(max_inflight=1))
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(multiline=False)))
    await s.drain()
    assert wire.responses(1)[0][2]["data"]["reason"] == "superseded"
    assert wire.responses(2)[0][2] is None


async def test_max_tokens_caps_the_text_and_stops_a_longer_gap(session, fake_client):  # noqa: F811
    """A gap rounded up to whole slots (max_tokens 10: 16) is stopped in the engine at the cap; a gap
    equal to the cap ends on its own."""
    s, wire = session
    fake_client.default_text = "value = compute(alpha, beta, gamma, delta, epsilon)\n"
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(max_tokens=10, gaps=[16])))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="b", max_tokens=8)))
    await s.drain()
    r1, r2 = wire.responses(1)[0][3], wire.responses(2)[0][3]
    ids = fake_client.tokenizer.encode(fake_client.default_text, add_special_tokens=False)
    assert len(ids) > 16 and r1["tokens"] == 10 and r1["text"] == fake_client.tokenizer.decode(ids[:10])
    [capped] = [r for r in fake_client.requests if "-1-g" in r.request_id]  # (the first request)
    assert capped.params["gen_length"] == 16 and r1["stop_reason"] == "length"
    assert capped.request_id in fake_client.cancelled and capped.request_id not in fake_client.completed
    # gap == cap (8): the engine ends on its own, so its final stats still arrive
    assert r2["tokens"] == 8 and r2["tokens_per_forward"] is not None


async def test_overloaded_candidates_are_dropped_when_another_was_admitted(session, fake_client):  # noqa: F811
    s, wire = session
    original = fake_client.stream

    def stream(req):
        if req.params["gen_length"] == 64:
            fake_client.requests.append(req)
            raise OverloadedError("queue full", 1.0)
        return original(req)

    fake_client.stream = stream
    fake_client.script = {32: "total = a + b\n    return total\n"}
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await s.drain()
    [[_, _, err, result]] = wire.responses(1)
    assert err is None and result["text"] == "total = a + b" and result["gap"] == 32


async def test_healed_indentation_is_not_doubled(session, fake_client):  # noqa: F811
    s, wire = session
    fake_client.script = {16: "    total = a + b\n"}  # the model writes the indentation it was not given
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(multiline=False)))
    await s.drain()
    assert wire.responses(1)[0][3]["text"] == "total = a + b"
    assert fake_client.tokenizer.decode(fake_client.requests[0].prompt_ids).endswith("def add(a, b):\n")


async def test_ids_1_and_string_1_are_different_requests(session, fake_client):  # noqa: F811
    """The protocol's ids are ints or strings: 1 and "1" in flight together are two requests (their
    engine request ids once collided and the second was refused naming an internal field)."""
    s, wire = session
    fake_client.hold = threading.Event()
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(uri="file:///a.py", multiline=False)))
    await s.handle_frame(rpc.encode_request("1", "complete", complete_params(uri="file:///b.py", multiline=False)))
    fake_client.hold.set()
    await s.drain()
    assert [r[2] for r in wire.responses()] == [None, None]  # both results, no error
    assert sorted(str(r[1]) for r in wire.responses()) == ["1", "1"]
    engine_ids = [req.request_id for req in fake_client.requests]
    assert len(engine_ids) == len(set(engine_ids)) >= 2


async def test_a_whitespace_only_completion_inserts_nothing(session, fake_client):  # noqa: F811
    """Blanks alone are nothing to insert: the editor owns the indentation (three spaces after a line
    once reached the editor as a completion)."""
    s, wire = session
    fake_client.default_text = "   "
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(prefix="import os\n", suffix="")))
    await s.drain()
    result = wire.responses(1)[0][3]
    assert result["text"] == "" and result["tokens"] > 0


async def test_truncated_says_whether_the_prefix_was_cut_to_the_context(fake_client):  # noqa: F811
    """`truncated` (llama.cpp's field) is true when the prompt was cut to fit the model's context."""
    wire = Wire()
    s = EditorSession(fake_client, wire.send, context_length=96)
    long_prefix = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(200))
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(prefix=long_prefix, gaps=[8])))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="file:///b.py", gaps=[8])))
    await s.drain()
    cut, whole = wire.responses(1)[0][3], wire.responses(2)[0][3]
    assert cut["truncated"] is True and whole["truncated"] is False
    [long_request] = [r for r in fake_client.requests if "-1-g" in r.request_id]  # (tokenized off the loop: any order)
    assert len(long_request.prompt_ids) < 96


async def test_result_echoes_the_document_version(session, fake_client):  # noqa: F811
    s, wire = session
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params(version=42, multiline=False)))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="file:///b.py", multiline=False)))
    await s.drain()
    assert wire.responses(1)[0][3]["version"] == 42 and "version" not in wire.responses(2)[0][3]


@pytest.mark.parametrize("over, shrinks", [({}, True), ({"max_tokens": 32}, False), ({"gaps": [32]}, False)])
async def test_an_unset_length_lets_the_engine_shrink_a_gap_to_its_kv_cache(session, fake_client, over, shrinks):  # noqa: F811
    """No max_tokens and no gaps: the candidates' lengths are the server's, so the engine may shrink one
    its KV cache cannot hold (fit_to_kv), as an unset max_tokens shrinks; a length the client set is not
    shrunk (a small cache refuses it, naming it). Found by the KV-pressure break-test: infill with no
    length was refused, naming a length the client never sent."""
    s, wire = session
    fake_client.script = {32: "total = a + b\n"}
    await s.handle_frame(rpc.encode_request(3, "complete", complete_params(**over)))
    await s.drain()
    [[_, _, err, _]] = wire.responses(3)
    assert err is None
    assert fake_client.requests and all(r.fit_to_kv is shrinks for r in fake_client.requests)


async def test_each_connection_is_its_own_client_of_the_engine(fake_client):  # noqa: F811
    """The engine's fair share (scheduler.api.GenerationRequest.client) sees each editor connection as
    one client: both candidates of a completion and every completion of a connection carry its key,
    another connection another key."""
    fake_client.script = {32: "total = a + b\n", 64: "total = a + b\n"}
    one, other = EditorSession(fake_client, Wire().send), EditorSession(fake_client, Wire().send)
    await one.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await one.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="file:///b.py")))
    await other.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await one.drain()
    await other.drain()
    by_client: dict = {}
    for r in fake_client.requests:  # engine ids ed-<connection>-<n>-g<gap>
        by_client.setdefault(r.client, set()).add(r.request_id.split("-")[1])
    assert by_client == {f"editor:{one.session_id}": {one.session_id}, f"editor:{other.session_id}": {other.session_id}}
    assert sorted(sum(r.client == f"editor:{s.session_id}" for r in fake_client.requests) for s in (one, other)) == [2, 4]


async def test_a_client_that_left_is_sent_nothing_more(fake_client, wait_until):  # noqa: F811
    """A client cancels two completions and leaves before their cancellation answers go out: the first
    failed send (the transport's `gone` error) closes the session's sending, the other answer is not
    attempted, and no send task fails (each was logged as a task exception never retrieved)."""
    import asyncio

    class Gone(Exception):
        pass

    fake_client.hold = threading.Event()  # both completions wait in the engine
    attempts, left = [], False

    async def send(frame: bytes) -> None:
        if left:
            attempts.append(frame)
            raise Gone
    s = EditorSession(fake_client, send, gone=(Gone,))
    await s.handle_frame(rpc.encode_request(1, "complete", complete_params()))
    await s.handle_frame(rpc.encode_request(2, "complete", complete_params(uri="file:///b.py")))
    await wait_until(lambda: len(fake_client.requests) == 4, "both completions in the engine")
    await s.handle_frame(rpc.encode_request(3, "cancel", {"id": 1}))
    await s.handle_frame(rpc.encode_request(4, "cancel", {"id": 2}))
    left = True
    senders = list(s._background) + [e.task for e in s.inflight.values()]
    await s.drain()
    await asyncio.gather(*senders, return_exceptions=True)
    assert len(attempts) == 1 and s._closed
    assert all(t.cancelled() or t.exception() is None for t in senders)
    await s.close()
    fake_client.hold.set()


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|mask|>", "<|beginoftext|>"])
async def test_special_token_text_in_the_document_is_plain_text(session, fake_client, special):  # noqa: F811
    """prefix, suffix and context chunks are document text: a special token's spelling in them is its
    characters (the ids of /tokenize with parse_special false), never a real EOS, BOS or mask position."""
    s, wire = session
    tok = fake_client.tokenizer
    doc = f"EOS = '{special}'\nx = 1\n"

    def plain(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    fake_client.script = {32: "y = 2\n"}
    await s.handle_frame(rpc.encode_request(5, "complete", complete_params(
        prefix=doc, suffix=doc, context=[{"path": "", "text": doc}], gaps=[32])))
    await s.drain()
    [[_, _, err, _]] = wire.responses(5)
    assert err is None
    req = fake_client.requests[0]
    assert req.prompt_ids == plain(doc + "\n") + plain(doc) and req.suffix_ids == plain(doc)
    assert tok.convert_tokens_to_ids(special) not in req.prompt_ids + req.suffix_ids
