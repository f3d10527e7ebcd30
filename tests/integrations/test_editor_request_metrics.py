"""The editor WebSocket's completions in the ingress's refusion_api_* metrics, and the request-log line of
an /infill that serves several candidates: the app on the shipped model in this process, served by
uvicorn (serve_testbed.local_app), a real WebSocket client, /metrics read as Prometheus reads it.

Editor completions were in no refusion_api_* family (only in the request log); now each counts under
endpoint="editor" by the status an HTTP route would have answered, with the figures it produced.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from serve_testbed import local_app
from test_request_log import line_of

from integrations import http_metrics
from integrations.editor import protocol as rpc
from integrations.editor.infill import build_infill_prompt
from integrations.engine_client import EngineUnavailableError, LocalEngineClient

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
WAIT_S = 120.0
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n"
# one candidate (max_tokens 8: one gap of 8), greedy AR: the same text every run
PARAMS = {"prefix": PREFIX, "suffix": SUFFIX, "mode": "ar", "temperature": 0, "max_tokens": 8}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present"),
]


class ScriptedClient(LocalEngineClient):
    """The engine's client, keeping the ids each engine request streamed (`streamed`). Once an engine
    request whose id starts with a prefix in `held` has streamed a delta with text, it waits until the
    test takes the prefix out (its completion has shown a partial and stays in flight); one whose id
    starts with a prefix in `lost` fails there instead, as a request does whose engine replica died
    (EngineUnavailableError, what ServeEngineClient raises then)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streamed: dict[str, list[int]] = {}
        self.held: set[str] = set()
        self.lost: set[str] = set()

    async def stream(self, req):
        def marked(prefixes: set[str]) -> bool:
            return any(req.request_id.startswith(prefix) for prefix in list(prefixes))

        async for delta in super().stream(req):
            self.streamed.setdefault(req.request_id, []).extend(delta.token_ids)
            yield delta
            if delta.text.strip():
                if marked(self.lost):
                    raise EngineUnavailableError("the engine replica serving this request stopped; retry", 2.0)
                while marked(self.held):
                    await asyncio.sleep(0.01)

    def tokens_of(self, completion_id: str) -> int:
        """The ids a completion's engine requests (`<id>-g<gap>`) streamed."""
        return sum(len(ids) for rid, ids in self.streamed.items() if rid.startswith(completion_id + "-g"))


@pytest.fixture(scope="module")
def log_lines():
    lines: list[dict] = []
    lock = threading.Lock()

    class Capture:
        def info(self, event: str, **fields) -> None:
            with lock:
                lines.append({"event": event, **fields})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_metrics, "request_log", Capture())
        yield lines


@pytest.fixture(scope="module")
def served(log_lines):
    with local_app(SHIPPED_MODEL, ScriptedClient) as app:
        yield app


def scrape(url: str) -> dict:
    """/metrics' refusion_api_* samples: (name, the labels' values in name order) -> value."""
    text = httpx.get(url + "/metrics", timeout=WAIT_S).text
    return {(s.name, *(v for _, v in sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("refusion_api_")}


def moved(before: dict, after: dict) -> dict:
    """The samples that moved, and by how much; a histogram by its count alone."""
    return {key: after[key] - before.get(key, 0) for key in after
            if after[key] != before.get(key, 0) and not key[0].endswith(("_sum", "_bucket"))}


async def _frames(ws, msg_id, until_partial: bool = False):
    """(partial texts, error, result) of msg_id, reading until its response (or its first partial)."""
    partials = []
    while True:
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), WAIT_S), raw=False)
        if frame[0] == rpc.NOTIFICATION and frame[2]["id"] == msg_id:
            partials.append(frame[2]["text"])
            if until_partial:
                return partials, None, None
        elif frame[0] == rpc.RESPONSE and frame[1] == msg_id:
            return partials, frame[2], frame[3]


