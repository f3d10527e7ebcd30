"""/infill's `tokens` are the ids the model generated for the returned text, as llama.cpp's server
returns them, streamed or not (integrations/editor/llama_compat.py, `_result`).

The shipped model in-process (greedy, `mode` pinned) behind the real app on a local uvicorn; the engine
client records every id the engine streamed per candidate, so the test can hold `tokens` beside them.
Cases where post-processing cuts the text (the suffix repeat, trailing line breaks) and where it
restyles it (a CRLF document gets back CRLF line breaks from the model's LF text).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from integrations.editor.infill import heal_text
from integrations.engine_client import LocalEngineClient

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="shipped model not present"),
]

# Greedy completions of the shipped model (`mode` pinned), each checked by the tests below:
# MEAN: the text's end repeats the start of the suffix (`\n    return`) and is cut; the cursor sits in
# indentation, which token healing leaves out of the prompt. STACK: the longer gap extends the streamed
# one and its trailing line break is dropped. OPEN_AS: the rest of the cursor line (`:`) is cut, and the
# prompt's last space is healed. SPLIT (ReFusion): nothing cut or restyled, but the model wrote `ss` as two
# tokens where the tokenizer makes one.
MEAN = {"input_prefix": "def mean(xs):\n", "prompt": "    ", "input_suffix": "\n    return total / len(xs)\n"}
STACK = {"input_prefix": "class Stack:\n    def __init__(self):\n", "prompt": "        self.",
         "input_suffix": "\n\n    def push(self, x):\n        self.items.append(x)\n"}
OPEN_AS = {"input_prefix": "def f(path):\n    with open(path) as ", "input_suffix": ":\n        return f.read()\n"}
SPLIT = {"input_prefix": "def f(s):\n    return s.", "input_suffix": "()\n"}


class RecordingClient(LocalEngineClient):
    """A LocalEngineClient that keeps the ids each engine request streamed (`generated[request_id]`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated: dict[str, list[int]] = {}

    async def stream(self, req):
        self.generated[req.request_id] = []
        async for delta in super().stream(req):
            self.generated[req.request_id] += list(delta.token_ids)
            yield delta


@pytest.fixture(scope="module")
def served():
    """(base url, RecordingClient) of the app on the shipped model, served by uvicorn in a thread whose
    event loop also runs the engine (serve_testbed.local_app)."""
    from serve_testbed import local_app

    with local_app(SHIPPED_MODEL, RecordingClient) as app:
        yield app.url, app.client


def _crlf(doc: dict) -> dict:
    return {k: v.replace("\n", "\r\n") for k, v in doc.items()}


def _infill(served, doc: dict, rid: str, mode: str = "ar", stream: bool = False) -> tuple[dict, dict[str, list[int]]]:
    """(the result, its final event when streamed, with `tokens` and `content` joined over the events;
    the ids each candidate generated, by engine request id)."""
    url, client = served
    body = {**doc, "temperature": 0, "mode": mode, "return_tokens": True, "stream": stream}
    resp = httpx.post(url + "/infill", json=body, headers={"X-Request-Id": rid}, timeout=120)
    assert resp.status_code == 200, resp.text
    generated = {k: v for k, v in client.generated.items() if k.startswith(rid + ".")}
    if not stream:
        return resp.json(), generated
    events = [json.loads(part[len("data: "):]) for part in resp.text.split("\n\n") if part.startswith("data: ")]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    joined = {"content": "".join(e["content"] for e in events), "tokens": [t for e in events for t in e["tokens"]]}
    return {**events[-1], **joined}, generated


def _model_text(served, tokens: list[int], healed: str) -> str:
    """The text of `tokens` as the returned content has it in the model's style: the blanks token healing
    left out of the prompt (`healed`), which the model wrote, dropped."""
    return heal_text(served[1].tokenizer.decode(tokens, skip_special_tokens=True), healed)


def _candidate_of(tokens: list[int], generated: dict[str, list[int]]) -> list[int]:
    """The generated ids of the candidate whose start `tokens` is."""
    found = [ids for ids in generated.values() if ids[: len(tokens)] == tokens]
    assert found, (tokens, generated)
    return found[0]


@pytest.mark.parametrize("name, mode", [("mean", "ar"), ("mean", "refusion"), ("mean-crlf", "ar"),
                                        ("mean-crlf", "refusion"), ("stack-crlf", "ar"), ("split", "refusion")])
def test_streamed_tokens_add_up_to_the_whole_results_and_are_generated_ids(served, name, mode):
    doc = {"mean": MEAN, "mean-crlf": _crlf(MEAN), "stack-crlf": _crlf(STACK), "split": SPLIT}[name]
    whole, generated = _infill(served, doc, f"whole-{name}-{mode}", mode)
    streamed, streamed_generated = _infill(served, doc, f"stream-{name}-{mode}", mode, stream=True)
    assert streamed["content"] == whole["content"] and whole["content"].strip()
    assert streamed["tokens"] == whole["tokens"]
    _candidate_of(whole["tokens"], generated)
    _candidate_of(streamed["tokens"], streamed_generated)


def test_a_suffix_repeat_cut_returns_the_generated_ids_of_the_kept_text(served):
    whole, generated = _infill(served, MEAN, "mean-cut")
    content, tokens = whole["content"], whole["tokens"]
    assert content.endswith("return x.shape") and whole["stop_type"] == "limit"  # `\n    return` cut
    ids = _candidate_of(tokens, generated)
    assert len(tokens) < len(ids)  # the ids of the cut text are not returned
    # the cut falls between tokens here; the model wrote the indentation token healing left out of the
    # prompt: the ids' text starts with it, the content does not
    assert served[1].tokenizer.decode(tokens) == MEAN["prompt"] + content


def test_a_crlf_document_gets_the_ids_the_model_generated_for_its_lf_text(served):
    lf, _ = _infill(served, MEAN, "mean-lf")
    crlf, generated = _infill(served, _crlf(MEAN), "mean-crlf")
    assert "\r\n" in crlf["content"] and crlf["content"] == lf["content"].replace("\n", "\r\n")
    assert crlf["tokens"] == lf["tokens"]  # a CRLF document is completed as its LF twin
    assert len(crlf["tokens"]) < len(_candidate_of(crlf["tokens"], generated))  # cut here too
    assert _model_text(served, crlf["tokens"], MEAN["prompt"]) == crlf["content"].replace("\r\n", "\n")


def test_a_rest_of_line_cut_returns_the_fewest_generated_ids_that_hold_the_text(served):
    # OPEN_AS: the model wrote ` f:` and on, the rest of the cursor line's `:` repeated: `f` is kept
    whole, generated = _infill(served, OPEN_AS, "open-as-cut")
    content, tokens = whole["content"], whole["tokens"]
    assert content == "f" and len(tokens) < len(_candidate_of(tokens, generated))
    assert served[1].tokenizer.decode(tokens) == " f"  # one token, with the space healing left to the model
    assert _model_text(served, tokens, " ") == content and not _model_text(served, tokens[:-1], " ")


def test_ids_the_model_split_its_own_way_are_returned_as_generated(served):
    # SPLIT: nothing cut or restyled, so `tokens` are every id the chosen candidate generated; they decode
    # to the content, and are not what tokenizing the content gives
    whole, generated = _infill(served, SPLIT, "split", mode="refusion")
    tokens, tokenizer = whole["tokens"], served[1].tokenizer
    assert tokens in generated.values() and tokenizer.decode(tokens) == whole["content"]
    assert tokenizer.encode(whole["content"], add_special_tokens=False) != tokens


def test_a_longer_gap_that_extends_the_streamed_one_returns_its_ids_less_the_dropped_line_break(served):
    # STACK in a CRLF document: the 64-token gap extends the 32-token one's text (streamed first) and is
    # chosen; its last token, a line break and indentation before the suffix's own line break, is dropped
    # with its text; the rest are the model's ids of its LF text
    whole, generated = _infill(served, _crlf(STACK), "stack-whole")
    streamed, _ = _infill(served, _crlf(STACK), "stack-stream", stream=True)
    longest = max(generated.values(), key=len)
    assert len(longest) == 64 and whole["tokens"] == longest[:-1]
    assert served[1].tokenizer.decode(longest[-1:]).strip() == "" and whole["content"] == whole["content"].rstrip()
    assert "\r\n" in whole["content"] and streamed["tokens"] == whole["tokens"]
    assert _model_text(served, whole["tokens"], "") == whole["content"].replace("\r\n", "\n")
