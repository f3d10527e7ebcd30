"""integrations/structured_output.py on the schemas and grammars agent frameworks send (a break-test's
cases), without Ray: a valid schema compiles for a forced call as for an auto one, and the compiled
grammar accepts the JSON it should, matched token by token with the shipped tokenizer."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from integrations.chat_run import chat_grammar
from integrations.json_schemas import closed_objects
from integrations.openai_models import ChatCompletionRequest
from integrations.request_limits import InputError
from integrations.structured_output import json_grammar, lark_grammar, tool_grammar


def _tools(parameters: dict, strict: bool | None = None) -> list:
    function = {"name": "t", "parameters": parameters} | ({"strict": strict} if strict is not None else {})
    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                 tools=[{"type": "function", "function": function}]).tools


def _call(arguments: dict) -> str:
    return '<tool_call>{"name": "t", "arguments": ' + json.dumps(arguments) + "}</tool_call>"


ALL_OF = {"type": "object", "allOf": [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]}
BASE_REF = {"type": "object", "$defs": {"Base": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                 "required": ["a"]}},
            "allOf": [{"$ref": "#/$defs/Base"}, {"type": "object", "properties": {"b": {"type": "string"}},
                                                 "required": ["b"]}]}


@pytest.mark.parametrize("schema", [ALL_OF, BASE_REF], ids=["allOf", "allOf-ref"])
def test_merged_objects_are_not_closed_part_by_part(schema, accepts):
    """Each allOf part was closed (additionalProperties false), so no object could have both parts' keys:
    every request with such a tool was a 400 "Unsatisfiable schema", on every route."""
    assert closed_objects(schema) == schema
    for forced in (None, ""):
        grammar = tool_grammar(_tools(schema), forced, 0).grammar
        assert accepts(grammar, _call({"a": 2, "b": "x"}))
    assert accepts(json_grammar(closed_objects(schema), "response_format"), '{"a": 2, "b": "x"}')


@pytest.mark.parametrize("schema, arguments", [
    # a parameter named like a keyword: a property, not $defs (it was dropped, and required ones unsatisfiable)
    ({"type": "object", "properties": {"word": {"type": "string"}, "definitions": {"type": "array", "items": {
        "type": "string"}}}, "required": ["word", "definitions"]}, {"word": "w", "definitions": ["d"]}),
    ({"type": "object", "$defs": {"U": {"enum": ["c", "f"]}}, "properties": {"default": {"$ref": "#/$defs/U"}},
      "required": ["default"]}, {"default": "c"}),
    # a root $id: the moved schema resolved its refs against it ("Pointer '/$defs/t0_Q' does not exist")
    ({"$id": "https://example.com/q.json", "type": "object", "$defs": {"Q": {"type": "integer"}},
      "properties": {"q": {"$ref": "#/$defs/Q"}}, "required": ["q"]}, {"q": 3}),
    # an $anchor ref ("#q" was rewritten to "#/$defs/t0q")
    ({"type": "object", "$defs": {"Q": {"$anchor": "q", "type": "integer"}}, "properties": {"q": {"$ref": "#q"}},
      "required": ["q"]}, {"q": 3}),
    # refs through a root $id, absolute or relative to it ("... is not present in a registry" for a forced call)
    ({"$id": "https://example.com/w.json", "type": "object", "$defs": {"U": {"enum": ["c", "f"]}},
      "properties": {"u": {"$ref": "https://example.com/w.json#/$defs/U"}, "v": {"$ref": "w.json#/$defs/U"}},
      "required": ["u", "v"]}, {"u": "c", "v": "f"}),
    # a zod 4 z.record() (a strict tool's auto call: "Unimplemented keys: [propertyNames]")
    ({"type": "object", "properties": {"m": {"type": "object", "propertyNames": {"type": "string"},
                                             "additionalProperties": {"type": "integer"}}}, "required": ["m"]},
     {"m": {"a": 1}}),
], ids=["property-named-definitions", "property-named-default", "root-id", "anchor", "ref-via-root-id", "record"])
def test_a_forced_call_takes_every_schema_an_auto_call_takes(schema, arguments, accepts):
    for strict in (None, True):
        for forced in (None, "", "t"):
            assert accepts(tool_grammar(_tools(schema, strict), forced, 0).grammar, _call(arguments)), (strict, forced)


def test_a_root_ref_to_its_own_definition_is_that_object(accepts):
    """pydantic's model_json_schema() of a self-referencing model has a root that only refers to its own
    definition; as a tool's parameters it was a 400 ("must be an object schema ... got type None") while
    the same schema was taken as response_format (helper-167). The definition is the root now: calls
    match it, nested ones included, and the recursion still resolves; a root $ref elsewhere stays a 400."""
    from pydantic import BaseModel

    class Node(BaseModel):
        name: str
        children: list["Node"] = []

    schema = Node.model_json_schema()
    assert schema["$ref"] == "#/$defs/Node" and "type" not in schema
    tools = _tools(schema)
    assert tools[0].function.parameters["type"] == "object"
    tree = {"name": "a", "children": [{"name": "b", "children": []}]}
    for forced in (None, "", "t"):
        grammar = tool_grammar(tools, forced, 0).grammar
        assert accepts(grammar, _call(tree)), forced
        assert not accepts(grammar, _call({"name": "a", "children": [{"children": []}]})), forced  # b's name is required
    with pytest.raises(InputError, match="must be an object schema"):
        tool_grammar(_tools({"$ref": "https://example.com/node.json"}), "", 0)


def test_a_merge_leaves_only_its_own_parts_open(accepts):
    """One allOf anywhere left the whole schema open: a strict call could invent top-level keys."""
    schema = {"type": "object", "$defs": {"Base": {"type": "object", "properties": {"a": {"type": "integer"}}},
                                          "Other": {"type": "object", "properties": {"o": {"type": "integer"}}}},
              "properties": {"city": {"type": "string"}, "other": {"$ref": "#/$defs/Other"},
                             "meta": {"allOf": [{"$ref": "#/$defs/Base"}, {"type": "object", "properties": {
                                 "b": {"type": "object", "properties": {"z": {"type": "integer"}}}}}]}},
              "required": ["city"]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and closed["$defs"]["Other"]["additionalProperties"] is False
    assert closed["$defs"]["Base"] == schema["$defs"]["Base"]  # a merged part, by its $ref
    assert closed["properties"]["meta"] == schema["properties"]["meta"]  # the merge, whole
    grammar = tool_grammar(_tools(schema, strict=True), "t", 0).grammar
    assert accepts(grammar, _call({"city": "x", "other": {"o": 1}, "meta": {"a": 1, "b": {"z": 2}}}))  # (in order)
    for invented in ({"city": "x", "extra": 1}, {"city": "x", "other": {"p": 1}}):
        assert not accepts(grammar, _call(invented)), invented


_OBJ_A = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
_OBJ_B = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}


@pytest.mark.parametrize("schema", [
    # an anyOf inside an allOf part: its branches were closed, and no object had both parts' keys
    {"type": "object", "properties": {"s": {"allOf": [_OBJ_A, {"anyOf": [_OBJ_B]}]}}, "required": ["s"]},
    # a $ref chain from a part: the def at its end was closed
    {"type": "object", "$defs": {"A": {"$ref": "#/$defs/B"}, "B": _OBJ_A},
     "properties": {"s": {"allOf": [{"$ref": "#/$defs/A"}, _OBJ_B]}}, "required": ["s"]},
    # a def that is a union of refs
    {"type": "object", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/B"}]}, "B": _OBJ_A},
     "properties": {"s": {"allOf": [{"$ref": "#/$defs/A"}, _OBJ_B]}}, "required": ["s"]},
], ids=["anyOf-in-a-part", "ref-chain", "union-def"])
def test_what_a_merge_reaches_stays_open_however_deep(schema, accepts):
    """helper-148: closing only a merge's top level made these unsatisfiable (a 400 for every call)."""
    for strict in (None, True):
        for forced in (None, "t"):
            grammar = tool_grammar(_tools(schema, strict), forced, 0).grammar
            assert accepts(grammar, _call({"s": {"a": 1, "b": 2}})), (strict, forced)