async def test_editor_completions_count_under_their_own_endpoint(served, log_lines):
    """A completed, a cancelled, a failed (engine replica lost after its first text), a refused and an
    abandoned (the client leaves) `complete` move the refusion_api_* figures by exactly what each did:
    requests by status (200, 499, 503, 400, 499), the in-flight gauge up while one runs and back to 0,
    time to first token per completion that showed text, inter-token latency per later delta with ids,
    end-to-end latency for the one served, and tokens; each log line says the same."""
    client, url = served.client, served.url
    before = scrape(url)
    async with websockets.connect(url.replace("http://", "ws://") + "/v1/editor") as ws:
        await ws.send(rpc.encode_request(1, "initialize", {}))
        session = (await _frames(ws, 1))[2]["session_id"]
        ids = {n: f"ed-{session}-{n}" for n in range(1, 5)}  # the completions' ids, in the order they come
        await ws.send(rpc.encode_request(2, "complete", {"uri": "file:///a.py", **PARAMS}))
        done_partials, err, done = await _frames(ws, 2)
        assert err is None and done["text"] and done["request_id"] == ids[1], (err, done)
        client.held.add(ids[2] + "-")
        try:
            await ws.send(rpc.encode_request(3, "complete", {"uri": "file:///b.py", **PARAMS}))
            assert (await _frames(ws, 3, until_partial=True))[0]
            assert scrape(url)[("refusion_api_requests_in_flight", "editor")] == 1
            await ws.send(rpc.encode_request(4, "cancel", {"id": 3}))
            assert (await _frames(ws, 3))[1]["code"] == rpc.REQUEST_CANCELLED
        finally:
            client.held.clear()
        client.lost.add(ids[3] + "-")
        await ws.send(rpc.encode_request(5, "complete", {"uri": "file:///c.py", **PARAMS}))
        lost_partials, err, _ = await _frames(ws, 5)
        assert lost_partials and err["code"] == rpc.ENGINE_UNAVAILABLE, err
        await ws.send(rpc.encode_request(6, "complete", {"uri": 5, "prefix": "x"}))
        assert (await _frames(ws, 6))[1]["code"] == rpc.INVALID_PARAMS
        client.held.add(ids[4] + "-")
        await ws.send(rpc.encode_request(7, "complete", {"uri": "file:///d.py", **PARAMS}))
        assert (await _frames(ws, 7, until_partial=True))[0]
    try:
        left = await asyncio.to_thread(line_of, log_lines, ids[4])  # written once the server saw the close
    finally:
        client.held.clear()
    assert (left["outcome"], left["error"]) == ("cancelled", "client disconnected"), left
    after = scrape(url)

    prompt = build_infill_prompt(client.tokenizer, PREFIX, SUFFIX)
    prompt_tokens = len(prompt.prompt_ids) + len(prompt.suffix_ids or [])
    # the completed one fed a delta per partial, and one more where its answer went past the last partial
    deltas = len(done_partials) + (done["text"] != (done_partials[-1] if done_partials else ""))
    tokens = {n: client.tokens_of(ids[n]) for n in (2, 3, 4)}  # the others showed all they streamed
    assert moved(before, after) == {
        ("refusion_api_requests_total", "editor", "200"): 1, ("refusion_api_requests_total", "editor", "499"): 2,
        ("refusion_api_requests_total", "editor", "503"): 1, ("refusion_api_requests_total", "editor", "400"): 1,
        ("refusion_api_time_to_first_token_seconds_count", "editor"): 4,
        **({("refusion_api_inter_token_latency_seconds_count", "editor"): deltas - 1} if deltas > 1 else {}),
        ("refusion_api_e2e_latency_seconds_count", "editor"): 1,
        ("refusion_api_completion_tokens_total",): done["tokens"] + sum(tokens.values()),
        ("refusion_api_prompt_tokens_total",): 4 * prompt_tokens,  # all but the refused one ran
        ("refusion_api_mode_decisions_total", "ar"): 1,
        **({("refusion_api_tokens_per_forward_count",): 1} if done["tokens_per_forward"] is not None else {}),
    }
    assert after[("refusion_api_requests_in_flight", "editor")] == 0
    lines = {line["id"]: line for line in log_lines if line.get("session") == session}
    assert {i: (line["status"], line["completion_tokens"], line["ttft_ms"] is not None) for i, line in lines.items()} == {
        2: (200, done["tokens"], True), 3: (499, tokens[2], True), 5: (503, tokens[3], True), 6: (400, None, False),
        7: (499, tokens[4], True)}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n_predict, served_n", [(-1, 3), (8, 1)])
def test_an_infill_logs_the_candidates_it_served(served, log_lines, stream, n_predict, served_n):
    """/infill with n_cmpl 3 answers with 3 results (one per candidate gap), and its log line said
    `choices: 1`; now it says how many it served: 3, or 1 where n_predict 8 leaves one gap."""
    rid = f"cmpl3-{n_predict}-{stream}"
    body = {"input_prefix": "def add(a, b):\n", "prompt": "    ", "input_suffix": "\n", "n_cmpl": 3,
            "n_predict": n_predict, "temperature": 0, "mode": "ar", "stream": stream}
    answer = httpx.post(served.url + "/infill", json=body, headers={"X-Request-Id": rid}, timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    if stream:
        events = [json.loads(part.removeprefix("data: ")) for part in answer.text.split("\n\n") if part]
        results = {event["index"]: event for event in events if event["stop"]}
    else:
        results = {result["index"]: result for result in answer.json()}
    assert len(results) == served_n
    line = line_of(log_lines, rid)
    assert line["choices"] == served_n
    # usage sums the results served (it counted the chosen one alone), as OpenAI's sums n choices
    assert line["completion_tokens"] == sum(r["tokens_predicted"] for r in results.values()), (line, results)
