"""POST /v1/messages and /v1/messages/count_tokens on the real Ray Serve app with the `anthropic` SDK:
the message equals what /v1/chat/completions answers for the same conversation (text, tool_use and
tool_result blocks, system prompt, prefill), streamed and whole alike; stop reasons; forced tool calls
whose input follows the schema; token counts equal to the prompt the turn runs; errors in Anthropic's
shape naming the field; `x-api-key`; a full engine is a 503 overloaded_error with Retry-After."""

from __future__ import annotations

import json
import re

import anthropic
import httpx
import pytest

from serve_testbed import API_KEY, STRICT_ALIAS, long_stream_admitted

# The SDK has no temperature argument: sent as extra_body. The tests' random-weight model writes nothing
# visible greedily (special tokens), so texts are compared under seeded sampling: the same seed and prompt
# give the same tokens on every route.
CONTEXT = 4096  # tests/model_factory.py max_position_embeddings
GREEDY_AR = {"mode": "ar", "temperature": 0}
SAMPLED_AR = {"mode": "ar", "temperature": 1.0, "seed": 7}
TOOL = {"name": "add", "description": "Add two digits",
        "input_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["a", "b"], "additionalProperties": False}}
OPENAI_TOOL = {"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                                "parameters": TOOL["input_schema"]}}
# A conversation an agent sends back: a call, its result, a new question (Anthropic blocks / OpenAI messages)
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me add."},
                                      {"type": "tool_use", "id": "toolu_01", "name": "add", "input": {"a": 2, "b": 3}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "5"},
                                 {"type": "text", "text": "Now write it in Python."}]},
]
OPENAI_CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "Let me add.", "tool_calls": [
        {"id": "toolu_01", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})}}]},
    {"role": "tool", "tool_call_id": "toolu_01", "content": "5"},
    {"role": "user", "content": "Now write it in Python."},
]


