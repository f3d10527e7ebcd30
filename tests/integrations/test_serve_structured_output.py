"""Structured outputs end to end (integrations/structured_output.py): the Ray Serve app on the tiny random
model, the openai SDK as the client. A random model writes no JSON by itself; whatever it prefers, the
constrained output parses into what was asked for."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("llguidance")

MESSAGES = [{"role": "user", "content": "Describe the item as JSON."}]
REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "refusion-tiny-code"


class Item(BaseModel):  # bounded fields: every output completes within max_tokens
    name: str = Field(max_length=6)
    size: int = Field(ge=0, le=999)
    ok: bool
    tags: list[str] = Field(max_length=2)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "sampled"])
def test_sdk_parse_gets_the_pydantic_model(client, model, sampling):
    # The SDK turns Item into a strict json_schema response_format and parses the reply into an Item.
    out = client.chat.completions.parse(model=model, messages=MESSAGES, response_format=Item, max_tokens=120,
                                        **sampling)
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Item)
    assert out.model_extra["refusion"]["mode"] == "ar"  # grammar requests decode autoregressively
    # the schema's keys and punctuation are forced: fed without forwards of their own (jump-forward)
    assert out.model_extra["refusion"]["tokens_per_forward"] > 1.2, out.model_extra


def test_json_object_streamed(client, model):
    stream = client.chat.completions.create(model=model, messages=MESSAGES, response_format={"type": "json_object"},
                                            max_tokens=200, stream=True, extra_body={"structured_outputs": None})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # any object is allowed and a random model may nest until the cap; what it wrote is a JSON object's start
    assert text.startswith("{")
    try:
        assert isinstance(json.loads(text), dict)
    except ValueError:
        assert len(text) > 20  # cut by max_tokens mid-object, never invalid before the cut


def test_vllm_structured_outputs_on_completions(client, model):
    out = client.completions.create(model=model, prompt="answer = ", max_tokens=16,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert out.choices[0].text in ("yes", "no", "maybe") and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=model, prompt="id = ", max_tokens=24, temperature=1.0, seed=5,
                                    extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{4}"}})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", out.choices[0].text)
    out = client.completions.create(model=model, prompt="flag = ", max_tokens=16,
                                    extra_body={"structured_outputs": {"grammar": 'root ::= "on" | "off"'}})  # GBNF
    assert out.choices[0].text in ("on", "off")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["required", "named"])
def test_forced_tool_calls_always_parse_and_match_the_schema(client, model, choice):
    # one call: a named choice always (OpenAI), "required" with parallel_tool_calls false
    for seed in range(3):
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                             tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=1.0, seed=seed,
                                             parallel_tool_calls=False)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls", message.content
        assert len(message.tool_calls) == 1 and not message.content
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            if call.function.name == "add" or isinstance(choice, dict):
                assert call.function.name == "add" and set(arguments) == {"a", "b"}
                assert all(type(v) is int and 0 <= v <= 99 for v in arguments.values())
            else:
                assert call.function.name == "get_weather" and isinstance(arguments["city"], str)


def test_required_tool_calls_may_be_parallel(client, model):
    # "required" without parallel_tool_calls: one or more calls (seeded sampling: the same calls every run)
    counts = []
    for seed in range(4):
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                             tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0,
                                             seed=seed)
        message = out.choices[0].message
        assert message.tool_calls, message.content  # at least one, always
        assert all(c.function.name in ("get_weather", "add") and isinstance(json.loads(c.function.arguments), dict)
                   for c in message.tool_calls)
        counts.append(len(message.tool_calls))
    assert max(counts) >= 2, counts


def test_auto_tool_choice_text_or_valid_calls(client, model):
    # tool_choice auto: the model may answer in text; any <tool_call> block it opens is a valid call
    for seed in range(4):
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                             tools=TOOLS, max_tokens=60, temperature=1.0, seed=seed)
        message = out.choices[0].message
        assert "<tool_call>" not in (message.content or "") or out.choices[0].finish_reason == "length"
        for call in message.tool_calls or []:
            assert call.function.name in ("get_weather", "add")
            json.loads(call.function.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tools_with_a_format_call_tools_or_answer_in_the_format(client, model, tiny_model_dir, stream):
    """tools + response_format with tool_choice unset (OpenAI accepts both: the OpenAI Agents SDK sends an
    agent's tools with its output_type so, LangChain's bind_tools(response_format=...) too): the turn is
    valid calls or JSON of the format. Each branch forced by a logit_bias on its first token (the
    reported text is the grammar's either way)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = {"type": "json_schema", "json_schema": {"name": "final_output", "strict": True,
                                                  "schema": Item.model_json_schema()}}
    for first, branch in ((tok.encode("<tool_call>", add_special_tokens=False)[0], "calls"),
                          (tok.encode("{", add_special_tokens=False)[0], "answer")):
        out = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, response_format=fmt,
                                             max_tokens=120, logit_bias={str(first): 100}, stream=stream,
                                             parallel_tool_calls=False)  # one call: the bias would repeat it
        if stream:
            chunks = list(out)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
            named = [t.function.name for t in calls if t.function and t.function.name]
        else:
            message = out.choices[0].message
            content, named = message.content or "", [t.function.name for t in message.tool_calls or []]
        if branch == "calls":
            assert named and set(named) <= {"get_weather", "add"} and not content.strip(), (named, content)
        else:
            assert not named and Item.model_validate_json(content), content
    if not stream:  # the Responses API (text.format with tools, the Agents SDK's other path): either one
        tools = [{"type": "function", **t["function"]} for t in TOOLS]
        text = {"format": {"type": "json_schema", "name": "final_output", "strict": True,
                           "schema": Item.model_json_schema()}}
        for seed in range(3):
            out = client.responses.create(model=model, input=MESSAGES, tools=tools, text=text, max_output_tokens=120,
                                          temperature=1.0, extra_body={"seed": seed}, parallel_tool_calls=False)
            calls = [item for item in out.output if item.type == "function_call"]
            assert calls or Item.model_validate_json(out.output_text), out.output
            assert all(c.name in ("get_weather", "add") and isinstance(json.loads(c.arguments), dict) for c in calls)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
      "mode": "refusion"}, "mode"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "tools": TOOLS}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools.0.function.parameters"),
], ids=["bad-schema", "refusion-mode", "no-json-schema", "unknown-type", "bad-regex", "two-kinds", "bad-lark",
        "both-fields", "vllm-format-with-auto-tools", "bad-tool-schema"])
