"""integrations/validation_errors.py: the 400 a body pydantic refuses gets (the message names the field)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from integrations.anthropic_models import MessagesRequest
from integrations.openai_models import ChatCompletionRequest
from integrations.validation_errors import validation_answer


def answer(model, body: dict, path: str) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    return validation_answer(err.value.errors(), path)


def test_every_missing_top_level_field_is_named_in_one_answer():
    """A body missing several required fields named one a round trip (llama.cpp's server lists them all)."""
    assert answer(MessagesRequest, {}, "/v1/messages") == (
        "model", "model: Field required (also required: messages, max_tokens)")
    assert answer(MessagesRequest, {"model": "m", "max_tokens": 4}, "/v1/messages") == ("messages", "messages: Field required")


def test_a_missing_field_inside_a_list_is_not_listed_beside_the_first_fault():
    """pydantic reports a nested field missing for each member of a union it tried, most of them not the
    client's: only top-level fields are listed."""
    body = {"tools": [{"type": "function", "function": {}}]}  # messages missing; and tools.0.function.name
    assert answer(ChatCompletionRequest, body, "/v1/chat/completions") == ("messages", "messages: Field required")


def test_only_missing_fields_are_listed_as_required_beside_another_fault():
    """The first fault a wrong type: the other missing field is listed, not the other wrong one."""
    assert answer(MessagesRequest, {"model": 5, "max_tokens": "many"}, "/v1/messages") == (
        "model", "model: Input should be a valid string (also required: messages)")


def test_a_clients_key_never_becomes_a_pattern(monkeypatch):
    """The item check compiled a regex from the first error's field, the client's own key: a 1 MB unknown
    key took seconds on the event loop (every route waited) and kept ~20 MB in re's cache per distinct key
    (helper-250). No pattern is built from a key now; the item of a union field is still the one named."""
    import re

    built = []
    real = re.compile
    monkeypatch.setattr(re, "compile", lambda pattern, *a, **k: built.append(pattern) or real(pattern, *a, **k))
    key = "k" * 100_000
    field, message = answer(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], key: 1},
                            "/v1/chat/completions")
    assert field == key and message.startswith("k" * 79 + "…: Extra inputs are not permitted"), message[:200]
    assert not [p for p in built if key in str(p)]
    assert answer(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "stop": [None]},
                  "/v1/chat/completions")[0] == "stop.0"  # the union's item, as before


def test_a_body_of_many_unknown_fields_compares_only_the_first_for_a_misspelling(monkeypatch):
    """Each unknown field was compared with every field of the route (difflib, ~0.1 ms a name): a body
    of 4,096 near-misses (temperatur0, temperatur1, ...; MAX_OBJECT_KEYS) held the event loop ~0.4 s for
    hints the cut message never shows. Only the first MAX_MISSPELT_FIELDS are compared; a misspelling
    among them is still told the field meant, and a replaced field's hint (a lookup) still comes."""
    import difflib

    from integrations import validation_errors
    from integrations.request_limits import MAX_OBJECT_KEYS

    compared = []
    real = difflib.get_close_matches
    monkeypatch.setattr(difflib, "get_close_matches", lambda word, *a, **k: compared.append(word) or real(word, *a, **k))
    extra = {f"temperatur{i}": 1 for i in range(MAX_OBJECT_KEYS - 3)}
    body = {"messages": [{"role": "user", "content": "x"}], "moed": "ar", **extra, "functions": []}
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    _, message = validation_answer(err.value.errors(), "/v1/chat/completions", ChatCompletionRequest.model_fields)
    assert len(compared) == 32  # (4,094 before)
    assert validation_errors.MAX_MISSPELT_FIELDS == 32
    assert message.startswith("moed: Extra inputs are not permitted"), message[:100]
    assert "; did you mean `mode`?" in message and "; functions: OpenAI's deprecated functions" in message, message[-300:]
