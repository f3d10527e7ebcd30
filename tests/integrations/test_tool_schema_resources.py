"""Each tool's parameters are the root of their own schema in a forced call's grammar
(structured_output._call_rules: one %json document per tool): refs resolve as in the tool's own document,
whatever the other tools hold. Hoisted into one combined schema, a nested `$id`'s refs broke, and tools
whose ids, anchors or nested resources were alike (as written, or once resolved and normalized) became
one resource, f0's arguments held to f1's types. Matched token by token with the shipped tokenizer
(`accepts`, tests/integrations/conftest.py); no Ray."""

from __future__ import annotations

import json

import pytest

from integrations.openai_models import ChatCompletionRequest
from integrations.structured_output import tool_grammar, tools_or_format_grammar


def _tools(*parameters: dict) -> list:
    functions = [{"type": "function", "function": {"name": f"f{i}", "parameters": p}} for i, p in enumerate(parameters)]
    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=functions).tools


def _call(name: str, arguments: dict) -> str:
    return '<tool_call>{"name": "' + name + '", "arguments": ' + json.dumps(arguments) + "}</tool_call>"


def _grammars(tools: list, name: str) -> list[str]:
    """The grammars a call of `name` goes through: auto, required, named, and tools beside a format."""
    return [tool_grammar(tools, forced, 0).grammar for forced in (None, "", name)] + [
        tools_or_format_grammar(tools, {"type": "object"}, "response_format").grammar]


# A nested resource with an `$id` of its own: its "#/$defs/D" is its own D (an integer), not the root's
NESTED_ID = {"type": "object", "$defs": {"D": {"type": "string"}},
             "properties": {"loc": {"$id": "https://example.com/loc.json", "type": "object",
                                    "$defs": {"D": {"type": "integer"}},
                                    "properties": {"city": {"$ref": "#/$defs/D"}}, "required": ["city"]},
                            "name": {"$ref": "#/$defs/D"}},
             "required": ["loc", "name"]}


def test_a_nested_id_resolves_its_own_refs_in_a_forced_call(accepts):
    """A forced call rebased "#/$defs/D" under the nested `$id` to the root's "#/$defs/t0_D": a 400
    "Pointer '/$defs/t0_D' does not exist" for a schema an auto call took."""
    for grammar in _grammars(_tools(NESTED_ID), "f0"):
        assert accepts(grammar, _call("f0", {"loc": {"city": 3}, "name": "x"}))
        assert not accepts(grammar, _call("f0", {"loc": {"city": "x"}, "name": "x"}))
        assert not accepts(grammar, _call("f0", {"loc": {"city": 3}, "name": 3}))


def _typed(kind: str, own: str | None = None, **extra) -> dict:
    return {**({"$id": own} if own else {}), "type": "object", "properties": {"a": {"type": kind}}, "required": ["a"],
            **extra}


@pytest.mark.parametrize("first, second", [
    (_typed("integer", "http://example.com/root.json"), _typed("string", "http://example.com/root.json")),
    (_typed("integer", "/schemas/root.json"), _typed("string", "/schemas/root.json")),  # alike once resolved
    (_typed("integer", "https://Example.com/r.json"), _typed("string", "https://example.com/r.json")),  # host case
    (_typed("integer", "../1/parameters.json"), _typed("string")),
    (_typed("integer", "https://e.com/a/./r.json"), _typed("string", "https://e.com/a/r.json")),  # dot segment
    (_typed("integer", "https://e.com/%72.json"), _typed("string", "https://e.com/r.json")),  # percent-encoding
    # the same nested resource id in both
    ({"type": "object", "properties": {"loc": {"$id": "https://example.com/loc.json", **_typed("integer")}},
      "required": ["loc"]},
     {"type": "object", "properties": {"loc": {"$id": "https://example.com/loc.json", **_typed("string")}},
      "required": ["loc"]}),
    # the same anchor and $defs names, refs through the shared root id
    (_typed("integer", "http://example.com/root.json", **{"$defs": {"V": {"$anchor": "v", "type": "integer"}},
                                                          "properties": {"a": {"$ref": "#v"}}}),
     _typed("string", "http://example.com/root.json", **{"$defs": {"V": {"$anchor": "v", "type": "string"}},
                                                         "properties": {"a": {"$ref": "root.json#/$defs/V"}}})),
], ids=["same-id", "same-relative", "host-case", "reaches-generated", "dot-segment", "percent", "nested-id", "anchor"])
def test_tools_whose_schemas_are_alike_keep_their_own_types(first, second, accepts):
    """helper-172 and helper-173: each of these made two tools one resource of a combined schema."""
    def arguments(kind: str) -> dict:
        value = 1 if kind == "integer" else "x"
        return {"loc": {"a": value}} if "loc" in first["properties"] else {"a": value}

    tools = _tools(first, second)
    for grammar in [tool_grammar(tools, forced, 0).grammar for forced in (None, "")] + [
            tools_or_format_grammar(tools, {"type": "object"}, "response_format").grammar]:
        assert accepts(grammar, _call("f0", arguments("integer"))) and not accepts(grammar, _call("f0", arguments("string")))
        assert accepts(grammar, _call("f1", arguments("string"))) and not accepts(grammar, _call("f1", arguments("integer")))


def test_names_that_begin_alike_are_called_by_their_own_schemas(accepts):
    """A call names one tool whole: "f", "f0" and "f0-x" are different tools."""
    functions = [{"type": "function", "function": {"name": name, "parameters": _typed(kind)}}
                 for name, kind in (("f", "integer"), ("f0", "string"), ("f0-x", "boolean"))]
    tools = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=functions).tools
    grammar = tool_grammar(tools, "", 0).grammar

    def call(name: str, value) -> str:
        return _call(name, {"a": value})

    assert accepts(grammar, call("f", 1)) and not accepts(grammar, call("f", "x"))
    assert accepts(grammar, call("f0", "x")) and not accepts(grammar, call("f0", 1))
    assert accepts(grammar, call("f0-x", True)) and not accepts(grammar, call("g", 1))
    assert accepts(grammar, call("f", 1) + "\n" + call("f0", "y"))  # parallel calls


def test_as_many_tools_as_are_offered_can_be_forced_and_one_more_is_refused(accepts):
    """About 2,000 tools passed the grammar engine's row limit and were refused with a message about the
    prompt's last tokens (helper-174): at most MAX_TOOLS are offered, and every one of them can be called."""
    from pydantic import ValidationError

    from integrations.openai_models import MAX_TOOLS

    parameters = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tools = _tools(*[parameters] * MAX_TOOLS)
    grammar = tool_grammar(tools, "", 0).grammar
    assert accepts(grammar, _call(f"f{MAX_TOOLS - 1}", {"a": 1})) and not accepts(grammar, _call(f"f{MAX_TOOLS}", {"a": 1}))
    with pytest.raises(ValidationError, match=f"offers {MAX_TOOLS + 1:,} functions; at most {MAX_TOOLS:,}"):
        _tools(*[parameters] * (MAX_TOOLS + 1))
