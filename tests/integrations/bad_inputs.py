"""The bad-input corpus: hostile or malformed requests for every endpoint of the serve app, with the
answer each must get. Run by test_bad_input_corpus.py against the real Ray Serve app (serve_base_url).

HTTPCase.body: a dict (sent as JSON; ensure_ascii keeps lone surrogates as \\ud800 escapes), raw bytes,
or None (no body). `status` is the expected answer; `field` is a word the error message must contain
(the offending field, or the setting that sets the limit); `param`, when given, is the OpenAI error's
exact `param` (None for a body that is not JSON). Cases with status 200 send junk an endpoint
has no use for (it must be ignored, not crash it).

FrameCase: one WebSocket frame for /v1/editor and the protocol error code it must get; `field` must be
the error's data.field (INVALID_PARAMS) or appear in its message.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field as dc_field

import msgpack

from integrations.editor import protocol as rpc

MAX_BODY_BYTES = 8 << 20  # integrations.request_limits.DEFAULT_MAX_BODY_BYTES (the test app's setting)
CONTEXT = 4096  # tests/model_factory.py max_position_embeddings
MAX_PROMPT_CHARS = 8 * CONTEXT  # the default: 8 characters per context token
NESTED = b"[" * 100_000  # the probe's RecursionError body
ANY_PARAM = "<not checked>"


def nested(levels: int):
    """A JSON value nested `levels` deep: [[[...[1]...]]]."""
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@dataclass(frozen=True)
class HTTPCase:
    id: str
    method: str
    path: str
    body: dict | list | str | bytes | None = None
    status: int = 400
    field: str | None = None
    headers: dict = dc_field(default_factory=dict)
    param: str | None = ANY_PARAM

    def content(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


def _c(id, body, status=400, field=None, path="/v1/completions", **kw) -> HTTPCase:
    return HTTPCase(id, "POST", path, body, status, field, **kw)


def _chat(id, body, status=400, field=None, **kw) -> HTTPCase:
    return HTTPCase(id, "POST", "/v1/chat/completions", body, status, field, **kw)


def _infill(id, body, status=400, field=None, stream=False) -> HTTPCase:
    if stream:  # the same fault streamed: still answered before the response starts (issue 14, item 3)
        return HTTPCase(id + "-streamed", "POST", "/infill", {**body, "stream": True}, status, field)
    return HTTPCase(id, "POST", "/infill", body, status, field)


def _tok(id, body, status=400, field=None) -> HTTPCase:
    return HTTPCase(id, "POST", "/tokenize", body, status, field)


USER = [{"role": "user", "content": "hi"}]

HTTP_CASES = [
    # POST /v1/completions: the body
    _c("completions-not-json", b'{"prompt": ', field="JSON"),
    _c("completions-nested-100k", NESTED, field="deeper"),
    _c("completions-not-utf8", b'{"prompt": "\xff\xfe"}', field="UTF-8"),
    _c("completions-array-body", [], field="JSON object"),
    _c("completions-string-body", "hi", field="JSON object"),
    _c("completions-nan", b'{"prompt": "x", "temperature": NaN}', field="NaN"),
    _c("completions-1e999", b'{"prompt": "x", "temperature": 1e999}', field="finite"),
    _c("completions-5000-digit-int", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", field="number"),
    # (a 400-digit max_time_ms overflowed its deadline's float at every engine step, failing every request)
    _c("completions-400-digit-max-time-ms", b'{"prompt": "x", "max_time_ms": 1' + b"0" * 400 + b"}", field="max_time_ms"),
    _c("completions-over-body-limit", b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 16) + b'"}', 413, "max_body_bytes"),
    _c("completions-deep-stop", {"prompt": "x", "stop": nested(70)}, field="stop"),
    _c("completions-huge-model-name", {"prompt": "x", "model": "m" * 100_000}, 404, "model"),
    _c("completions-gzip-body", gzip.compress(b'{"prompt": "x"}'), 415, "Content-Encoding",
       headers={"Content-Encoding": "gzip"}, param="Content-Encoding"),
    # arrays longer than the context are refused while parsing (validating millions of ids held the loop)
    _c("completions-ids-past-context", {"prompt": [5] * (CONTEXT + 1)}, field="prompt"),
    _c("completions-stop-list-past-context", {"prompt": "x", "stop": ["a"] * (CONTEXT + 1)}, field="stop"),
    # POST /v1/completions: the prompt
    _c("completions-no-prompt", {"max_tokens": 4}, field="prompt"),
    _c("completions-prompt-null", {"prompt": None}, field="prompt"),
    _c("completions-prompt-number", {"prompt": 5}, field="prompt"),
    _c("completions-prompt-nested-ids", {"prompt": [[[1, 2]]]}, field="prompt"),
    _c("completions-prompt-batch-id-outside-vocab", {"prompt": [[1, 2], [10**9]]}, field="prompt.1"),
    _c("completions-prompt-batch-empty-ids", {"prompt": [[1, 2], []]}, field="prompt.1"),
    _c("completions-prompt-batch-mixed", {"prompt": ["x", [1, 2]]}, field="prompt"),
    _c("completions-prompt-batch-too-many", {"prompt": ["x"] * 33, "n": 2}, field="prompt"),
    _c("completions-prompt-batch-with-suffix", {"prompt": ["x", "y"], "suffix": "z"}, field="prompt", param="prompt"),
    _c("completions-prompt-id-outside-vocab", {"prompt": [10**9]}, field="prompt"),
    _c("completions-prompt-negative-id", {"prompt": [-1]}, field="prompt"),
    _c("completions-prompt-empty-list", {"prompt": []}, field="prompt"),
    _c("completions-prompt-lone-surrogate", {"prompt": "x\ud800"}, field="prompt"),
    _c("completions-prompt-over-chars", {"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, field="max_prompt_chars"),
    _c("completions-prompt-ids-over-context", {"prompt": [5] * (CONTEXT + 1)}, field="prompt"),
    _c("completions-suffix-over-chars", {"prompt": "x", "suffix": "a" * 200_001}, field="suffix"),
    _c("completions-prompt-with-suffix-over-chars", {"prompt": "a" * 200_001, "suffix": "x"}, field="prompt"),
    _c("completions-suffix-with-ids", {"prompt": [5, 6], "suffix": "x"}, field="prompt"),
    # POST /v1/completions: sampling and ReFusion fields
    _c("completions-max-tokens-over-context", {"prompt": "x", "max_tokens": 10**6}, field="max_tokens"),
    _c("completions-max-tokens-zero", {"prompt": "x", "max_tokens": 0}, field="max_tokens"),
    _c("completions-max-tokens-string", {"prompt": "x", "max_tokens": "many"}, field="max_tokens"),
    _c("completions-temperature-negative", {"prompt": "x", "temperature": -1}, field="temperature"),
    _c("completions-temperature-string", {"prompt": "x", "temperature": "hot"}, field="temperature"),
    _c("completions-top-p-zero", {"prompt": "x", "top_p": 0}, field="top_p"),
    _c("completions-top-p-denormal", {"prompt": "x", "top_p": 1e-300}, field="top_p"),
    _c("completions-seed-over-uint64", {"prompt": "x", "seed": 2**70}, field="seed"),
    _c("completions-seed-2^64", {"prompt": "x", "seed": 2**64, "mode": "ar", "temperature": 0.7}, field="seed"),
    _c("completions-seed-2^63", {"prompt": "x", "seed": 2**63}, field="seed"),
    _c("completions-top_k-2^63", {"prompt": "x", "top_k": 2**63, "temperature": 1}, field="top_k"),
    _c("completions-seed-below-int64", {"prompt": "x", "seed": -2**63 - 1}, field="seed"),
    _c("completions-stop-empty", {"prompt": "x", "stop": [""]}, field="stop"),
    _c("completions-stop-five", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, field="stop"),
    _c("completions-stop-null-item", {"prompt": "x", "stop": ["a", None]}, field="stop.1", param="stop.1"),
    _chat("chat-stop-number-item", {"messages": USER, "stop": [3]}, field="stop.0", param="stop.0"),
    _c("completions-n-17", {"prompt": "x", "n": 17}, field="n"),
    _c("completions-n-zero", {"prompt": "x", "n": 0}, field="n"),
    _c("completions-n-with-suffix", {"prompt": "x", "suffix": "y", "n": 2}, field="n", param="n"),
    _chat("chat-n-string", {"messages": USER, "n": "2"}, field="n"),
    _c("completions-mode-unknown", {"prompt": "x", "mode": "fast"}, field="mode"),
    _c("completions-priority-unknown", {"prompt": "x", "priority": "urgent"}, field="priority"),
    _c("completions-stream-list", {"prompt": "x", "stream": [1]}, field="stream"),
    _c("completions-stream-string", {"prompt": "x", "stream": "yes"}, field="stream"),
    _c("completions-stream-options-without-stream", {"prompt": "x", "stream_options": {"include_usage": True}},
       field="stream_options"),
    _chat("chat-tool-name-with-space", {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "get weather"}}]}, field="tools.0.function.name"),
    # a misspelt key left the tool without its schema (its calls unconstrained): refused, as on Responses
    _chat("chat-tool-function-unknown-key", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "paramters": {"type": "object"}}}]}, field="tools.0.function.paramters",
          param="tools.0.function.paramters"),
    _chat("chat-tool-unknown-key", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"},
                                                                 "strict": True}]}, field="tools.0.strict"),
    _chat("chat-tool-names-repeated", {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}, field="tools"),
    _c("completions-max-tokens-numeric-string", {"prompt": "x", "max_tokens": "5"}, field="max_tokens"),
    _c("completions-max-tokens-bool", {"prompt": "x", "max_tokens": True}, field="max_tokens"),
    _c("completions-seed-string", {"prompt": "x", "seed": "1"}, field="seed"),
    _chat("chat-temperature-string", {"messages": USER, "temperature": "0.5"}, field="temperature"),
    _chat("chat-user-message-without-content", {"messages": [{"role": "user"}]}, field="messages.0.content",
          param="messages.0.content"),
    _chat("chat-system-content-null", {"messages": [{"role": "system", "content": None}, *USER]},
          field="messages.0.content", param="messages.0.content"),
    _c("completions-stream-options-unknown-key", {"prompt": "x", "stream": True, "stream_options": {"foo": 1}},
       field="stream_options.foo", param="stream_options.foo"),
    _c("completions-unknown-field", {"prompt": "x", "bogus_field": 1}, field="bogus_field"),
    _c("completions-slot-size-zero", {"prompt": "x", "slot_size": 0}, field="slot_size"),
    _c("completions-blocks-past-the-context", {"prompt": "x", "max_tokens": 16, "slot_size": 8,
                                                "serial_num_blocks": 10**6}, field="serial_num_blocks"),
    _c("completions-max-tokens-0-without-echo", {"prompt": "x", "max_tokens": 0}, field="max_tokens", param="max_tokens"),
    _c("completions-echo-with-suffix", {"prompt": "x", "suffix": "y", "echo": True}, field="echo", param="echo"),
    _c("completions-logprobs-over-20", {"prompt": "x", "logprobs": 21}, field="logprobs", param="logprobs"),
    _c("completions-logprobs-bool", {"prompt": "x", "logprobs": True}, field="logprobs", param="logprobs"),
    _c("completions-logprobs-with-suffix", {"prompt": "x", "suffix": "y", "logprobs": 1}, field="logprobs",
       param="logprobs"),
    _c("completions-logit-bias-word-key", {"prompt": "x", "logit_bias": {"hello": 5}}, field="logit_bias"),
    _c("completions-logit-bias-superscript-key", {"prompt": "x", "logit_bias": {"\u00b2": 5}}, field="logit_bias"),
    _c("completions-logit-bias-arabic-digits", {"prompt": "x", "logit_bias": {"\u0661\u0662": 5}}, field="logit_bias"),
    _c("completions-logit-bias-5000-digits", {"prompt": "x", "logit_bias": {"9" * 5000: 1}}, field="logit_bias"),
    _c("completions-logit-bias-same-token-twice", {"prompt": "x", "logit_bias": {"80": 1, "0080": 2}}, field="logit_bias"),
    _chat("chat-logit-bias-superscript-key", {"messages": USER, "logit_bias": {"\u00b2": 5}, "stream": True},
          field="logit_bias"),
    _c("completions-logit-bias-over-100", {"prompt": "x", "logit_bias": {"1": 101}}, field="logit_bias"),
    _c("completions-logit-bias-outside-vocab", {"prompt": "x", "logit_bias": {"999999999": 1}}, field="logit_bias"),
    _c("completions-presence-penalty-over-2", {"prompt": "x", "presence_penalty": 2.5}, field="presence_penalty"),
    _c("completions-penalty-with-refusion", {"prompt": "x", "frequency_penalty": 0.5, "mode": "refusion"}, field="mode"),
    _chat("chat-frequency-penalty-string", {"messages": USER, "frequency_penalty": "0.5"}, field="frequency_penalty"),
    _c("completions-unknown-model", {"prompt": "x", "model": "gpt-nope"}, 404, "model"),
    _c("completions-model-lone-surrogate", {"prompt": "x", "model": "\udc80"}, field="model"),
    # POST /v1/chat/completions
    _chat("chat-no-messages", {"max_tokens": 4}, field="messages"),
    _chat("chat-logprobs-count", {"messages": USER, "logprobs": 3}, field="logprobs"),
    _chat("chat-top-logprobs-without-logprobs", {"messages": USER, "top_logprobs": 3}, field="top_logprobs"),
    _chat("chat-top-logprobs-over-20", {"messages": USER, "logprobs": True, "top_logprobs": 21}, field="top_logprobs"),
    _chat("chat-prompt-logprobs-streamed", {"messages": USER, "prompt_logprobs": 2, "stream": True},
          field="prompt_logprobs"),
    _chat("chat-prompt-logprobs-string", {"messages": USER, "prompt_logprobs": "2"}, field="prompt_logprobs"),
    _chat("chat-store", {"messages": USER, "store": True}, field="store"),
    _c("completions-top-k-negative", {"prompt": "x", "top_k": -2}, field="top_k"),  # (-1 is vLLM's "off")
    _c("completions-min-p-over-one", {"prompt": "x", "min_p": 1.5}, field="min_p"),
    _infill("infill-min-p-negative", {"input_prefix": "x", "input_suffix": "", "min_p": -0.1}, field="min_p"),
    _chat("chat-empty-messages", {"messages": []}, field="messages"),
    # an earlier assistant turn's tool calls are OpenAI's shape (a function that was a string: a 500)
    _chat("chat-tool-call-function-string", {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": "f"}]}]}, field="messages.1.tool_calls.0.function"),
    _chat("chat-tool-call-function-null-streamed", {"stream": True, "messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": None}]}]}, field="messages.1.tool_calls.0.function"),
    _chat("chat-tool-call-arguments-object", {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]},
          field="messages.1.tool_calls.0.function.arguments"),
    _chat("chat-tool-call-no-id", {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, field="messages.1.tool_calls.0.id"),
    _chat("chat-tool-call-custom", {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "custom", "custom": {"name": "f", "input": "x"}}]}]}, field="messages.1.tool_calls.0.type"),
    _chat("chat-tool-message-without-id", {"messages": USER + [{"role": "tool", "content": "5"}]}, field="messages.1"),
    _chat("chat-content-empty-list", {"messages": [{"role": "user", "content": []}]}, field="messages.0.content"),
    HTTPCase("apply-template-tool-call-function-string", "POST", "/apply-template", {"messages": USER + [
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": "f"}]}]}, 400,
             "messages.1.tool_calls.0.function"),
    _chat("chat-messages-string", {"messages": "hi"}, field="messages"),
    _chat("chat-role-unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, field="messages.0.role"),
    _chat("chat-image-part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
          field="messages.0.content"),
    # (it said "only text content parts are supported" of a text part)
    _chat("chat-text-part-without-text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
          field="a text part needs 'text'"),
    _chat("chat-content-lone-surrogate", {"messages": [{"role": "user", "content": "\ud83d"}]},
          field="messages.0.content"),
    _chat("chat-content-over-chars", {"messages": [{"role": "user", "content": "a" * (MAX_PROMPT_CHARS + 1)}]},
          field="messages"),
    _chat("chat-tool-schema-too-deep", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": nested(70)}}]}, field="tools.0.function.parameters"),
    _chat("chat-tool-key-lone-surrogate", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"\ud800": 1}}}]}, field="tools.0.function.parameters"),
    _chat("chat-tool-name-empty", {"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]},
          field="tools.0.function.name"),
    _chat("chat-tool-choice-required-without-tools", {"messages": USER, "tool_choice": "required"},
          field="tool_choice"),
    _chat("chat-tool-choice-unknown", {"messages": USER, "tool_choice": "any"}, field="tool_choice"),
    _chat("chat-tool-choice-names-a-missing-tool", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, field="tool_choice"),
    _chat("chat-tool-choice-named-without-name", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f"}}], "tool_choice": {"type": "function", "function": {}}}, field="tool_choice"),
    # schemas that are not schemas, past the step that closes objects and the forced-call builder (were 500s)
    _chat("chat-tool-required-names-objects", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": [{"x": 1}]}}}]},
          field="tools.0.function.parameters"),
    _chat("chat-tool-defs-string-forced-streamed", {"messages": USER, "stream": True, "tool_choice": "required",
                                                   "tools": [{"type": "function", "function": {
                                                       "name": "f", "parameters": {"type": "object", "$defs": "x"}}}]},
          field="tools.0.function.parameters.$defs"),
    # a chat field sent to the Responses API is named with the field it moved to (OpenAI's 400 says so too);
    # a misspelled field beside the fault it causes is named too (it was only "input: Field required")
    HTTPCase("responses-max-tokens", "POST", "/v1/responses", {"input": "hi", "max_tokens": 8}, 400,
             "in the Responses API it is `max_output_tokens`", param="max_tokens"),
    HTTPCase("responses-messages", "POST", "/v1/responses", {"messages": [{"role": "user", "content": "hi"}]}, 400,
             "messages: in the Responses API it is `input`", param="input"),
    HTTPCase("responses-misspelled-input", "POST", "/v1/responses", {"inpt": "hi"}, 400,
             "input: Field required (unknown fields: inpt)", param="input"),
    HTTPCase("responses-strict-format-required-objects", "POST", "/v1/responses", {
        "input": "hi", "max_output_tokens": 4, "text": {"format": {"type": "json_schema", "name": "n", "strict": True,
                                                                   "schema": {"type": "object", "required": [{}]}}}},
             400, "text.format.schema"),
    _chat("chat-response-format-unknown-type", {"messages": USER, "response_format": {"type": "yaml"}},
          field="response_format"),
    _chat("chat-response-format-bad-schema", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}},
          field="response_format.json_schema.schema"),
    _chat("chat-response-format-schema-not-object", {"messages": USER, "response_format": {"type": "json_schema",
          "json_schema": {"name": "x", "schema": [1]}}}, field="response_format.json_schema.schema"),
    # integers at the int64 minimum crashed the grammar engine (SIGSEGV: the replica died with every stream
    # on it), and past uint64 were "not JSON serializable"
    _chat("chat-response-format-int64-min-const", {"messages": USER, "response_format": {"type": "json_schema",
          "json_schema": {"name": "x", "schema": {"const": -9223372036854775808}}}},
          field="response_format.json_schema.schema"),
    _chat("chat-tool-int64-min-range", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {
            "type": "integer", "minimum": -9223372036854775808, "maximum": -9223372036854775800}}}}}]},
          field="tools.0.function.parameters"),
    _chat("chat-tool-integer-past-uint64", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {
            "type": "integer", "maximum": 123456789012345678901234567890}}}}}]}, field="tools.0.function.parameters"),
    _chat("chat-lark-json-int64-min-enum", {"messages": USER, "structured_outputs": {
        "grammar": 'start: %json {"enum": [1, -9223372036854775800]}'}}, field="structured_outputs.grammar"),
    # an ambiguous grammar whose matching time per token grows with its text, past the engine's
    # grammar_token_ms budget (50 ms) within a few hundred characters: the request's own error
    _chat("chat-grammar-over-its-cpu-budget-per-token", {"messages": USER, "max_tokens": 2048, "ignore_eos": True,
          "structured_outputs": {"grammar": "start: s\ns: s s | s s s | C\nC: /[a-z ]/"}},
          field="grammar_token_ms", param="structured_outputs.grammar"),
    _chat("chat-response-format-refusion-mode", {"messages": USER, "mode": "refusion",
                                                 "response_format": {"type": "json_object"}}, field="mode"),
    _chat("chat-structured-outputs-unknown-key", {"messages": USER, "structured_outputs": {"jsonn": {}}},
          field="structured_outputs"),
    _chat("chat-structured-outputs-empty-choice", {"messages": USER, "structured_outputs": {"choice": []}},
          field="structured_outputs.choice"),
    _chat("chat-structured-outputs-json-string-not-json", {"messages": USER, "structured_outputs": {"json": "{oops"}},
          field="structured_outputs.json"),
    _chat("chat-max-completion-tokens-zero", {"messages": USER, "max_completion_tokens": 0},
          field="max_completion_tokens"),
    _chat("chat-not-json", b"{messages: []}", field="JSON", param=None),
    # Issue 14: the context counts what is really generated; streamed faults are answered before the
    # 200; each error's param is the request field to change (items 3, 8, 10).
    _c("completions-not-json-param-null", b'{"prompt": "x", ]', field="JSON", param=None),
    _c("completions-max-tokens-4200", {"prompt": "def f(x):\n", "max_tokens": 4200}, field="4,096", param="max_tokens"),
    _c("completions-max-tokens-4200-streamed", {"prompt": "def f(x):\n", "max_tokens": 4200, "stream": True},
       field="max_tokens", param="max_tokens"),
    _c("completions-max-tokens-1e9", b'{"prompt": "x", "max_tokens": 1e9}', field="max_tokens", param="max_tokens"),
    _c("completions-max-tokens-2^70", {"prompt": "x", "max_tokens": 2**70}, field="max_tokens", param="max_tokens"),
    _c("completions-max-tokens-100000", {"prompt": "x", "max_tokens": 100_000}, field="max_tokens", param="max_tokens"),
    _c("completions-slot-size-1e6", {"prompt": "x", "slot_size": 1_000_000}, field="slot_size", param="slot_size"),
    _c("completions-slot-size-1e6-streamed", {"prompt": "x", "slot_size": 1_000_000, "stream": True}, field="slot_size",
       param="slot_size"),
    _c("completions-slot-rounds-past-context", {"prompt": [5] * (CONTEXT - 6), "max_tokens": 4, "slot_size": 8},
       field="slot_size", param="slot_size"),
    _c("completions-prompt-fills-context-streamed", {"prompt": [5] * CONTEXT, "stream": True}, field="prompt",
       param="prompt"),
    _c("completions-suffix-max-tokens-4200-streamed", {"prompt": "def f(x):\n", "suffix": "\n", "max_tokens": 4200,
                                                       "stream": True}, field="max_tokens", param="max_tokens"),
    _c("completions-suffix-seed-2^70-streamed", {"prompt": "x", "suffix": "\n", "seed": 2**70, "stream": True},
       field="seed", param="seed"),
    _chat("chat-max-completion-tokens-over-context", {"messages": USER, "max_completion_tokens": 100_000, "stream": True},
          field="max_completion_tokens", param="max_completion_tokens"),
    _chat("chat-max-tokens-2^70-streamed", {"messages": USER, "max_tokens": 2**70, "stream": True}, field="max_tokens",
          param="max_tokens"),
    _chat("chat-messages-fill-context", {"messages": [{"role": "user", "content": "a " * CONTEXT}]}, field="messages",
          param="messages"),
    _chat("chat-not-json-param-null", b'{"messages": [}', field="JSON", param=None),
    # GET /v1/models, /health, /v1/engine, /metrics; unknown routes
    HTTPCase("models-unknown-id", "GET", "/v1/models/nope", status=404, field="model"),
    HTTPCase("models-undecodable-id", "GET", "/v1/models/%ff%fe", status=404, field="model"),
    HTTPCase("models-post", "POST", "/v1/models", {"x": 1}, status=405),
    HTTPCase("models-junk-query", "GET", "/v1/models?order=[[[&%ff=%00", status=200),  # (unknown parameters: ignored)
    HTTPCase("models-junk-limit", "GET", "/v1/models?limit=%ff%00&order=[[[", status=400, field="limit"),
    HTTPCase("models-unknown-cursor", "GET", "/v1/models?after_id=%ff%fe", status=400, field="after_id"),
    HTTPCase("health-junk-query", "GET", "/health?%ff=%00", status=200),
    HTTPCase("health-post", "POST", "/health", {"x": 1}, status=405),
    HTTPCase("health-body-over-limit", "GET", "/health", b"a" * (MAX_BODY_BYTES + 1), status=413, field="max_body_bytes"),
    HTTPCase("engine-post", "POST", "/v1/engine", b"[[[[", status=405),
    HTTPCase("engine-junk-query", "GET", "/v1/engine?verbose=%ff", status=200),
    HTTPCase("metrics-post", "POST", "/metrics", NESTED, status=405),
    HTTPCase("metrics-junk-query", "GET", "/metrics?name[]=%ff", status=200),
    HTTPCase("detokenize-id-outside-vocab", "POST", "/detokenize", {"tokens": [1, 10**9]}, field="tokens"),
    HTTPCase("detokenize-not-a-list", "POST", "/detokenize", {"tokens": "1 2"}, field="tokens"),
    HTTPCase("detokenize-string-id", "POST", "/detokenize", {"tokens": ["5"]}, field="tokens"),
    HTTPCase("detokenize-ids-past-context", "POST", "/detokenize", {"tokens": [5] * (CONTEXT + 1)}, field="tokens"),
    HTTPCase("detokenize-boolean-id", "POST", "/detokenize", {"tokens": [True]}, field="tokens"),
    HTTPCase("tokenize-no-messages", "POST", "/tokenize", {"messages": []}, field="messages"),
    HTTPCase("tokenize-two-inputs", "POST", "/tokenize", {"content": "x", "prompt": "y"}, field="content"),
    HTTPCase("unknown-route", "GET", "/v1/nothing", status=404),
    # POST /infill (llama.cpp)
    # every missing required field in one answer (as llama.cpp's server lists them), not one a round trip
    _infill("infill-empty-body", {}, field="Field 'input_prefix': Field required (also required: input_suffix)"),
    _infill("infill-nested-100k", NESTED, field="deeper"),
    _infill("infill-not-json", b"{'input_prefix': 1}", field="JSON"),
    _infill("infill-not-utf8", b'{"input_prefix": "\xc3\x28"}', field="UTF-8"),
    _infill("infill-array-body", [1], field="JSON object"),
    _infill("infill-over-body-limit", b'{"input_prefix": "' + b"a" * (MAX_BODY_BYTES + 16) + b'"}', 413, "max_body_bytes"),
    _infill("infill-n-cmpl-nine", {"input_prefix": "x", "input_suffix": "", "n_cmpl": 9}, field="n_cmpl"),
    _infill("infill-n-predict-string", {"input_prefix": "x", "input_suffix": "", "n_predict": "lots"}, field="n_predict"),
    _infill("infill-n-predict-minus-two", {"input_prefix": "x", "input_suffix": "", "n_predict": -2}, field="n_predict"),
    _infill("infill-n-indent-negative", {"input_prefix": "x", "input_suffix": "", "n_indent": -1}, field="n_indent"),
    _infill("infill-extra-text-number", {"input_prefix": "x", "input_suffix": "", "input_extra": [{"text": 1}]}, field="input_extra.0.text"),
    _infill("infill-extra-not-list", {"input_prefix": "x", "input_suffix": "", "input_extra": "PI = 3"}, field="input_extra"),
    _infill("infill-prefix-over-chars", {"input_prefix": "a" * 200_001, "input_suffix": ""}, field="input_prefix"),
    _infill("infill-extra-text-over-chars", {"input_prefix": "x", "input_suffix": "", "input_extra": [{"text": "y" * 200_001}]},
            field="input_extra.0.text"),
    _infill("infill-prefix-lone-surrogate", {"input_prefix": "\udfff", "input_suffix": ""}, field="input_prefix"),
    _infill("infill-stop-empty", {"input_prefix": "x", "input_suffix": "", "stop": [""]}, field="stop"),
    _infill("infill-stop-empty-streamed", {"input_prefix": "x", "input_suffix": "", "stop": [""], "stream": True}, field="stop"),
    _infill("infill-n-predict-minus-two", {"input_prefix": "x", "input_suffix": "", "n_predict": -2}, field="n_predict", stream=True),
    # llama.cpp options that change what the output is and are not applied here: refused, not ignored
    _infill("infill-grammar", {"input_prefix": "x", "input_suffix": "", "grammar": "root ::= [0-9]+"}, field="grammar"),
    _infill("infill-json-schema-any", {"input_prefix": "x", "input_suffix": "", "json_schema": {}}, field="json_schema", stream=True),
    _infill("infill-n-probs", {"input_prefix": "x", "input_suffix": "", "n_probs": 5}, field="n_probs"),
    _infill("infill-lora", {"input_prefix": "x", "input_suffix": "", "lora": [{"id": 0, "scale": 0.5}]}, field="lora"),
    _infill("infill-ignore-eos", {"input_prefix": "x", "input_suffix": "", "ignore_eos": True}, field="ignore_eos"),
    _infill("infill-logit-bias", {"input_prefix": "x", "input_suffix": "", "logit_bias": [[15043, 1.0]]}, field="logit_bias"),
    _infill("infill-seed-over-uint64", {"input_prefix": "x", "input_suffix": "", "seed": 2**70, "temperature": 1}, field="seed", stream=True),
    _infill("infill-temperature-nine", {"input_prefix": "x", "input_suffix": "", "temperature": 9}, field="temperature", stream=True),
    _infill("infill-seed-over-uint64", {"input_prefix": "x", "input_suffix": "", "seed": 2**70, "temperature": 1}, field="seed"),
    _infill("infill-predict-ms-negative", {"input_prefix": "x", "input_suffix": "", "t_max_predict_ms": -5}, field="t_max_predict_ms"),
    _infill("infill-temperature-nine", {"input_prefix": "x", "input_suffix": "", "temperature": 9}, field="temperature"),
    # llama.cpp requires input_prefix and input_suffix; types are strict (llama.cpp takes its default for a
    # wrong type, silently: here a 400); JSON null is "not given"
    _infill("infill-empty-object", {}, field="input_prefix"),
    _infill("infill-no-suffix", {"input_prefix": "x"}, field="input_suffix", stream=True),
    _infill("infill-null-prefix", {"input_prefix": None, "input_suffix": ""}, field="input_prefix"),
    _infill("infill-n-predict-bool", {"input_prefix": "x", "input_suffix": "", "n_predict": True}, field="n_predict"),
    _infill("infill-n-predict-float", {"input_prefix": "x", "input_suffix": "", "n_predict": 5.0}, field="n_predict"),
    _infill("infill-stream-string", {"input_prefix": "x", "input_suffix": "", "stream": "true"}, field="stream"),
    _infill("infill-seed-string", {"input_prefix": "x", "input_suffix": "", "seed": "1"}, field="seed"),
    _infill("infill-extra-filename-number", {"input_prefix": "x", "input_suffix": "",
                                             "input_extra": [{"text": "y", "filename": 3}]}, field="input_extra.0.filename"),
    _c("completion-n-predict-string", {"prompt": "x", "n_predict": "4"}, field="n_predict", path="/completion"),
    _c("completion-stream-number", {"prompt": "x", "stream": 1}, field="stream", path="/completion"),
    _infill("infill-response-fields-number", {"input_prefix": "x", "input_suffix": "", "response_fields": [1]}, field="response_fields.0"),
    # POST /tokenize (llama.cpp)
    _tok("tokenize-nested-100k", NESTED, field="deeper"),
    _tok("tokenize-not-json", b"content=x", field="JSON"),
    _tok("tokenize-string-body", "x", field="JSON object"),
    _tok("tokenize-no-content", {}, field="content"),
    _tok("tokenize-content-number", {"content": 5}, field="content"),
    _tok("tokenize-content-lone-surrogate", {"content": "a\ud800b"}, field="content"),
    _tok("tokenize-content-over-chars", {"content": "a" * (MAX_PROMPT_CHARS + 1)}, field="max_prompt_chars"),
    _tok("tokenize-add-special-word", {"content": "x", "add_special": "maybe"}, field="add_special"),
    _tok("tokenize-over-body-limit", b'{"content": "' + b"a" * (MAX_BODY_BYTES + 16) + b'"}', 413, "max_body_bytes"),
]


@dataclass(frozen=True)
class FrameCase:
    id: str
    frame: bytes | str
    code: int
    field: str | None = None


def _complete(**params) -> bytes:
    return rpc.encode_request(1, "complete", {"uri": "file:///a.py", "prefix": "x = ", **params})


def _raw(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


FRAME_CASES = [
    FrameCase("ws-text-frame", '[0, 1, "initialize", {}]', rpc.PARSE_ERROR),
    FrameCase("ws-not-msgpack", b"\xc1\xc1\xc1", rpc.PARSE_ERROR),
    FrameCase("ws-empty-frame", b"", rpc.PARSE_ERROR),
    FrameCase("ws-nested-100k", b"\x91" * 100_000 + b"\x01", rpc.PARSE_ERROR),
    # a string that is not UTF-8 is read with U+FFFD (a lone surrogate from a JavaScript encoder): here the
    # method name, so the request is answered by its id as an unknown method
    FrameCase("ws-invalid-utf8-string", b"\x94\x00\x01\xa2\xc3\x28\x80", rpc.METHOD_NOT_FOUND),
    FrameCase("ws-map-not-array", _raw({"id": 1, "method": "initialize"}), rpc.INVALID_REQUEST),
    FrameCase("ws-response-from-client", _raw([1, 1, None, None]), rpc.INVALID_REQUEST),
    FrameCase("ws-bool-id", _raw([0, True, "initialize", {}]), rpc.INVALID_REQUEST),
    FrameCase("ws-float-id", _raw([0, 1.5, "initialize", {}]), rpc.INVALID_REQUEST),
    FrameCase("ws-method-number", _raw([0, 1, 5, {}]), rpc.INVALID_REQUEST),
    FrameCase("ws-params-list", _raw([0, 1, "complete", [1]]), rpc.INVALID_REQUEST),
    FrameCase("ws-params-ext-type", _raw([0, 1, "complete", msgpack.ExtType(5, b"xx")]), rpc.INVALID_REQUEST),
    FrameCase("ws-unknown-method", rpc.encode_request(1, "frobnicate"), rpc.METHOD_NOT_FOUND),
    FrameCase("ws-over-frame-limit", _complete(suffix="a" * (1 << 20)), rpc.MESSAGE_TOO_LARGE, "limit"),
    FrameCase("ws-complete-no-uri", rpc.encode_request(1, "complete", {"prefix": "x"}), rpc.INVALID_PARAMS, "uri"),
    FrameCase("ws-complete-no-prefix", rpc.encode_request(1, "complete", {"uri": "u"}), rpc.INVALID_PARAMS, "prefix"),
    FrameCase("ws-complete-prefix-number", _complete(prefix=5), rpc.INVALID_PARAMS, "prefix"),
    FrameCase("ws-complete-prefix-nil", _complete(prefix=None), rpc.INVALID_PARAMS, "prefix"),
    FrameCase("ws-complete-prefix-over-chars", _complete(prefix="a" * 200_001), rpc.INVALID_PARAMS, "prefix"),
    FrameCase("ws-complete-mode-unknown", _complete(mode="fast"), rpc.INVALID_PARAMS, "mode"),
    FrameCase("ws-complete-max-tokens-zero", _complete(max_tokens=0), rpc.INVALID_PARAMS, "max_tokens"),
    FrameCase("ws-complete-max-tokens-huge", _complete(max_tokens=10**6), rpc.INVALID_PARAMS, "max_tokens"),
    FrameCase("ws-complete-max-time-negative", _complete(max_time_ms=-1), rpc.INVALID_PARAMS, "max_time_ms"),
    FrameCase("ws-complete-temperature-nine", _complete(temperature=9), rpc.INVALID_PARAMS, "temperature"),
    FrameCase("ws-complete-seed-negative", _complete(seed=-1), rpc.INVALID_PARAMS, "seed"),
    FrameCase("ws-complete-gaps-zero", _complete(gaps=[0]), rpc.INVALID_PARAMS, "gaps"),
    FrameCase("ws-complete-gaps-five", _complete(gaps=[8, 16, 24, 32, 40]), rpc.INVALID_PARAMS, "gaps"),
    FrameCase("ws-complete-stop-empty", _complete(stop=[""]), rpc.INVALID_PARAMS, "stop"),
    FrameCase("ws-complete-stop-17", _complete(stop=[f"s{i}" for i in range(17)]), rpc.INVALID_PARAMS, "stop"),
    FrameCase("ws-complete-context-string", _complete(context="x"), rpc.INVALID_PARAMS, "context"),
    FrameCase("ws-complete-context-text-number", _complete(context=[{"text": 5}]), rpc.INVALID_PARAMS, "context[0]"),
    FrameCase("ws-complete-context-path-number", _complete(context=[{"text": "x", "path": 1}]), rpc.INVALID_PARAMS,
              "context[0].path"),  # (it was taken as the path "1")
    FrameCase("ws-complete-context-33-chunks", _complete(context=[{"text": "x"}] * 33), rpc.INVALID_PARAMS, "context"),
    FrameCase("ws-complete-indent-negative", _complete(indent=-1), rpc.INVALID_PARAMS, "indent"),
    FrameCase("ws-complete-multiline-string", _complete(multiline="yes"), rpc.INVALID_PARAMS, "multiline"),
    FrameCase("ws-complete-version-string", _complete(version="v1"), rpc.INVALID_PARAMS, "version"),
    FrameCase("ws-cancel-no-id", rpc.encode_request(1, "cancel", {}), rpc.INVALID_PARAMS, "id"),
    FrameCase("ws-accept-negative-length", rpc.encode_request(1, "accept", {"id": 7, "accepted_length": -1}),
              rpc.INVALID_PARAMS, "accepted_length"),
    FrameCase("ws-accept-length-string", rpc.encode_request(1, "accept", {"id": 7, "accepted_length": "all"}),
              rpc.INVALID_PARAMS, "accepted_length"),
]
