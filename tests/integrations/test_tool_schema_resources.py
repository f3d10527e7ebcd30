"""Each tool's parameters are a schema resource of their own in a forced call's grammar
(json_schemas.tool_resources): refs resolve as in the tool's own document, whatever the other tools hold.
Matched token by token with the shipped tokenizer (`accepts`, tests/integrations/conftest.py); no Ray."""

from __future__ import annotations

import json

import pytest

from integrations.json_schemas import TOOL_BASE, tool_resources
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


def test_two_tools_with_the_same_id_anchor_and_defs_keep_their_own():
    """Two tools sharing a root `$id` (a generator's default), an `$anchor` name and `$defs` names: each
    call's arguments match its own tool's types only."""
    def tool(kind: str) -> dict:
        return {"$id": "http://example.com/root.json", "type": "object",
                "$defs": {"V": {"$anchor": "v", "type": kind}},
                "properties": {"a": {"$ref": "#v"}, "b": {"$ref": "http://example.com/root.json#/$defs/V"}},
                "required": ["a", "b"]}

    tools = _tools(tool("integer"), tool("string"))
    resources = tool_resources([t.function.parameters for t in tools])
    assert [uri for _, uri in resources] == [TOOL_BASE.format(index=0), TOOL_BASE.format(index=1)]
    assert resources[1][0]["properties"]["b"]["$ref"] == TOOL_BASE.format(index=1) + "#/$defs/V"


@pytest.mark.parametrize("forced", [None, "", "f1"])
def test_tools_with_the_same_names_inside_match_their_own_types(forced, accepts):
    def tool(kind: str) -> dict:
        return {"$id": "http://example.com/root.json", "type": "object",
                "$defs": {"V": {"$anchor": "v", "type": kind}},
                "properties": {"a": {"$ref": "#v"}, "b": {"$ref": "root.json#/$defs/V"}}, "required": ["a", "b"]}

    grammar = tool_grammar(_tools(tool("integer"), tool("string")), forced, 0).grammar
    assert accepts(grammar, _call("f1", {"a": "x", "b": "y"}))
    assert not accepts(grammar, _call("f1", {"a": 1, "b": 2}))
    if forced != "f1":
        assert accepts(grammar, _call("f0", {"a": 1, "b": 2}))
        assert not accepts(grammar, _call("f0", {"a": "x", "b": 2}))


def test_a_unique_absolute_id_is_kept_and_a_relative_one_resolved_per_tool():
    with_id = {"$id": "https://example.com/w.json#", "$schema": "https://json-schema.org/draft/2020-12/schema",
               "type": "object", "properties": {}}
    relative = {"$id": "w.json", "type": "object", "properties": {}}
    resources = tool_resources([with_id, relative, {"type": "object"}])
    assert [uri for _, uri in resources] == ["https://example.com/w.json",
                                             TOOL_BASE.format(index=1).rsplit("/", 1)[0] + "/w.json",
                                             TOOL_BASE.format(index=2)]
    assert "$schema" not in resources[0][0] and resources[2][0] == {"type": "object", "$id": TOOL_BASE.format(index=2)}
    assert with_id["$id"] == "https://example.com/w.json#" and "$schema" in with_id  # the input is unchanged


@pytest.mark.parametrize("ids", [
    ("/schemas/root.json", "/schemas/root.json"),  # relative ids resolving to one URI
    ("https://Example.com/r.json", "https://example.com/r.json"),  # the same URI but for the host's case
    ("../1/parameters.json", None),  # a relative id reaching the other tool's generated URI
], ids=["same-relative", "host-case", "reaches-generated"])
def test_tools_whose_ids_resolve_alike_keep_their_own_types(ids, accepts):
    """Compared as written, these ids looked distinct and both tools became one resource: f0's arguments
    were held to f1's types (helper-172)."""
    def tool(kind: str, own) -> dict:
        return {**({"$id": own} if own else {}), "type": "object", "properties": {"a": {"type": kind}},
                "required": ["a"]}

    tools = _tools(tool("integer", ids[0]), tool("string", ids[1]))
    assert len({uri for _, uri in tool_resources([t.function.parameters for t in tools])}) == 2
    grammar = tool_grammar(tools, "", 0).grammar
    assert accepts(grammar, _call("f0", {"a": 1})) and not accepts(grammar, _call("f0", {"a": "x"}))
    assert accepts(grammar, _call("f1", {"a": "x"})) and not accepts(grammar, _call("f1", {"a": 1}))