def test_a_strict_tool_refuses_keywords_it_cannot_enforce():
    """strict: true ignored uniqueItems (and oneOf) silently, and [1, 1] came back as a complete call."""
    schema = {"type": "object", "properties": {"v": {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}},
              "required": ["v"]}
    tool_grammar(_tools(schema), "", 0)  # not strict: lenient, as documented
    with pytest.raises(InputError) as err:
        tool_grammar(_tools(schema, strict=True), "", 0)
    assert err.value.field == "tools.0.function.parameters" and "uniqueItems" in err.value.message


def test_one_of_is_refused_in_the_clients_words():
    with pytest.raises(InputError) as err:
        json_grammar({"type": "object", "properties": {"v": {"oneOf": [{"type": "integer", "minimum": 10},
                                                                      {"type": "integer", "maximum": 5}]}}},
                     "response_format.json_schema.schema")
    assert "use anyOf" in err.value.message and "coerce_one_of" not in err.value.message


@pytest.mark.parametrize("gbnf, text", [
    ('root ::= "\\u00e9"', "é"), ('root ::= [\\u0430-\\u044f]+', "привет"), ('root ::= "\\U0001F600"', "😀"),
    ('root ::= "a\\u0022b"', 'a"b'), ('root ::= "\\x41"', "A"),
])
def test_gbnf_unicode_escapes_compile_as_llama_cpp_reads_them(gbnf, text, accepts):
    """llama.cpp's \\uXXXX escapes lost their leading zeros in the converter ("\\u00e9" -> "\\ue9"): a 400."""
    assert accepts(lark_grammar(gbnf, "grammar"), text)


