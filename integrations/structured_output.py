"""Structured outputs: the grammar (decoding.grammar.GrammarSpec) an API request asks for.

  - OpenAI `response_format`: {"type": "text"} (no grammar), {"type": "json_object"} (any JSON
    object), {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (that schema);
  - OpenAI tools: tool_choice "required" -> one or more `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>` blocks (integrations/tool_calls.py; exactly one with parallel_tool_calls false),
    a named function -> one call of it; each names an offered tool, arguments matching its
    `parameters` schema (objects closed: `integrations.json_schemas`; keywords llguidance does not implement,
    such as `propertyNames`, ignored: TOOL_JSON_OPTIONS); tool_choice "auto" (or unset) with tools ->
    free text in which every `<tool_call>` block the model opens is a valid call (llguidance's
    structural tags, the mechanism SGLang and vLLM use for constrained tool calling); with a
    response_format as well, calls as for "required" or an answer in the format's JSON;
  - vLLM's `structured_outputs` {"json" | "regex" | "choice" | "grammar" (Lark or GBNF) | "json_object"}.

JSON is generated compactly in json.dumps's style (", " and ": " separators, no newlines), the form
the shipped model's tool calls were trained on. A grammar request decodes on the AR path
(scheduler.engine); with mode "refusion" the API refuses response_format and structured_outputs, and
leaves tool calls unconstrained (parsed from the text as before).

Every fault is an InputError (HTTP 400) naming the field: an invalid schema, regex or grammar is
compiled here (llguidance, without a tokenizer, on a large-stack thread: decoding.grammar) before the
request reaches the engine; the engine compiles it again with the tokenizer and names the same field
(GrammarSpec.source) for what only shows then (a grammar matching no text, a parser limit).
"""

from __future__ import annotations

import json
import re
from typing import Any

from decoding.grammar import GrammarSpec, grammar_error
from integrations.json_schemas import closed_objects, for_grammar
from integrations.request_limits import InputError
from integrations.tool_calls import TOOL_CLOSE, TOOL_OPEN

# json.dumps's separators, no free whitespace: the shape of the training data's JSON (training/chat_data.py)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Tool schemas are the client's own, written for hosted models (Claude Code's use `propertyNames`, ...):
# keywords llguidance does not implement are ignored there rather than refused, so a call is constrained
# by every keyword it does implement. A response_format schema, asked for explicitly, stays strict (400).
TOOL_JSON_OPTIONS = {**JSON_OPTIONS, "lenient": True}
ANY_OBJECT = {"type": "object"}
_LARK_START = re.compile(r"(?m)^\s*(%llguidance\b|[?!]?start\s*:(?!:=))")


def _checked(grammar: str, field: str, what: str) -> str:
    error = grammar_error(grammar)
    if error:
        raise InputError(400, field, f"{what} does not compile: {_plain(error)}")
    return grammar


def json_grammar(schema: Any, field: str, options: dict = JSON_OPTIONS) -> str:
    """The llguidance grammar of JSON matching `schema` (a JSON Schema object), with llguidance's JSON
    `options`. InputError naming `field` for a schema that is not an object or does not compile."""
    from llguidance import LLMatcher

    if schema is False:
        raise InputError(400, field, "the schema `false` matches nothing: give a schema some JSON can match")
    if schema is True:  # JSON Schema's `true` accepts anything
        schema = {}
    if not isinstance(schema, dict):
        raise InputError(400, field, f"must be a JSON Schema object, got {type(schema).__name__}")
    _check_integers(schema, field)
    try:
        grammar = LLMatcher.grammar_from_json_schema(for_grammar(schema), overrides=options)
    except (ValueError, TypeError) as exc:
        raise InputError(400, field, f"is not a usable JSON Schema: {_plain(exc)}") from None
    return _checked(grammar, field, "the JSON Schema")


# The numbers a schema may hold. llguidance 1.9.1 reads integers as int64 or uint64 (a larger one was "Value
# is not JSON serializable"), and a number at or below the int64 minimum where it reads an integer (an
# integer within 512 of it, which rounds to it as a float64, or a float such as -1e19 as an integer's
# `const`) crashed the process (SIGSEGV in LLMatcher.validate_grammar: a `const`, an `enum` member or an
# integer range there took a whole engine replica down); 1,024 of margin, and no number below it at all
INT_LOW, INT_HIGH = -(1 << 63) + 1024, (1 << 64) - 1