def test_bad_structured_output_requests_are_400_naming_the_field(client, model, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, extra_body=body)
    error = err.value.body
    assert error["param"] == param, error
    assert err.value.status_code == 400


def test_structured_output_with_suffix_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x = ", suffix="\n", max_tokens=8,
                                  extra_body={"structured_outputs": {"choice": ["1"]}})
    assert err.value.body["param"] == "structured_outputs"


# ---- found by a break-test: each of these once crashed the server, answered 500, or passed text the
# grammar does not match off as complete ------------------------------------------------------------

@pytest.mark.parametrize("structured, param", [
    ({"regex": "a{1000000}"}, "structured_outputs.regex"),  # lexer limit, met at the first token
    ({"regex": "[^\\x00-\\x{10FFFF}]"}, "structured_outputs.regex"),  # matches no text
    ({"grammar": 'start: "a" x\nx: x'}, "structured_outputs.grammar"),  # dead-ends after "a", mid-request
], ids=["lexer-limit", "matches-nothing", "dead-end"])
def test_grammars_that_cannot_be_served_are_400s_not_500s_or_empty_stops(client, model, structured, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                       extra_body={"structured_outputs": structured})
    assert err.value.body["param"] == param, err.value.body
    assert "<state>" not in err.value.body["message"] and len(err.value.body["message"]) < 600  # no parser dump
    assert client.models.list().data  # still serving


def test_literals_that_spell_special_tokens_come_out_as_text(client, model):
    """A forced literal spelling a special token was a 400 ("forced tokens were refused"; a break-test):
    it is written with ordinary tokens, through every grammar front end."""
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                         extra_body={"structured_outputs": {"choice": ["<|mask|>"]}})
    assert out.choices[0].message.content == "<|mask|>"
    out = client.completions.create(model=model, prompt="x", max_tokens=20,
                                    extra_body={"structured_outputs": {"regex": "<[|]mask[|]> ok"}})
    assert out.choices[0].text == "<|mask|> ok"
    schema = {"type": "object", "properties": {"t": {"enum": ["<|endoftext|>"]}}, "required": ["t"],
              "additionalProperties": False}
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=48, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert json.loads(out.choices[0].message.content) == {"t": "<|endoftext|>"}


