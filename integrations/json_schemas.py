"""JSON Schema rewriting for constrained tool calls: objects closed, refs rebased, trivial key rules dropped.

A tool's `parameters` are the client's schema, written for hosted models; before it is compiled into a
call's grammar (integrations/structured_output.py) it is rewritten here, never mutated: every object
that lists its properties is closed (`closed_objects`, as OpenAI's strict function calling), the
`propertyNames` every JSON object meets is dropped (`without_string_key_rules`: zod 4's z.record()), and
so is a `format` the grammar engine does not know (`without_unknown_formats`: pydantic's "password"); it
stays the root of its own schema in the call grammar (structured_output._call_rules), where its `$ref`s
resolve as in the client's document. Only
schema-valued keywords are followed: a const, enum, default or example is data.
"""

from __future__ import annotations

import functools
import re


# JSON Schema keywords whose value is a schema, a list of schemas or a map of name -> schema: the only
# places closed_objects looks (a const, enum, default or example value is data, never rewritten).
_SCHEMA_VALUED = frozenset({"items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                            "unevaluatedItems", "unevaluatedProperties", "additionalProperties"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _rewritten(schema, rewrite):
    """A new `schema` in which every (sub)schema `node` became rewrite(node, copy), copy being node with
    its subschemas already rewritten (innermost first). Only schema-valued keywords are followed (const,
    enum, default stay as given); the input is unchanged."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_VALUED and isinstance(value, dict):
            out[key] = _rewritten(value, rewrite)
        elif (key in _SCHEMA_LISTS or key == "items") and isinstance(value, list):  # items: draft 4's tuples
            out[key] = [_rewritten(item, rewrite) for item in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rewritten(sub, rewrite) for name, sub in value.items()}
    return rewrite(schema, out)


def closed_objects(schema):
    """`schema` with additionalProperties false on every object schema that lists `properties` and does
    not say otherwise: a call's arguments are the function's parameters, never invented extra keys (as
    OpenAI's strict function calling requires). What a merge joins stays as written, whole: a schema with
    `allOf` or with a `$ref` beside `properties` (OpenAPI's and pydantic's inheritance) and everything
    under it, and each root $defs entry such a merge reaches through `$ref`s (transitively): closing a
    part, or an anyOf branch inside one, would forbid the other parts' keys, and no object could match.
    Every other object is closed. A merge reaching anything but a root $defs entry leaves the whole
    schema as written. Returns a new schema; the input is unchanged."""
    merged_defs = _merged_defs(schema)
    if merged_defs is None:
        return schema

    def close(node: dict, out: dict) -> dict:
        if _merges(node):
            return dict(node)  # the merge and all under it, as written
        properties, required = node.get("properties"), node.get("required", [])
        if not (isinstance(required, list) and all(isinstance(name, str) for name in required)):
            return out  # not a list of names: an invalid schema, which its compile names (a 400)
        if isinstance(properties, dict) and "additionalProperties" not in node and set(required) <= set(properties):
            out["additionalProperties"] = False  # (a required key not listed stays allowed: closing would forbid it)
        return out

    closed = _rewritten(schema, close)
    for key, name in merged_defs:
        closed[key] = {**closed[key], name: schema[key][name]}
    return closed


def _merges(node: dict) -> bool:
    """Whether `node` merges object schemas: `allOf`, or `$ref` beside `properties`/`required`."""
    return "allOf" in node or ("$ref" in node and ("properties" in node or "required" in node))


def _nodes(schema) -> list[dict]:
    """`schema` and its subschemas (the ones _rewritten follows), innermost first."""
    nodes: list[dict] = []

    def collect(node: dict, out: dict) -> dict:
        nodes.append(node)
        return out

    _rewritten(schema, collect)
    return nodes


def _refs_under(schema) -> list:
    """Every `$ref` value in `schema` and its subschemas."""
    return [node["$ref"] for node in _nodes(schema) if "$ref" in node]


_ROOT_DEF = re.compile(r"#/(\$defs|definitions)/([^/]+)")


def _merged_defs(schema) -> set[tuple[str, str]] | None:
    """The root ($defs or definitions, name) entries a merge reaches: the `$ref`s in and under a merging
    schema, then those in and under each entry reached; None when one refers to anything else (another
    pointer, a URI)."""
    pending = [ref for node in _nodes(schema) if _merges(node) for ref in _refs_under(node)]
    found: set[tuple[str, str]] = set()
    while pending:
        ref = pending.pop()
        match = _ROOT_DEF.fullmatch(ref) if isinstance(ref, str) else None
        if match is None or not isinstance(schema.get(match[1]), dict) or match[2] not in schema[match[1]]:
            return None
        if (match[1], match[2]) not in found:
            found.add((match[1], match[2]))
            pending.extend(_refs_under(schema[match[1]][match[2]]))
    return found


def inlined_root_ref(schema):
    """`schema` with a root that is only a `$ref` to one of its own root `$defs` / `definitions` entries
    (pydantic's model_json_schema() of a self-referencing model: {"$defs": {"Node": {...}}, "$ref":
    "#/$defs/Node"}) given that entry's keywords at the root, the definitions kept (the refs inside still
    resolve); any other schema as it is (a new dict where changed, the input unchanged)."""
    if not isinstance(schema, dict) or "type" in schema or not isinstance(schema.get("$ref"), str):
        return schema
    match = _ROOT_DEF.fullmatch(schema["$ref"])
    target = match and isinstance(schema.get(match[1]), dict) and schema[match[1]].get(match[2])
    if not isinstance(target, dict):
        return schema
    rest = {k: v for k, v in schema.items() if k != "$ref"}
    return {**rest, **{k: v for k, v in target.items() if k not in ("$defs", "definitions")}}


_ANNOTATIONS = frozenset({"description", "title", "$comment", "examples"})  # keywords that constrain nothing


def without_string_key_rules(schema):
    """`schema` without a `propertyNames` every JSON object meets (keys are strings): `true`, `{}`, or
    `{"type": "string"}` (or `["string"]`) with annotations at most. llguidance does not implement the
    keyword; zod 4 writes it for every z.record() (with `.describe()`'s description), so the Vercel AI
    SDK's and openai-node's record schemas would otherwise be refused."""
    def trivial(rule) -> bool:
        if rule is True:
            return True
        if not isinstance(rule, dict) or set(rule) - _ANNOTATIONS - {"type"}:
            return False
        return rule.get("type", "string") in ("string", ["string"])

    def drop(node: dict, out: dict) -> dict:
        if "propertyNames" in out and trivial(out["propertyNames"]):
            del out["propertyNames"]
        return out

    return _rewritten(schema, drop)


def without_unknown_formats(schema):
    """`schema` without the `format` values llguidance does not know (pydantic writes "password" for
    SecretStr, "binary" for bytes, "path" for Path, ...). JSON Schema 2020-12 (7.2) makes `format` an
    annotation and says an implementation MUST NOT fail validation on a format it does not know; llguidance
    refuses the whole schema ("Unknown format: password"), so `client.beta.chat.completions.parse` of such
    a model was a 400. Formats it knows (date-time, email, uuid, ...) stay and constrain the text."""
    def drop(node: dict, out: dict) -> dict:
        if isinstance(out.get("format"), str) and not _known_format(out["format"]):
            del out["format"]
        return out

    return _rewritten(schema, drop)


@functools.lru_cache(maxsize=256)
def _known_format(name: str) -> bool:
    """Whether llguidance compiles a string of `format` `name` (its own list, asked, not copied here)."""
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_json_schema({"type": "string", "format": name})
    return not LLMatcher.validate_grammar(grammar)


def without_annotations(schema):
    """`schema` without the keywords that constrain nothing (_ANNOTATIONS: description, title, $comment,
    examples) in any of its schemas (a property named "description" stays: only schema-valued keywords
    are followed). They are copied into the compiled grammar, whose size is capped
    (decoding.grammar.MAX_GRAMMAR_CHARS): a long description was refused as the grammar's size."""
    return _rewritten(schema, lambda node, out: {k: v for k, v in out.items() if k not in _ANNOTATIONS})


def for_grammar(schema):
    """`schema` as it is compiled into a grammar: `without_string_key_rules`, `without_unknown_formats` and
    `without_annotations` (a new schema; the input is unchanged)."""
    return without_annotations(without_string_key_rules(without_unknown_formats(schema)))
