"""Request objects shared by the OpenAI-shaped routes (pydantic, the HTTP boundary only): the strict
body base class where a null field is an unset one, the base of other APIs' bodies that carry the chat
route's extensions, `metadata`, `stream_options`, and the structured-output fields (OpenAI's
`response_format`, vLLM's `structured_outputs`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, model_validator

from decoding.grammar import GrammarSpec
from integrations.request_limits import InputError
from integrations.structured_output import ANY_OBJECT, choice_grammar, json_grammar, lark_grammar, regex_grammar


# OpenAI's `metadata` (chat and Responses): up to 16 pairs, keys up to 64 characters, values up to 512
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]],
                     Field(max_length=16)]


class OpenAIBody(BaseModel):
    """A request object of OpenAI's API: a field given as null is a field not given (its default). Types
    are strict, as OpenAI's: "5" is not an integer, true is not a count, "yes" is not a boolean (an int
    is still a valid float)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ExtensionsBody(OpenAIBody):
    """A body of another API (Responses, Anthropic Messages) that takes the chat route's extensions
    (`EXTENSION_NAMES`: mode, slot_size, ...) at its top level: the non-null ones are kept apart
    (`extensions`, not a field a client can send) and passed on to the chat turn, which validates them."""

    EXTENSION_NAMES: ClassVar[tuple[str, ...]] = ()
    _extensions: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _collect_extensions(cls, data, handler):
        found = {}
        if isinstance(data, dict):
            found = {k: data[k] for k in cls.EXTENSION_NAMES if data.get(k) is not None}
            data = {k: v for k, v in data.items() if k not in cls.EXTENSION_NAMES}
        model = handler(data)
        model._extensions = found
        return model

    @property
    def extensions(self) -> dict[str, Any]:
        return dict(self._extensions)


class StreamOptions(OpenAIBody):
    model_config = ConfigDict(extra="forbid")  # an unknown option is a typo to show, as at the top level

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far
    include_obfuscation: bool = True  # OpenAI's: accepted either way; this server sends no obfuscation padding


class JSONSchemaFormat(OpenAIBody):
    """response_format.json_schema (OpenAI structured outputs). `strict` is accepted either way: the
    output always matches the schema (constrained decoding, integrations/structured_output.py). Other
    keys are a 400: a schema sent under another name would be silently not enforced."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="OpenAI's rule, as for tool names")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBody):
    """OpenAI response_format: text, json_object (some JSON object) or json_schema (that schema). Other
    keys are a 400 (Together's and Fireworks' {"type": "json_object", "schema": ...} was served as any
    JSON object: the schema was not enforced)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return self


class StructuredOutputs(OpenAIBody):
    """vLLM's `structured_outputs` extension: exactly one of json (a JSON Schema), regex, choice (one of
    these strings), grammar (Lark) or json_object (true: some JSON object)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")  # (true: any JSON, as JSON Schema's)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # the field each given one came as, when a client sent vLLM's older guided_json / guided_regex /
    # guided_choice / guided_grammar (openai_sampling): errors name what the client sent
    _sent_as: dict[str, str] = PrivateAttr(default_factory=dict)

    def field_name(self, kind: str) -> str:
        """The request field `kind` ("json", "regex", "choice", "grammar", "json_object") came in."""
        return self._sent_as.get(kind, f"structured_outputs.{kind}")

    @property
    def sent_field(self) -> str:
        """The request field the format came in as a whole: `structured_outputs`, or the guided_* field."""
        return next(iter(self._sent_as.values()), "structured_outputs")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object"
                             + (f" (got {', '.join(g.rstrip('_') for g in given)})" if given else ""))
        return self

    def grammar_spec(self) -> GrammarSpec:
        """InputError naming structured_outputs.<field> (or the guided_* field it came as) when it does
        not compile."""
        if self.json_ is not None:
            schema, field = self.json_, self.field_name("json")  # (a dict, true or false: json_grammar's to judge)
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise InputError(400, field, f"is not valid JSON: {exc}") from None
            return GrammarSpec(json_grammar(schema, field), source=field)
        if self.regex is not None:
            field = self.field_name("regex")
            return GrammarSpec(regex_grammar(self.regex, field), source=field)
        if self.choice is not None:
            field = self.field_name("choice")
            return GrammarSpec(choice_grammar(self.choice, field), source=field)
        if self.grammar is not None:
            field = self.field_name("grammar")
            return GrammarSpec(lark_grammar(self.grammar, field), source=field)
        field = self.field_name("json_object")
        return GrammarSpec(json_grammar(ANY_OBJECT, field), source=field)