@pytest.fixture(scope="module")
def claude(serve_base_url):
    return anthropic.Anthropic(base_url=serve_base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(serve_base_url):
    with httpx.Client(base_url=serve_base_url, timeout=60) as client:
        yield client


def _text(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_conversation_with_tool_results_answers_as_the_chat_route(claude, client, model, http):
    """The same conversation as Anthropic blocks and as OpenAI messages: the same prompt (count_tokens ==
    /tokenize == usage) and, greedy, the same text; streamed, the events rebuild the same message."""
    kwargs = dict(model=model, max_tokens=16, system="You write Python.", messages=CONVERSATION, tools=[TOOL],
                  tool_choice={"type": "none"}, extra_body=SAMPLED_AR)
    out = claude.messages.create(**kwargs)
    chat = client.chat.completions.create(model=model, max_tokens=16, messages=OPENAI_CONVERSATION, temperature=1.0,
                                          seed=7, tools=[OPENAI_TOOL], tool_choice="none", extra_body={"mode": "ar"})
    assert out.type == "message" and out.role == "assistant" and out.model == model
    assert _text(out) and _text(out) == chat.choices[0].message.content
    assert out.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert out.usage.input_tokens + out.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert out.usage.output_tokens == chat.usage.completion_tokens
    counted = claude.messages.count_tokens(model=model, system="You write Python.", messages=CONVERSATION,
                                           tools=[TOOL], tool_choice={"type": "none"})
    tokenized = http.post("/tokenize", json={"messages": OPENAI_CONVERSATION}).json()  # tool_choice none: no tools
    assert counted.input_tokens == tokenized["count"] == chat.usage.prompt_tokens
    with claude.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert _text(final) == _text(out) and [b.type for b in final.content] == ["text"]
    assert final.stop_reason == out.stop_reason
    assert final.usage.output_tokens == out.usage.output_tokens
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]


def test_the_sdks_tool_runner_falls_back_from_a_thread_to_the_whole_conversation(serve_base_url, http, model):
    # The anthropic SDK's tool runner sends `thread: {"type": "create"}` (Anthropic's message threads beta)
    # unless told thread=False; a 400 "Extra inputs are not permitted" stopped it (helper-123). The error
    # Anthropic gives a request it cannot thread makes the SDK send the whole conversation without it.
    sent = []
    hooks = {"request": [lambda request: sent.append(json.loads(request.read() or b"{}").get("thread"))]}
    claude = anthropic.Anthropic(base_url=serve_base_url, api_key="unused", max_retries=0, timeout=60,
                                 http_client=anthropic.DefaultHttpxClient(event_hooks=hooks))

    @anthropic.beta_tool
    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    runner = claude.beta.messages.tool_runner(model=model, max_tokens=8, max_iterations=2, tools=[add],
                                              messages=[{"role": "user", "content": "What is 2 + 3?"}])
    final = runner.until_done()
    assert final.type == "message" and final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert sent[0] == {"type": "create"} and sent[1:] and all(thread is None for thread in sent[1:])
    refused = http.post("/v1/messages", json={"model": model, "max_tokens": 8, "thread": {"type": "create"},
                                              "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["details"] == {"error_code": "thread_unsupported_request"}
    assert "thread" in error["message"]


def test_stop_sequences_end_the_text_and_are_reported(claude, model):
    kwargs = dict(model=model, max_tokens=24, messages=[{"role": "user", "content": "def add(a, b):"}],
                  extra_body=SAMPLED_AR)
    text = _text(claude.messages.create(**kwargs))
    usable = [p for p in range(1, len(text) - 1) if text.find(text[p:p + 2]) == p and text[p:p + 2].isprintable()
              and text[p:p + 2].strip() and "\ufffd" not in text[p:p + 2]]
    cut = usable[0] if usable else None
    assert cut is not None, f"no usable stop sequence in {text!r}"
    stop = text[cut:cut + 2]
    out = claude.messages.create(stop_sequences=[stop, "never-written"], **kwargs)
    assert (out.stop_reason, out.stop_sequence) == ("stop_sequence", stop)
    assert _text(out) == text[:cut]
    # As many as the route takes (16): the chat template's own turn end is not one of the client's
    # (the engine counted it: 16 were refused as "has 17 strings; give at most 16")
    many = claude.messages.create(stop_sequences=[stop] + [f"never-{k}" for k in range(15)], **kwargs)
    assert (many.stop_reason, many.stop_sequence, _text(many)) == ("stop_sequence", stop, text[:cut])


def test_max_tokens_cut_is_max_tokens(claude, client, model):
    messages = [{"role": "user", "content": "Write a long story."}]
    chat = client.chat.completions.create(model=model, max_tokens=3, messages=messages, temperature=0,
                                          extra_body={"mode": "ar"})
    assert chat.choices[0].finish_reason == "length"  # the oracle: greedy does not end within 3 tokens
    out = claude.messages.create(model=model, max_tokens=3, messages=messages, extra_body=GREEDY_AR)
    assert out.stop_reason == "max_tokens" and out.usage.output_tokens == 3


@pytest.mark.parametrize("tool_choice", [{"type": "tool", "name": "add"}, {"type": "any"}])
def test_forced_tool_calls_are_tool_use_blocks_whose_input_follows_the_schema(claude, model, tool_choice):
    kwargs = dict(model=model, max_tokens=64, messages=[{"role": "user", "content": "Add 2 and 3."}],
                  tools=[TOOL], tool_choice={**tool_choice, "disable_parallel_tool_use": True},
                  extra_body={"temperature": 0.8, "seed": 3})
    out = claude.messages.create(**kwargs)
    [call] = [block for block in out.content if block.type == "tool_use"]
    assert call.name == "add" and call.id.startswith("toolu_")
    assert set(call.input) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 9 for v in call.input.values())
    assert out.stop_reason == "tool_use"
    partial, started = [], None
    for event in claude.messages.create(stream=True, **kwargs):
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            started = event.content_block
        elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            partial.append(event.delta.partial_json)
    assert started.name == "add" and started.input == {}
    assert json.loads("".join(partial)) == call.input  # same seed: the same call


def test_a_forced_call_cut_by_max_tokens_is_an_incomplete_tool_use_block(claude, model):
    # Not the template's text as a text block (helper-123): a tool_use block whose input is what its partial
    # JSON holds, stop_reason max_tokens; the stream's accumulated message says the same
    kwargs = dict(model=model, max_tokens=3, messages=[{"role": "user", "content": "Add 2 and 3."}], tools=[TOOL],
                  tool_choice={"type": "any"})
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    for out in (whole, streamed):
        [block] = out.content
        assert block.type == "tool_use" and block.name == "add" and isinstance(block.input, dict)
        assert out.stop_reason == "max_tokens" and set(block.input) <= {"a", "b"}
    assert streamed.content[0].input == whole.content[0].input


def test_tools_with_an_output_format_answer_with_calls_or_the_format(claude, model):
    """output_config.format with tools and tool_choice auto: each turn is tool_use blocks or a text answer
    in the format's JSON (the chat route's grammar), whichever the sampled model takes."""
    schema = {"type": "object", "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 18}},
              "required": ["sum"], "additionalProperties": False}
    for seed in range(3):
        out = claude.messages.create(model=model, max_tokens=64, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                     tools=[TOOL], extra_body={"output_config": {"format": {"type": "json_schema",
                                                                                            "schema": schema}},
                                                               "temperature": 1.0, "seed": seed,
                                                               "tool_choice": {"type": "auto",
                                                                               "disable_parallel_tool_use": True}})
        calls = [b for b in out.content if b.type == "tool_use"]
        texts = "".join(b.text for b in out.content if b.type == "text")
        if calls:
            assert out.stop_reason == "tool_use" and all(c.name == "add" and set(c.input) == {"a", "b"} for c in calls)
        else:
            assert out.stop_reason == "end_turn" and set(json.loads(texts)) == {"sum"}


def test_a_final_assistant_message_is_continued(claude, client, model, http):
    """A prefill: the prompt ends with the assistant's text (no new turn opened) and the answer is what
    the chat route's continue_final_message gives (the prefill itself is not repeated)."""
    messages = [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": "def add(a, b):\n"}]
    out = claude.messages.create(model=model, max_tokens=12, messages=messages, extra_body=SAMPLED_AR)
    chat = client.chat.completions.create(model=model, max_tokens=12, messages=messages, temperature=1.0, seed=7,
                                          extra_body={"mode": "ar", "continue_final_message": True})
    assert _text(out) and _text(out) == chat.choices[0].message.content
    tokenized = http.post("/tokenize", json={"messages": messages, "continue_final_message": True,
                                             "add_generation_prompt": False}).json()
    prompt = http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    assert prompt.endswith("### Assistant\ndef add(a, b):\n")  # the plain template's open turn
    assert claude.messages.count_tokens(model=model, messages=messages).input_tokens == tokenized["count"]
    assert chat.usage.prompt_tokens == tokenized["count"]


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "5"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content.0.type"),
    ({"system": 5}, "system"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"name": "add", "input_schema": {"type": "object", "properties": 5}}]}, "tools.0.input_schema"),
    # not schemas, past the step that closes objects and the forced-call builder (500s, in OpenAI's shape)
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "$defs": "x"}}], "tool_choice": {"type": "any"}},
     "tools.0.input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}, "required": [{}]}}]},
     "tools.0.input_schema"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "mul"}}, "tool_choice.name"),
    ({"extensions": {"n": 3}}, "extensions"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}, "tools": [TOOL]},
     "output_config.format"),  # (a format with tools is served: calls, or an answer in the format)
    ({"max_tokens": None}, "max_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"mode": "fast"}, "mode"),
    ({"bogus": 1}, "bogus"),
    ({"model": None}, "model"),  # required, as Anthropic's API and vLLM's Messages route require it
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": [TOOL]},
     "messages"),  # a prefill with tools: the grammar would start inside it
])
def test_bad_requests_are_anthropic_errors_naming_the_field(http, model, body, field):
    base = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    response = http.post("/v1/messages", json={k: v for k, v in (base | body).items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(field), error["error"]["message"]
    generation_only = {"max_tokens", "top_k", "mode", "bogus", "extensions", "output_config"}  # not count_tokens fields
    if not set(body) & generation_only and field != "tools.0.input_schema":
        # count_tokens refuses what a message refuses (a schema is compiled only when a message is created)
        counted = http.post("/v1/messages/count_tokens", json={"model": model, "messages": base["messages"]} | body)
        assert counted.status_code == 400 and counted.json()["error"]["message"].startswith(field), counted.text


def test_a_request_shaped_as_claude_code_sends_it_is_answered(claude, model):
    """What Claude Code 2.1 sends (captured): system blocks with cache_control, a `system` message within
    the conversation, thinking blocks sent back, `thinking: adaptive`, `context_management`,
    `output_config.effort`, metadata.user_id as a JSON string, a tool whose schema uses `propertyNames`
    (which the grammar engine lacks: ignored in tool grammars), streamed with the beta client."""
    todo = {"name": "todo", "description": "Track tasks", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
        "properties": {"tasks": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}}}}}
    cached = {"type": "ephemeral"}
    body = dict(
        model=model, max_tokens=16, stream=True, tools=[TOOL, todo], metadata={"user_id": json.dumps({"device": "x"})},
        system=[{"type": "text", "text": "You are a coding agent."},
                {"type": "text", "text": "Answer in Python.", "cache_control": cached}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Add 2 and 3.", "cache_control": cached}]},
                  {"role": "system", "content": "Available agents: none."},
                  {"role": "assistant", "content": [
                      {"type": "thinking", "thinking": "use add", "signature": "sig"},
                      {"type": "tool_use", "id": "toolu_01", "name": "add", "input": {"a": 2, "b": 3}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "5",
                                                "cache_control": cached}]}],
        extra_body={"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
                    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
                    **SAMPLED_AR})
    events = list(claude.beta.messages.create(**body))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[-2].delta.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_usage_and_token_counts_agree_everywhere(claude, model):
    """count_tokens is the prompt the turn runs, a forced call's opening included; the second of two
    identical requests reads its prompt from the prefix cache, and message_start already splits the
    input as the end does."""
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Add 2 and 3, please, using the tool."}],
                  tools=[TOOL], tool_choice={"type": "tool", "name": "add"})
    counted = claude.messages.count_tokens(**kwargs).input_tokens
    for _ in range(2):
        events = list(claude.messages.create(max_tokens=24, stream=True, extra_body=SAMPLED_AR, **kwargs))
        start, end = events[0].message.usage, events[-2].usage
        assert start.input_tokens + start.cache_read_input_tokens == counted
        assert (start.input_tokens, start.cache_read_input_tokens) == (end.input_tokens, end.cache_read_input_tokens)
    assert end.cache_read_input_tokens > 0  # the second request found the first one's prompt cached