def _wide_integer(schema: Any) -> tuple[str, int | float] | None:
    """The first number in `schema` (a value, a bound, an enum member) below INT_LOW, or integer above
    INT_HIGH, with its path ("properties.a.maximum"); None when every one fits."""
    stack: list[tuple[str, Any]] = [("the schema's top", schema)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value < INT_LOW or isinstance(value, int) and value > INT_HIGH):
            return path, value
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        top = path == "the schema's top"
        stack += [(str(k) if top else f"{path}.{k}", v) for k, v in items]
    return None


def _check_integers(schema: Any, field: str, where: str = "") -> None:
    """InputError naming `field` for a schema holding an integer outside INT_LOW..INT_HIGH."""
    wide = _wide_integer(schema)
    if wide is not None:
        raise InputError(400, field, f"holds the number {_short_int(wide[1])} at {where}{wide[0]}, outside the range "
                         f"the grammar engine reads ({INT_LOW}..{INT_HIGH}): use a value within it")


_EMBEDDED_JSON = re.compile(r"%json\s*")


def _check_embedded_schemas(lark: str, field: str) -> None:
    """The JSON schemas a Lark grammar embeds (`%json {...}`) hold integers the grammar engine reads
    (`_check_integers`); one whose integer is too long for Python's JSON reader (4,300 digits) is refused
    too. Text after `%json` that is not JSON is left to the grammar engine's own error."""
    decoder = json.JSONDecoder()
    for match in _EMBEDDED_JSON.finditer(lark):
        try:
            schema, _ = decoder.raw_decode(lark, match.end())
        except ValueError as exc:
            if "digits" in str(exc):  # (Python's limit on an integer's digits)
                raise InputError(400, field, f"embeds a JSON schema (%json) with an integer of more digits than "
                                 "the grammar engine reads: use a value within "
                                 f"{INT_LOW}..{INT_HIGH}") from None
            continue
        _check_integers(schema, field, "a %json schema's ")


def _short_int(value: int | float) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-4:]} ({len(text)} digits)"


def _plain(error) -> str:
    """llguidance's message in this API's words: its advice to set `coerce_one_of`, an option a client
    cannot set, becomes what the client can do."""
    text = re.sub(r"oneOf constraints are not supported\. Enable 'coerce_one_of' option to approximate oneOf with anyOf",
                  "oneOf is not supported: use anyOf (an output then matches at least one of the schemas)", str(error))
    if "Failed to generate regex for integer range" in text:  # a float bound past int64 on an integer
        text = (f"an integer's bounds reach outside the 64-bit range the grammar engine reads ({INT_LOW}.."
                f"{INT_HIGH}): use bounds within it ({text})")
    return text