def test_many_choices_and_text_the_chat_template_would_stop_at(client, model):
    choices = [f"city{i}" for i in range(3000)]  # past llguidance's 2,000-alternative Earley row limit
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                         extra_body={"structured_outputs": {"choice": choices}})
    assert out.choices[0].message.content in choices
    # the plain chat template ends a turn at "\n### "; with a grammar the grammar ends it
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=32,
                                         extra_body={"structured_outputs": {"choice": ["intro\n### Details"]}})
    assert out.choices[0].message.content == "intro\n### Details"


def test_a_tool_schema_only_infinite_json_satisfies_is_named_in_plain_words(client, model):
    """An object whose required property is the object again (`{"$ref": "#"}`) admits no finite JSON: the
    forced call failed in decoding with a 400 naming `tools` and the parser's internals ("Too many items
    (limit 50000; ff_tokens)"; helper-167). It names the tool's parameters and says what to change."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, tools=tools, tool_choice="required")
    assert err.value.body["param"] == "tools.0.function.parameters", err.value.body
    message = err.value.body["message"]
    assert "grows without end" in message and "make the recursion optional" in message and "ff_tokens" not in message
    assert client.models.list().data  # still serving


def test_tool_argument_schemas_keep_their_data_and_must_be_objects(client, model):
    const = {"properties": {"a": 1}}  # data that looks like a schema: never rewritten
    tools = [{"type": "function", "function": {"name": "k", "parameters": {
        "type": "object", "properties": {"c": {"const": const}}, "required": ["c"]}}}]
    out = client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, tool_choice="required",
                                         max_tokens=40)
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"c": const}
    for parameters, body in (({"type": "string"}, {}),
                             ({"type": "object"}, {"response_format": {"type": "json_schema", "json_schema": {
                                 "name": "x", "schema": {"type": "bogus"}}}})):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, tool_choice="required",
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}],
                                           extra_body=body)
        expected = "response_format.json_schema.schema" if body else "tools.0.function.parameters"
        assert err.value.body["param"] == expected, err.value.body


def test_chained_rules_deeper_than_a_thread_stack_compile_in_a_subprocess():
    # 5,000 chained Lark rules and a 1,000-deep $ref chain once overflowed llguidance's compile stack
    # (a segfault: the server process died). Run in a child so a regression fails this test, not pytest.
    import subprocess
    import sys

    code = (
        "from integrations.structured_output import lark_grammar, json_grammar\n"
        "rules = '\\n'.join(f'x{i}: \"a\" x{i+1} | \"b\"' for i in range(5000)) + '\\nx5000: \"c\"\\n'\n"
        "lark_grammar('start: x0\\n' + rules, 'g')\n"
        "defs = {f'd{i}': {'anyOf': [{'type': 'integer'}, {'type': 'array', 'items': {'$ref': f'#/$defs/d{i+1}'}}]}"
        " for i in range(1000)}\n"
        "defs['d1000'] = {'type': 'string'}\n"
        "json_grammar({'$defs': defs, '$ref': '#/$defs/d0'}, 's')\n"
        "from transformers import AutoTokenizer\n"
        "from decoding.grammar import Grammar, GrammarSpec, GrammarTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(SHIPPED)!r})\n"
        "Grammar(GrammarTokenizer(tok, 8192, 0), GrammarSpec(lark_grammar('start: x0\\n' + rules, 'g')), [1])\n"
        "print('compiled')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "compiled" in done.stdout, (done.returncode, done.stderr[-2000:])


# ---- found by a second break-test, on the Ray Serve deployment ---------------------------------------

class Address(BaseModel):
    city: str = Field(max_length=8)
    zip: int = Field(ge=0, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=8)
    home: Address  # a nested model: pydantic writes it as a $ref into $defs


def test_forced_tool_call_with_nested_models_resolves_its_refs(client, model):
    tool = openai.pydantic_function_tool(Person)  # parameters with $defs/Address and a $ref to it
    assert "$defs" in json.dumps(tool["function"]["parameters"])
    for choice in ("required", {"type": "function", "function": {"name": "Person"}}):
        out = client.chat.completions.create(model=model, messages=MESSAGES, tools=[tool], tool_choice=choice,
                                             max_tokens=80, temperature=1.0, seed=2)
        (call,) = out.choices[0].message.tool_calls
        Person.model_validate_json(call.function.arguments)  # the nested object came out whole and typed


def test_tool_schemas_with_keywords_the_grammar_engine_lacks_still_constrain_the_rest(client, model):
    """Tool schemas written for hosted models use keywords llguidance does not implement (Claude Code's
    use `propertyNames`): they are ignored in tool grammars, not refused, and every other keyword still
    binds the call; a response_format schema with one is still a 400 (asked for explicitly)."""
    parameters = {"type": "object", "required": ["c", "m"], "properties": {
        "c": {"const": "yes"}, "m": {"type": "object", "maxProperties": 0, "propertyNames": {"pattern": "^[a-z]+$"}}}}
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, tool_choice="required",
                                         temperature=1.0, seed=4,
                                         tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}])
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"c": "yes", "m": {}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": parameters}})
    assert err.value.body["param"] == "response_format.json_schema.schema" and "propertyNames" in err.value.body["message"]


def test_a_zod_record_schema_is_a_usable_response_format(client, model):
    """zod 4 writes `propertyNames: {"type": "string"}` for every z.record() (openai-node's
    zodResponseFormat, the Vercel AI SDK): a rule every JSON object meets, so it is dropped, not refused
    as an unimplemented keyword; the output is still bound by the rest of the schema."""
    schema = {"type": "object", "required": ["d"], "additionalProperties": False, "properties": {
        "d": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {"type": "integer"}}}}
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=48, temperature=1.0, seed=2,
                                         response_format={"type": "json_schema", "json_schema": {
                                             "name": "scores", "strict": True, "schema": schema}})
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        value = json.loads(choice.message.content)
        assert set(value) == {"d"} and all(isinstance(v, int) for v in value["d"].values()), value
    else:  # cut at max_tokens: still a prefix of such an object
        assert choice.message.content.startswith('{"d": {'), choice.message.content
    # zod's .describe() on a record key, and other rules every key meets, are dropped alike
    for rule in ({"type": "string", "description": "key"}, {}, True, {"type": ["string"]}):
        loose = {**schema, "properties": {"d": {**schema["properties"]["d"], "propertyNames": rule}}}
        out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "scores", "schema": loose}})
        assert out.choices[0].message.content.startswith("{"), rule
    # with tools and tool_choice auto the format joins the calls in one grammar: the record works there too
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, tools=tools, response_format={
        "type": "json_schema", "json_schema": {"name": "scores", "strict": True, "schema": schema}})
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_parameters_must_be_object_schemas(client, model):
    for parameters in ({"anyOf": [{"type": "string"}]}, {"properties": {"a": {"type": "string"}}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, tool_choice="required",
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}])
        assert err.value.body["param"] == "tools.0.function.parameters", err.value.body
    # a required key the properties do not list stays allowed (closing the object would forbid it)
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=60, tool_choice="required", temperature=1.0, seed=1,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "required": ["z"], "properties": {"a": {"type": "integer", "maximum": 9}}}}}])
    assert out.choices[0].message.tool_calls or out.choices[0].finish_reason == "length"


def test_grammar_output_is_never_restyled_and_ends_as_stop_at_exactly_max_tokens(client, model):
    # a CRLF or tab-indented prompt: free completions come back in the prompt's style; grammar output as is
    out = client.completions.create(model=model, prompt="x = 1\r\n\ty = 2\r\n", max_tokens=16,
                                    extra_body={"structured_outputs": {"choice": ["a\nb", "    c"]}})
    assert out.choices[0].text in ("a\nb", "    c")
    # an output the grammar completes at exactly max_tokens is whole: "stop", and parse() accepts it
    n = client.completions.create(model=model, prompt="x", max_tokens=32,
                                  extra_body={"structured_outputs": {"grammar": 'start: "a b c d e f g h"'}}).usage
    out = client.completions.create(model=model, prompt="x", max_tokens=n.completion_tokens,
                                    extra_body={"structured_outputs": {"grammar": 'start: "a b c d e f g h"'}})
    assert out.choices[0].text == "a b c d e f g h" and out.choices[0].finish_reason == "stop"


def test_gbnf_with_a_rule_named_start_and_strict_schemas_close_objects(client, model):
    out = client.completions.create(model=model, prompt="x", max_tokens=8,
                                    extra_body={"structured_outputs": {"grammar": 'root ::= start\nstart ::= "ok"'}})
    assert out.choices[0].text == "ok"
    schema = {"type": "object", "properties": {"k": {"type": "integer", "maximum": 9}}, "required": ["k"]}
    for seed in range(3):  # strict: no invented keys next to "k", even though the schema does not say so
        out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=1.5, seed=seed,
                                             response_format={"type": "json_schema", "json_schema": {
                                                 "name": "k", "schema": schema, "strict": True}})
        assert list(json.loads(out.choices[0].message.content)) == ["k"]