def _chat(**fields) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer"}}, "required": ["n"]}}}]
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": tools} | fields)


def test_what_a_forced_call_cannot_be_combined_with_is_named():
    """mode "refusion" decoded a forced call unconstrained (arguments {} came back as a complete call);
    structured_outputs beside a forced call was dropped silently."""
    named = {"type": "function", "function": {"name": "g"}}
    for choice in ("required", named):
        with pytest.raises(InputError) as err:
            chat_grammar(_chat(tool_choice=choice, mode="refusion"), 0)
        assert err.value.field == "mode"
        with pytest.raises(InputError) as err:
            chat_grammar(_chat(tool_choice=choice, structured_outputs={"regex": "[a-z]+"}), 0)
        assert err.value.field == "structured_outputs"
    assert chat_grammar(_chat(tool_choice="auto", mode="refusion"), 0) is None  # auto: parsed from the text


@pytest.mark.parametrize("fields, named", [
    ({"tool_choice": "required", "guided_regex": "[a-z]+"}, "guided_regex"),
    ({"tool_choice": "auto", "guided_json": {"type": "object"}}, "guided_json"),
    ({"tool_choice": "auto", "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
])
def test_a_format_that_does_not_combine_with_tools_is_named_as_sent(fields, named):
    """vLLM's older guided_* fields were named `structured_outputs`, a field the client never sent."""
    with pytest.raises(InputError) as err:
        chat_grammar(_chat(**fields), 0)
    assert err.value.field == named


@pytest.mark.parametrize("response_format, key", [
    ({"type": "json_object", "schema": {"type": "object"}}, "schema"),  # Together's form: the schema went unenforced
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "foo": 1}}, "foo"),
])
def test_unknown_response_format_keys_are_refused(response_format, key):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "response_format": response_format})
    assert err.value.errors()[0]["loc"][-1] == key


def test_a_function_without_parameters_takes_no_arguments(accepts):
    """OpenAI: "Omitting parameters defines a function with an empty parameter list". It took any object,
    so a forced call of a no-argument tool came back with invented keys; `parameters: {}` constrains
    nothing (JSON Schema's empty schema) but arguments stay an object."""
    tools = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                  tools=[{"type": "function", "function": {"name": "t"}}]).tools
    for forced in (None, "", "t"):
        grammar = tool_grammar(tools, forced, 0).grammar
        assert accepts(grammar, _call({})), forced
        assert not accepts(grammar, _call({"manager": "url"})), forced
    for forced in (None, "t"):
        grammar = tool_grammar(_tools({}), forced, 0).grammar
        assert accepts(grammar, _call({"any": 1})) and not accepts(grammar, '<tool_call>{"name": "t", "arguments": [1]}'
                                                                            '</tool_call>'), forced


SCHEMA_KEYWORDS = ["type", "properties", "required", "items", "additionalProperties", "$defs", "definitions", "$ref",
                   "anyOf", "oneOf", "allOf", "enum", "const", "prefixItems", "patternProperties", "propertyNames",
                   "minItems", "maxLength", "pattern", "format", "$id", "$anchor", "not", "if", "dependentSchemas"]
ODD_VALUES = [1, "x", [1], {"a": 1}, None, True, False, [{"x": 1}], [], {}, -1, 1.5]


