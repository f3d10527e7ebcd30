"""Synthetic chat and tool-call pairs (training/chat_data.py): rendered exactly as the server renders a
chat, tool calls the server's parser accepts, deterministic, made only from the units given."""

from __future__ import annotations

import json

from integrations.chat import render_chat
from integrations.openai_models import ChatMessage, ToolSpec
from integrations.tool_call_stream import split_tool_calls
from training.chat_data import chat_pairs, instruction_pair, tool_call_pair
from training.corpus import extract_units

SOURCE = '''
def resize(path: str, width: int, height: int = 0, keep: bool = True):
    """Resize the image at path to width pixels.

    Longer explanation that is not part of the request.
    """
    return (path, width, height, keep)


def undocumented(x):
    return x + 1


def _private(y):
    """A private helper that is no tool."""
    return y


def test_isolated_weighted_constraint_when_the_graph_has_no_edges_and_weights_come_from_kwargs(a, b):
    """A test-suite name longer than OpenAI's 64-character limit for tool names."""
    return a


def größe(wert: int):
    """A non-ASCII name, which OpenAI's tool names do not allow."""
    return wert


def stats(values: list, *, scale: float = 1.0):
    """Mean and spread of values."""
    mean = sum(values) / len(values)
    return mean * scale
'''


def _units():
    return {u.name: u for u in extract_units(SOURCE, "pkg/img.py")}


def test_instruction_pair_is_the_servers_chat_prompt_and_the_function_source():
    unit = _units()["resize"]
    pair = instruction_pair(unit)
    request = "Write a Python function `resize(path: str, width: int, height: int=0, keep: bool=True)`. " \
              "Resize the image at path to width pixels."
    assert pair.prompt == render_chat(None, [ChatMessage(role="user", content=request)], None)[0]
    assert pair.response == unit.prompt + unit.response
    assert instruction_pair(_units()["undocumented"]) is None  # nothing to ask for


def test_tool_call_turn_parses_into_a_call_of_an_offered_tool_with_its_required_arguments():
    units = _units()
    pair = tool_call_pair(units["resize"], [units["stats"], units["_private"]])
    assert set(pair.tool_names) == {"resize", "stats"}  # private functions are never offered
    content, calls = split_tool_calls(pair.response, allowed_names=set(pair.tool_names))
    assert content is None and [c.name for c in calls] == ["resize"]
    arguments = json.loads(calls[0].arguments)
    assert {"path", "width"} <= set(arguments) <= {"path", "width", "height", "keep"}
    assert isinstance(arguments["path"], str) and isinstance(arguments["width"], int)
    tools_section = pair.prompt.split("### Tools\n", 1)[1].split("\n### User", 1)[0].splitlines()[1:]
    schemas = {s["name"]: s for s in map(json.loads, tools_section)}
    assert schemas["resize"]["parameters"]["required"] == ["path", "width"]
    assert schemas["resize"]["parameters"]["properties"]["keep"] == {"type": "boolean"}
    assert schemas["stats"]["parameters"]["properties"] == {"values": {"type": "array"}, "scale": {"type": "number"}}
    assert [schemas[name] for name in pair.tool_names] == list(pair.tools)
    tools = [ToolSpec(function=t) for t in pair.tools]
    user = pair.request
    assert pair.prompt == render_chat(None, [ChatMessage(role="user", content=user)], tools)[0]
    assert all(json.dumps(v) in user for v in arguments.values())  # the request states every value


def test_pairs_are_deterministic_and_use_only_the_units_given():
    units = extract_units(SOURCE, "pkg/img.py")
    first, second = chat_pairs(units), chat_pairs(units)
    assert first == second and {p.kind for p in first} == {"instruction", "tool_call"}
    names = {u.name for u in units}
    assert all(set(p.tool_names) <= names for p in first)
    only_stats = chat_pairs([u for u in units if u.name == "stats"])
    assert [p.tool_names for p in only_stats if p.kind == "tool_call"] == [("stats",)]


def test_functions_whose_names_the_api_refuses_are_never_tools():
    # the API's tool-name rule (^[a-zA-Z0-9_-]{1,64}$) once made chat_pairs raise on site-packages code
    units = _units()
    long_name = "test_isolated_weighted_constraint_when_the_graph_has_no_edges_and_weights_come_from_kwargs"
    assert tool_call_pair(units[long_name], [units["stats"]]) is None
    assert tool_call_pair(units["größe"], [units["stats"]]) is None
    pair = tool_call_pair(units["resize"], [units[long_name], units["größe"], units["stats"]])
    assert set(pair.tool_names) == {"resize", "stats"}
    pairs = chat_pairs(list(units.values()))  # raised pydantic's ValidationError before
    assert all(len(n) <= 64 and n.isascii() for p in pairs for n in p.tool_names)
