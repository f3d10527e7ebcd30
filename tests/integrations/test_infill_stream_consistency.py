"""Streamed and whole infill results are the same text (issue 14, item 4).

The infill path decodes several candidate gaps and keeps one; partials stream from the shortest gap.
A stream cannot take text back (llama.cpp's /infill and OpenAI's SSE send only new text), so every
partial must be a prefix of the final text, and the streamed and non-streamed requests must choose
the same completion. Unit checks of the rules first, then the real Ray Serve app (serve_base_url):
/infill (llama.cpp), /v1/completions with `suffix`, and the editor WebSocket.
"""

from __future__ import annotations

import json

import httpx
import msgpack
import pytest
import websockets

from integrations.editor import protocol as rpc
from integrations.editor.infill import Candidate, choose_candidate
from integrations.editor.postprocess import Rules, postprocess, shown_partial

# The issue's example: the cursor inside `with open(` with `) as f:` after it on the same line.
EXAMPLE = {"input_prefix": "import os\n\n\ndef read(path):\n", "prompt": "    with open(",
           "input_suffix": ") as f:\n        return f.read()\n", "temperature": 0}
DOCUMENTS = [
    EXAMPLE,
    {"input_prefix": "def mean(xs):\n", "prompt": "    ", "input_suffix": "\n    return total / len(xs)\n",
     "temperature": 0},
    {"input_prefix": "class Stack:\n    def __init__(self):\n", "prompt": "        self.",
     "input_suffix": "\n\n    def push(self, x):\n        self.items.append(x)\n", "temperature": 0},
]


# ---- rules: a partial never shows what the final result drops --------------------------------------

# (raw model text, suffix): each final rule (rest of the cursor line, suffix-start tail, a multi-line
# suffix anchor at the end) drops text an earlier partial could have shown.
CASES = [
    ("path) as f:\n        return f.read()\n", EXAMPLE["input_suffix"]),
    ("path, 'r') as f:", EXAMPLE["input_suffix"]),
    ("total = sum(xs)\n    return total / len(", "\n    return total / len(xs)\n"),
    ("x = 1; return total", "\nreturn total\n"),
    ("if x:\n    y = 2\n}\n", "\n}\nreturn x\n"),
    ("a = 1\n  \n b = 2", "\n}\n"),
]


def _partials(raw: str, rules: Rules) -> tuple[list[str], str]:
    """Every partial the runner could show while `raw` streams in (one character at a time, so every
    split point is covered), and the final text, as integrations/editor/runner.decode_candidate does."""
    shown, text = [], ""
    for end in range(1, len(raw) + 1):
        processed = postprocess(raw[:end], rules)
        text = processed.text
        if processed.cut:
            break
        shown.append(shown_partial(text, rules.suffix))
    return shown, postprocess(text, rules, final=True).text


@pytest.mark.parametrize("raw, suffix", CASES)
def test_every_partial_is_a_prefix_of_the_final_text(raw, suffix):
    shown, final = _partials(raw, Rules(suffix=suffix))
    assert all(final.startswith(p) for p in shown), (final, [p for p in shown if not final.startswith(p)])


def test_the_issue_example_partials_never_show_the_rest_of_the_cursor_line():
    shown, final = _partials("path) as f:\n        return f.read()\n", Rules(suffix=EXAMPLE["input_suffix"]))
    assert final == "path" and shown[-1] == "path"


def test_choice_keeps_the_streamed_gap_unless_a_longer_one_extends_it():
    short_open = Candidate(32, "if x:\n    return", "length")
    other = Candidate(64, "while True:\n    pass", "stop")  # closed, but not what was streamed
    extends = Candidate(64, "if x:\n    return 1", "stop")
    assert choose_candidate([other, short_open]) is short_open
    assert choose_candidate([extends, short_open]) is extends
    blank = Candidate(32, "  ", "length")  # nothing visible was streamed: any candidate may win
    assert choose_candidate([blank, other]) is other