def test_context_overflows_are_worded_as_anthropic_words_them(http, claude, model):
    """Claude Code parses these two messages (its default max_tokens is 32,000) to shrink max_tokens and
    retry, or to compact the conversation."""
    messages = [{"role": "user", "content": "def add(a, b):"}]
    prompt = claude.messages.count_tokens(model=model, messages=messages).input_tokens
    response = http.post("/v1/messages", json={"model": model, "max_tokens": 32000, "messages": messages})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    found = re.match(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+), decrease input length "
                     r"or `max_tokens` and try again$", message)
    assert found and [int(g) for g in found.groups()] == [prompt, 32000, CONTEXT], message
    retried = claude.messages.create(model=model, max_tokens=CONTEXT - prompt, messages=messages,
                                     extra_body={"mode": "ar", "max_time_ms": 1})  # the shrunk request fits
    assert retried.stop_reason == "max_tokens"
    long_prompt = [{"role": "user", "content": "x = 1\n" * 3000}]
    response = http.post("/v1/messages", json={"model": model, "max_tokens": 8, "messages": long_prompt})
    assert response.status_code == 400
    assert re.match(r"prompt is too long: \d+ tokens > 4095 maximum$", response.json()["error"]["message"])  # C - 1
    huge = [{"role": "user", "content": "x" * 40_000}]  # over max_prompt_chars (8 x context): refused before tokenizing
    in_history = [{"role": "user", "content": "hi"},  # the same, the characters in a tool call of the history
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add",
                                                     "input": {"a": "z" * 40_000}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]
    for messages in (huge, in_history):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            response = http.post(path, json={"model": model, "max_tokens": 8, "messages": messages} if path.endswith(
                "messages") else {"model": model, "messages": messages})
            found = re.match(r"prompt is too long: (\d+) characters > (\d+) maximum", response.json()["error"]["message"])
            assert response.status_code == 400 and found and int(found[1]) > int(found[2]), response.text