def response_format_schema(response_format) -> tuple[Any, str] | None:
    """The JSON Schema response_format (openai_body.ResponseFormat or None) asks for and the field that
    names it; None for text. json_object: any object; a strict json_schema has its objects closed."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT, "response_format"
    schema, field = response_format.json_schema.schema_, "response_format.json_schema.schema"
    if response_format.json_schema.strict and isinstance(schema, dict):
        schema = closed_objects(schema)  # OpenAI's strict mode demands additionalProperties false: applied
    return (ANY_OBJECT if schema is None else schema), field


def response_format_grammar(response_format) -> GrammarSpec | None:
    """response_format (openai_body.ResponseFormat or None) -> its grammar; None for text."""
    found = response_format_schema(response_format)
    if found is None:
        return None
    schema, field = found
    return GrammarSpec(json_grammar(schema, field), source=field)


# OpenAI: "Omitting `parameters` defines a function with an empty parameter list": its arguments are {}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def _arguments_schema(function) -> dict:
    """The schema of a call's arguments: the function's `parameters` with its objects closed and without
    the `propertyNames` every key meets and unknown formats (`for_grammar`: a strict tool's z.record() compiles);
    no arguments (`{}`) when it has none; any object for `parameters: {}` (a schema that constrains
    nothing, but arguments are an object)."""
    if function.parameters is None:
        return NO_ARGUMENTS
    return for_grammar(closed_objects(function.parameters)) if function.parameters else ANY_OBJECT


def _call_rules(tools: list) -> str:
    """Lark rules of one call of any of `tools` (openai_messages.ToolSpec): `call` is TOOL_OPEN and
    `{"name": "`, then one tool's rule (its name, `", "arguments": ` and its parameters as a JSON document
    of their own, %json), then `}` and TOOL_CLOSE: the text the call object takes with JSON_OPTIONS'
    separators, name first. Each tool's parameters are the root of their own schema, so their refs (a
    pydantic model's nested types, a nested `$id`'s) resolve as in the client's document, whatever the
    other tools hold (one combined schema made tools sharing an `$id`, `$anchor` or nested resource one;
    helper-172, helper-173), and each gets its own options (a strict tool's, `_tool_options`)."""
    names = " | ".join(f"tool{i}" for i in range(len(tools)))
    opening, closing = json.dumps(TOOL_OPEN + '{"name": "'), json.dumps("}" + TOOL_CLOSE)
    rules = [f"call: {opening} ({names}) {closing}"]
    for i, tool in enumerate(tools):
        head = json.dumps(json.dumps(tool.function.name, ensure_ascii=False)[1:] + ', "arguments": ')
        arguments = {**_arguments_schema(tool.function), "x-guidance": _tool_options(tool)}
        rules.append(f"tool{i}: {head} %json {json.dumps(arguments)}")
    return "\n".join(rules) + "\n"


def tool_grammar(tools: list, forced: str | None, prefill_tokens: int, parallel: bool = True) -> GrammarSpec:
    """The grammar of a chat turn with `tools` (openai_messages.ToolSpec list). `forced`: None (auto: text
    with valid calls), "" (required: one or more calls of offered tools; exactly one when `parallel` is
    False, OpenAI's parallel_tool_calls) or a tool name (exactly one call of that tool, as OpenAI's
    named tool_choice).
    `prefill_tokens`: tokens of the forced call's opening that the API put at the end of the prompt
    (tool_calls.forced_call). InputError naming tools.N.function.parameters for a bad schema."""
    from llguidance import LLMatcher, StructTag

    _check_tools(tools)
    if forced is None:
        tags = [StructTag(trigger=TOOL_OPEN, begin=TOOL_OPEN + '{"name": ' + json.dumps(t.function.name) + ', "arguments": ',
                          grammar={**_arguments_schema(t.function), "x-guidance": _tool_options(t)},
                          end="}" + TOOL_CLOSE) for t in tools]
        lark = StructTag.to_grammar(tags, assume_special=False)
    else:
        chosen = [t for t in tools if not forced or t.function.name == forced]
        calls = "call" if forced or not parallel else 'call ("\\n"? call)*'
        lark = f"start: {calls}\n" + _call_rules(chosen)
    grammar = _checked(LLMatcher.grammar_from_lark(lark), "tools", "the tools' call grammar")
    # What only decoding finds (a schema no finite JSON satisfies) names the one tool's parameters where
    # one tool is involved; with several, `tools`
    involved = tools if forced is None else chosen
    source = f"tools.{tools.index(involved[0])}.function.parameters" if len(involved) == 1 else "tools"
    return GrammarSpec(grammar, prefill_tokens, source=source, open_ended=forced is None)


def _check_tools(tools: list) -> None:
    """Each tool's parameters compile as an object schema; InputError naming the tool's field (a combined
    grammar's error could not say which tool is at fault)."""
    for i, tool in enumerate(tools):
        parameters, field = tool.function.parameters, f"tools.{i}.function.parameters"
        if parameters and parameters.get("type") != "object":
            raise InputError(400, field, 'must be an object schema, {"type": "object", '
                             f'"properties": ...}} (a tool\'s arguments are named, as OpenAI and Anthropic define them), got type '
                             f"{parameters.get('type')!r}")
        for key in ("$defs", "definitions"):
            if key in (parameters or {}) and not isinstance(parameters[key], dict):
                raise InputError(400, f"{field}.{key}", "must be an object of named schemas, {\"Name\": {...}}, "
                                 f"got {type(parameters[key]).__name__}")
        json_grammar(_arguments_schema(tool.function), f"tools.{i}.function.parameters", _tool_options(tool))


def _tool_options(tool) -> dict:
    """llguidance's JSON options of a tool's arguments: lenient (keywords it does not implement ignored),
    or, for a tool marked `strict: true`, strict as a response_format schema (such a keyword is a 400:
    OpenAI's strict mode refuses what it cannot enforce), in auto and forced calls alike (each tool's
    arguments are a JSON schema of their own there: _call_rules)."""
    return JSON_OPTIONS if tool.function.strict else TOOL_JSON_OPTIONS


def tools_or_format_grammar(tools: list, schema: Any, field: str, parallel: bool = True) -> GrammarSpec:
    """A chat turn with `tools`, tool_choice "auto" and a response format (OpenAI accepts both: the model
    calls tools or answers in the format; the OpenAI Agents SDK sends an agent's tools and output_type
    so, LangChain's bind_tools(response_format=...) too): one or more `<tool_call>` blocks, as
    tool_choice "required" (exactly one when `parallel` is False), or JSON matching `schema` (the
    response format's, `field` naming it; the caller has compiled it on its own, so an error in it is
    named: chat_run.chat_grammar via output_grammar). InputError naming the field at fault."""
    from llguidance import LLMatcher

    _check_tools(tools)
    answer = {**(for_grammar(schema) if isinstance(schema, dict) else {}), "x-guidance": JSON_OPTIONS}
    repeat = 'call ("\\n"? call)*' if parallel else "call"
    lark = f"start: calls | answer\ncalls: {repeat}\n" + _call_rules(tools) + f"answer: %json {json.dumps(answer)}\n"
    grammar = _checked(LLMatcher.grammar_from_lark(lark), field, "the tools' calls or the format's JSON")
    return GrammarSpec(grammar, source=field)


def regex_grammar(pattern: str, field: str) -> str:
    from llguidance import LLMatcher

    return _checked(LLMatcher.grammar_from_regex(pattern), field, "the regular expression")


def lark_grammar(grammar: str, field: str) -> str:
    """A Lark grammar (llguidance's dialect, `start:` rule) or a GBNF one (llama.cpp's and xgrammar's
    EBNF, `root ::=`, converted with llguidance.gbnf_to_lark), as vLLM's structured_outputs.grammar."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        lark = grammar if _LARK_START.search(grammar) else gbnf_to_lark(_for_converter(grammar))
    except Exception as exc:  # the converter raises plain Exceptions (and AssertionErrors) on bad GBNF
        raise InputError(400, field, f"is neither a Lark grammar (start: ...) nor valid GBNF (root ::= ...): {exc}") from None
    _check_embedded_schemas(lark, field)
    return _checked(LLMatcher.grammar_from_lark(lark), field, "the grammar")


_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[A-Za-z_][A-Za-z0-9_-]*|.', re.S)


_GBNF_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)


def _for_converter(gbnf: str) -> str:
    """GBNF as llguidance's converter reads it: rules named `start` renamed (the converter turns `root`
    into Lark's `start`, which a rule of that name would clash with), and llama.cpp's \\uXXXX and
    \\UXXXXXXXX escapes in strings and classes written out (the converter dropped their leading zeros:
    "\\u00e9" became "\\ue9", a lexer error). Comments are left alone."""
    def unescape(match: re.Match) -> str:
        escape = match.group(1)
        if escape[0] not in "uU" or len(escape) == 1:
            return match.group(0)
        code = int(escape[1:], 16)
        if code < 0x80:  # an ASCII character may be special where it stands: kept escaped, in a form it reads
            return f"\\x{code:02x}"
        return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else match.group(0)

    out = []
    for token in _GBNF_TOKEN.findall(gbnf):
        if token == "start":
            token = "start_rule_"
        elif token[:1] in ('"', "["):
            token = _GBNF_ESCAPE.sub(unescape, token)
        out.append(token)
    return "".join(out)


def choice_grammar(choices: list[str], field: str) -> str:
    """Exactly one of `choices` (vLLM's structured_outputs.choice)."""
    if not choices:
        raise InputError(400, field, "must list at least one string")
    # One terminal (a lexeme) of alternatives, not a rule: a rule with more than 2,000 alternatives
    # exceeds llguidance's Earley row limit at the first token
    lark = "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices)) + "\n"
    return lark_grammar(lark, field)