def test_a_longer_gap_replaces_the_streamed_one_only_when_its_ids_extend_the_streamed_ids_too():
    # Streamed events carry the shortest gap's ids (/infill's `tokens`): a longer gap whose text extends
    # it but whose model split that text into other tokens would make the stream's ids differ from the
    # non-streamed result's
    short_open = Candidate(32, "x = ss", "length", token_ids=[1, 2, 2])
    same_ids = Candidate(64, "x = ss + 1", "stop", token_ids=[1, 2, 2, 3])
    other_ids = Candidate(64, "x = ss + 1", "stop", token_ids=[1, 4, 3])
    assert choose_candidate([short_open, same_ids]) is same_ids
    assert choose_candidate([short_open, other_ids]) is short_open


# ---- the real app -----------------------------------------------------------------------------------

def _events(body: str) -> list[dict]:
    return [json.loads(part[len("data: "):]) for part in body.split("\n\n") if part.startswith("data: ")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "refusion"])
@pytest.mark.parametrize("doc", range(len(DOCUMENTS)))
async def test_infill_streamed_equals_not_streamed(serve_base_url, doc, mode):
    # `mode` pinned: with "auto" the engine's router may pick another decoder for the second request.
    body = dict(DOCUMENTS[doc], mode=mode, return_tokens=True)
    async with httpx.AsyncClient(base_url=serve_base_url, timeout=120) as http:
        whole = (await http.post("/infill", json=body)).json()
        streamed = await http.post("/infill", json={**body, "stream": True})
    events = _events(streamed.text)
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    # llama.cpp: in streaming mode each event's `content` is the next text; joined, the completion.
    assert "".join(e["content"] for e in events) == whole["content"]
    assert [t for e in events for t in e["tokens"]] == whole["tokens"]  # the generated ids, likewise
    final = events[-1]
    assert final["stop_type"] == whole["stop_type"] and final["tokens_predicted"] == whole["tokens_predicted"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "refusion"])
async def test_completions_with_suffix_streamed_equals_not_streamed(serve_base_url, mode):
    body = {"prompt": EXAMPLE["input_prefix"] + EXAMPLE["prompt"], "suffix": EXAMPLE["input_suffix"],
            "max_tokens": 48, "temperature": 0, "mode": mode}
    async with httpx.AsyncClient(base_url=serve_base_url, timeout=120) as http:
        whole = (await http.post("/v1/completions", json=body)).json()
        streamed = await http.post("/v1/completions", json={**body, "stream": True})
    chunks = [e for e in _events(streamed.text.replace("data: [DONE]", "")) if e.get("choices")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


@pytest.mark.slow
async def test_editor_partials_are_prefixes_of_the_result_and_it_matches_infill(serve_base_url):
    params = {"uri": "file:///read.py", "prefix": EXAMPLE["input_prefix"] + EXAMPLE["prompt"],
              "suffix": EXAMPLE["input_suffix"], "multiline": True, "mode": "ar", "temperature": 0}
    async with websockets.connect(serve_base_url.replace("http://", "ws://") + "/v1/editor") as ws:
        await ws.send(rpc.encode_request(1, "complete", params))
        partials = []
        while (frame := msgpack.unpackb(await ws.recv(), raw=False))[0] != rpc.RESPONSE:
            partials.append(frame[2]["text"])
    result = frame[3]
    assert frame[2] is None and all(result["text"].startswith(p) for p in partials)
    async with httpx.AsyncClient(base_url=serve_base_url, timeout=120) as http:
        infill = (await http.post("/infill", json={**EXAMPLE, "mode": "ar"})).json()
    # /infill returns the model's text as llama.cpp does; the editor ends before bytes that are no UTF-8
    # (the random model writes them greedily here), which it would otherwise insert as U+FFFD
    assert result["stop_reason"] == "invalid" and "\ufffd" in infill["content"]
    assert infill["content"].split("\ufffd")[0] == result["text"]