def test_the_sdk_lists_the_served_model(claude, model):
    [card] = list(claude.models.list())
    # the longest prompt: one token of the context is left to generate ("prompt is too long: P > C - 1 maximum")
    assert (card.id, card.type, card.display_name, card.max_input_tokens) == (model, "model", model, CONTEXT - 1)
    assert claude.models.retrieve(model).id == model
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.models.retrieve("claude-nope")
    # Anthropic's shape for the anthropic SDK (its anthropic-version header), OpenAI's for everyone else
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error", err.value.body
    assert "type" not in httpx.get(str(claude.base_url).rstrip("/") + "/v1/models/claude-nope", timeout=30).json()


def test_the_sdk_raises_typed_errors(claude, model):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=model, max_tokens=8, messages=[{"role": "bot", "content": "x"}])
    assert err.value.body["error"]["message"].startswith("messages.0.role")
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="claude-nope", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "not_found_error" and model in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": [{"type": "image"}]}])


def test_x_api_key_and_overload_on_the_strict_app(strict_base_url):
    """Anthropic clients send `x-api-key`; a wrong or missing key is a 401 in Anthropic's shape; with the
    engine's only slot taken, a message is a 503 overloaded_error with Retry-After (the SDK retries it)."""
    body = {"model": STRICT_ALIAS, "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(base_url=strict_base_url, timeout=30) as http:
        missing = http.post("/v1/messages/count_tokens", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert missing.json()["type"] == "error"
        assert http.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": "wrong"}).status_code == 401
        counted = http.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": API_KEY})
        assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
        for other in ("Bearer wrong", "Basic dXNlcjpwYXNz"):  # any valid key passes, whatever else is sent
            both = http.post("/v1/messages/count_tokens", json=body,
                             headers={"Authorization": other, "x-api-key": API_KEY})
            assert both.status_code == 200, both.text
        strict = anthropic.Anthropic(base_url=strict_base_url, api_key=API_KEY, max_retries=0, timeout=30)
        auth = {"Authorization": f"Bearer {API_KEY}"}
        with long_stream_admitted(http, "/v1/completions", auth) as lines:  # takes the engine's only slot
            assert next(lines).startswith("data: {")
            with pytest.raises(anthropic.APIStatusError) as err:
                strict.messages.create(max_tokens=4, **body)
    assert err.value.status_code == 503 and int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "overloaded_error"