def test_a_malformed_schema_anywhere_is_a_400_on_every_path_that_compiles_one():
    """Every keyword given every wrongly typed value, at the root and one property down, through each
    path that compiles a client's schema (auto, required and named tool calls, response_format strict or
    not, tools with a response format): an InputError or a grammar, never another exception (a `required`
    list of objects and a non-object `$defs` were TypeError / AttributeError: HTTP 500s)."""
    escaped = []
    for key, value in [(k, v) for k in SCHEMA_KEYWORDS for v in ODD_VALUES]:
        for schema in ({"type": "object", key: value} if key != "type" else {"type": value},
                       {"type": "object", "properties": {"a": {key: value}}, "required": ["a"]}):
            def turn(strict: bool, tools: list | None = None) -> ChatCompletionRequest:
                return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": tools,
                                                             "response_format": {"type": "json_schema", "json_schema": {
                                                                 "name": "n", "schema": schema, "strict": strict}}})

            paths = [lambda: tool_grammar(_tools(schema), None, 0), lambda: tool_grammar(_tools(schema), "", 0),
                     lambda: tool_grammar(_tools(schema), "t", 0), lambda: chat_grammar(turn(False), 0),
                     lambda: chat_grammar(turn(True), 0),
                     lambda: chat_grammar(turn(False, [{"type": "function", "function": {"name": "t", "parameters": schema}}]), 0)]
            for i, path in enumerate(paths):
                try:
                    path()
                except (InputError, ValidationError):  # a 400 either way
                    pass
                except Exception as exc:  # noqa: BLE001 - what the test looks for
                    escaped.append((key, value, i, f"{type(exc).__name__}: {exc}"))
    assert not escaped, escaped[:5]


INT64_MIN = -(1 << 63)


@pytest.mark.parametrize("schema, where", [
    ({"const": INT64_MIN}, "const"),
    ({"enum": [1, INT64_MIN + 512]}, "enum.1"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MIN + 8}}},
     "properties.a."),
    ({"type": "integer", "maximum": 123456789012345678901234567890}, "maximum"),
    ({"type": "integer", "const": -1e19}, "const"),  # a float where an integer is read: crashed too
])
def test_integers_the_grammar_engine_cannot_read_are_a_400_before_it_sees_them(schema, where):
    # llguidance 1.9.1 crashed the process (SIGSEGV in validate_grammar) on an integer within 512 of the
    # int64 minimum, in a schema or in a Lark grammar's %json: a whole replica died for one request
    # (found probing a break-test's finding). Each path names the field and where the integer is.
    with pytest.raises(InputError) as err:
        json_grammar(schema, "response_format.json_schema.schema")
    assert err.value.field == "response_format.json_schema.schema" and f"at {where}" in err.value.message
    with pytest.raises(InputError) as err:
        lark_grammar(f"start: %json {json.dumps(schema)}", "structured_outputs.grammar")
    assert err.value.field == "structured_outputs.grammar" and "%json schema's " + where in err.value.message
    with pytest.raises(InputError) as err:
        tool_grammar(_tools({"type": "object", "properties": {"x": schema}}), "", 0)
    assert err.value.field == "tools.0.function.parameters" and "properties.x." + where in err.value.message
    with pytest.raises(InputError, match="more digits"):  # past Python's JSON reader (4,300 digits)
        lark_grammar('start: %json {"const": -' + "9" * 5000 + "}", "structured_outputs.grammar")


def test_integers_at_the_ends_of_the_readable_range_compile(accepts):
    low, high = INT64_MIN + 1024, (1 << 64) - 1
    grammar = json_grammar({"type": "object", "properties": {"a": {"type": "integer", "minimum": low},
                                                             "b": {"type": "integer", "maximum": high}}},
                           "response_format.json_schema.schema")
    assert accepts(grammar, json.dumps({"a": 5, "b": 7}, separators=(", ", ": ")))


def test_structured_outputs_json_takes_the_schemas_true_and_false_as_response_format_does(accepts):
    # JSON Schema's boolean schemas (a break-test found `true` refused here while response_format took it)
    def body(schema):
        return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], structured_outputs={"json": schema})

    grammar = body(True).output_grammar()
    assert accepts(grammar.grammar, "[1, 2]") and accepts(grammar.grammar, '"text"')
    with pytest.raises(InputError) as err:
        body(False).output_grammar()
    assert err.value.field == "structured_outputs.json" and "matches nothing" in err.value.message


@pytest.mark.parametrize("extra, field, words", [
    ({"guided_json": "not json at all"}, "guided_json", "is not valid JSON"),
    ({"guided_json": {"type": "strng"}}, "guided_json", "does not compile"),
    ({"guided_regex": "[a-"}, "guided_regex", "does not compile"),
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "got guided_choice, guided_regex"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice",
     "give response_format or guided_choice, not both"),
    ({"guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, "structured_outputs", "(guided_choice), not both"),
])
def test_vllms_older_guided_fields_are_named_as_sent(extra, field, words):
    # (a break-test: these named structured_outputs.json or structured_outputs, which the client never sent)
    with pytest.raises(InputError) as err:
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **extra).output_grammar()
    assert err.value.field == field and words in err.value.message, err.value.message
    grammar = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], guided_regex="[0-9]+").output_grammar()
    assert grammar.source == "guided_regex"  # (decoding errors name it too)


