"""The 400 a request body that fails validation gets (pydantic's errors, FastAPI's RequestValidationError):
the field it names, dotted as the client wrote it (`stop.0`, `messages.2.content`), pydantic's message
without its prefixes, every unknown field at once, and where a field this server offers under another
name went (OpenAI's deprecated `functions`; the chat fields a Responses client sends, as OpenAI's 400
says "In the Responses API, this parameter has moved to ..."), and the field an unknown one is likely a
misspelling of ("moed: ...; did you mean `mode`?"). The route models (openai_models,
responses_models, anthropic_models, the llama.cpp routes) name fields with the same helpers.
"""

from __future__ import annotations

import difflib


def validation_field(loc: tuple) -> str | None:
    """The request field a pydantic error location names (dotted), without the union-member names pydantic
    inserts; None for the body as a whole."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # pydantic adds union-member names (e.g. "str", "list[int]") to the location; drop them.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or None


# Unknown fields that clients send for an API this server offers under another name: the 400 says which
REPLACED_FIELDS = {
    "functions": "OpenAI's deprecated functions / function_call are offered as tools / tool_choice",
    "function_call": "OpenAI's deprecated functions / function_call are offered as tools / tool_choice",
}
# ... and those of one route only: the chat fields a Responses client sends (OpenAI's 400 says where
# each "has moved": "In the Responses API, this parameter has moved to 'max_output_tokens'")
_MOVED = "in the Responses API it is `{}`"
ROUTE_REPLACED_FIELDS = {"/v1/responses": {
    "max_tokens": _MOVED.format("max_output_tokens"), "max_completion_tokens": _MOVED.format("max_output_tokens"),
    "messages": _MOVED.format("input") + " (a string, or a list of messages)",
    "response_format": _MOVED.format("text.format"), "logprobs": _MOVED.format("top_logprobs"),
}}


def _most_specific(errors: list[dict]) -> dict:
    """The error to report: the first one, or, when pydantic tried each member of a union (`stop` is a
    string or a list of strings), the one naming an item of the field (`stop: [null]` names `stop.0`, the
    item to change, not `stop`); only an item one level down, not some union member's nested field."""
    first = errors[0]
    field = validation_field(tuple(first.get("loc", ())))
    if field is None:
        return first
    return next((e for e in errors if _is_item_of(validation_field(tuple(e.get("loc", ()))) or "", field)), first)


def _is_item_of(name: str, field: str) -> bool:
    """Whether `name` is `field`.N. A string test, not a pattern built from `field`: a field name is the
    client's own key, and compiling a megabyte-long one took seconds on the event loop and kept ~20 MB in
    re's cache per distinct key (helper-250)."""
    index = name[len(field) + 1:]
    return name.startswith(field + ".") and index.isascii() and index.isdigit()


def _short(field: str) -> str:
    return field if len(field) <= 80 else field[:79] + "…"


def _listed(fields: list[str], chars: int = 600) -> str:
    """Field names joined, long names and a long list cut (a 400-field body's list left no room for the
    hints after it in the message, which is cut at MAX_ERROR_MESSAGE_CHARS; helper-226)."""
    names = [_short(f) for f in fields]
    shown = 0
    while shown < len(names) and sum(len(n) + 2 for n in names[:shown + 1]) <= chars:
        shown += 1
    return ", ".join(names[:shown]) + (f", … ({len(names)} in all)" if shown < len(names) else "")


def validation_message(error: dict) -> str:
    """A pydantic error's message without pydantic's "Value error, " prefix (our validators' own text)."""
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def also_missing(errors: list[dict], param: str | None) -> str:
    """" (also required: a, b)" naming the body's other missing top-level fields (pydantic's "missing"),
    "" when none: a body without two required fields named one a round trip (llama.cpp's server lists
    every missing field at once). Fields inside lists or unions are left out: pydantic reports those for
    each member it tried, most of them not the client's."""
    names = [validation_field(tuple(e.get("loc", ()))) for e in errors if e.get("type") == "missing"]
    others = [n for n in dict.fromkeys(names) if n and n != param and "." not in n]
    return f" (also required: {_listed(others)})" if others else ""


MAX_MISSPELT_CHARS = 64  # the longest unknown field name close_field compares
# the unknown fields a body's 400 looks for a misspelling of, first first: an object may hold
# MAX_OBJECT_KEYS (4,096) names, and comparing each (~0.1 ms of difflib) held the event loop ~0.4 s for
# hints that the message, cut at MAX_ERROR_MESSAGE_CHARS, never shows
MAX_MISSPELT_FIELDS = 32


def close_field(name: str, fields) -> str | None:
    """The one of `fields` (a body model's top-level names) `name`, an unknown top-level field, is most
    likely a misspelling of ("moed" -> "mode", "max_token" -> "max_tokens"; difflib's ratio at least
    0.75); None for none, for a nested name ("a.b"), and for one longer than any field name could be
    misspelled as (a client's megabyte key would cost difflib's work on the event loop)."""
    if "." in name or not fields or len(name) > MAX_MISSPELT_CHARS:
        return None
    found = difflib.get_close_matches(name, sorted(fields), n=1, cutoff=0.75)
    return found[0] if found else None


def validation_answer(errors: list[dict], api_path: str, fields=()) -> tuple[str | None, str]:
    """(param, message) of the 400 for pydantic's `errors` on the route at `api_path` (its path without
    a root_path: http_errors._api_path); param None when the body as a whole is wrong. `fields`: the
    body model's top-level field names, for "did you mean" on an unknown one (close_field)."""
    first = _most_specific(errors) if errors else {"loc": (), "msg": "invalid request body"}
    param = validation_field(tuple(first.get("loc", ())))
    message = f"{_short(param)}: {validation_message(first)}" if param else validation_message(first)
    message += also_missing(errors, param)
    # every unknown field at once, not one per round trip; beside another fault too (a misspelled
    # `input` was only "input: Field required")
    unknown = [validation_field(tuple(e.get("loc", ()))) for e in errors if e.get("type") == "extra_forbidden"]
    if first.get("type") == "extra_forbidden" and len(unknown) > 1:
        message += f" (nor are: {_listed([f for f in unknown if f != param])})"
    elif first.get("type") != "extra_forbidden" and unknown:
        message += f" (unknown fields: {_listed(unknown)})"
    hints = {**REPLACED_FIELDS, **ROUTE_REPLACED_FIELDS.get(api_path, {})}
    said: dict[str, str] = {}  # hint -> the first field it is for (one hint may serve two fields)
    for i, f in enumerate(unknown):
        if f in hints:
            said.setdefault(hints[f], f)
        elif f and i < MAX_MISSPELT_FIELDS and (near := close_field(f, fields)):
            said.setdefault(f"did you mean `{near}`?", f)
    message += "".join(f"; {hint}" if f == param else f"; {f}: {hint}" for hint, f in said.items())
    return param, message