def test_response_format_text_is_no_format_beside_structured_outputs():
    """response_format "text" asks for no format: structured_outputs beside it is taken, and its grammar
    is the one applied; a real format beside structured_outputs is refused."""
    from integrations.openai_models import CompletionRequest

    both = CompletionRequest(prompt="x", response_format={"type": "text"}, structured_outputs={"regex": "a+"})
    assert both.output_grammar().source == "structured_outputs.regex"
    with pytest.raises(ValidationError, match="give response_format or structured_outputs, not both"):
        CompletionRequest(prompt="x", response_format={"type": "json_object"}, structured_outputs={"regex": "a+"})


@pytest.mark.parametrize("fields", [{"response_format": {"type": "json_object"}}, {"structured_outputs": {"regex": "a+"}}],
                         ids=["response_format", "structured_outputs"])
def test_mode_refusion_with_an_output_format_is_a_400_naming_mode(fields):
    """Structured output decodes autoregressively: mode "refusion" with a format is refused naming `mode`;
    "ar" takes the format, and "refusion" with response_format "text" (no format) is free text."""
    from integrations.openai_models import CompletionRequest

    with pytest.raises(InputError) as err:
        CompletionRequest(prompt="x", mode="refusion", **fields).output_grammar()
    assert err.value.status == 400 and err.value.field == "mode" and "autoregressively" in err.value.message
    assert CompletionRequest(prompt="x", mode="ar", **fields).output_grammar() is not None
    assert CompletionRequest(prompt="x", mode="refusion", response_format={"type": "text"}).output_grammar() is None


def test_formats_the_grammar_engine_does_not_know_are_annotations(accepts):
    """pydantic writes format "password" (SecretStr), "binary" (bytes) and "path" (Path); llguidance
    refused the whole schema ("Unknown format: password"), so `client.beta.chat.completions.parse` of such
    a model, or a strict tool taking one, was a 400. JSON Schema 2020-12 (7.2): an unknown format must not
    fail validation; it is dropped. A format it knows still constrains the text."""
    from pathlib import Path

    from pydantic import BaseModel, SecretStr

    class Upload(BaseModel):
        token: SecretStr
        blob: bytes
        where: Path
        contact: str = ""

    schema = Upload.model_json_schema()
    schema["properties"]["contact"]["format"] = "email"
    good = '{"token": "s3cret", "blob": "AAEC", "where": "/tmp/x", "contact": "a@b.io"}'
    for strict in (False, True):
        grammar = json_grammar(closed_objects(schema) if strict else schema, "response_format.json_schema.schema")
        assert accepts(grammar, good)
        assert not accepts(grammar, good.replace("a@b.io", "not an email"))
    call = {"token": "s3cret", "blob": "AAEC", "where": "/tmp/x", "contact": "a@b.io"}
    assert accepts(tool_grammar(_tools(schema, strict=True), "", 0).grammar, _call(call))
    assert schema["properties"]["token"]["format"] == "password"  # the client's schema is left as given


def test_descriptions_do_not_count_toward_the_grammar_cap(accepts):
    """A schema's descriptions were copied into the compiled grammar, so a long one (an OpenAPI spec's
    prose) was refused as "the compiled grammar has 1,200,2xx characters" although it constrains nothing.
    Annotations (description, title, $comment, examples) are dropped before compiling; a property named
    "description" is data and stays required."""
    from decoding.grammar import MAX_GRAMMAR_CHARS

    prose = "word " * (MAX_GRAMMAR_CHARS // 4)
    schema = {"type": "object", "title": "T", "description": prose,
              "properties": {"description": {"type": "string", "description": prose, "examples": ["x"]}},
              "required": ["description"]}
    grammar = json_grammar(schema, "response_format.json_schema.schema")
    assert len(grammar) < MAX_GRAMMAR_CHARS and accepts(grammar, '{"description": "d"}')
    assert not accepts(grammar, "{}")
    call = tool_grammar(_tools(schema), "", 0).grammar
    assert len(call) < MAX_GRAMMAR_CHARS and accepts(call, _call({"description": "d"}))
    assert schema["description"] == prose  # the client's schema is left as given
