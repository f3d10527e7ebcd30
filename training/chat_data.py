"""Synthetic chat and tool-call pairs made from code itself, in the server's chat format.

Both kinds come from the corpus' functions (training/corpus.py CodeUnit) and are rendered with the
server's own plain chat template (integrations.chat.render_plain), so what the model is trained on is
byte for byte what /v1/chat/completions sends it for a tokenizer without a chat template:

- **Instruction pairs** (functions with a docstring): user = "Write a Python function `sig`." plus the
  docstring's summary; assistant = the function's source. The chat endpoint then answers code requests.
- **Tool-call turns** (functions with at least one parameter): a tools list with the function (JSON
  schema from its signature: annotations map to JSON types, parameters without a default are required)
  and up to two other functions of the same file set as distractors, in a hash-chosen order; user = the
  docstring summary (or the name in words) and the argument values; assistant =
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the block integrations/tool_calls.py parses.

Everything is chosen by hashes of the unit (no RNG state), so the pairs are identical on every run and
a held-out unit only ever yields held-out pairs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Sequence

from training.corpus import PARALLEL_MIN_ITEMS, CodeUnit, parallel_map

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names (FunctionSpec.name)

_JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "list": "array",
               "dict": "object", "tuple": "array", "List": "array", "Dict": "object", "Sequence": "array",
               "Mapping": "object"}
_WORDS = ("alpha", "report.csv", "config.json", "users", "main", "data/input.txt", "hello world", "utf-8",
          "admin", "cache", "north", "value", "localhost", "items", "build", "README.md")


@dataclass(frozen=True)
class ChatPair:
    """One chat turn: `prompt` is the rendered chat up to the assistant header, `response` the answer."""

    kind: str  # "instruction" or "tool_call"
    name: str  # the function the pair was made from
    request: str  # the user message
    prompt: str
    response: str
    tools: tuple[dict, ...] = ()  # function schemas offered, OpenAI `tools[].function` (tool_call pairs)

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.tools)


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def _function(unit: CodeUnit) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        tree = ast.parse(unit.prompt + unit.response)
    except (SyntaxError, ValueError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _summary(node) -> str | None:
    doc = ast.get_docstring(node)
    if not doc:
        return None
    first = doc.strip().split("\n\n", 1)[0]
    text = " ".join(first.split())
    return text if 8 <= len(text) <= 300 else None


def _parameters(node) -> list[tuple[str, str, bool]]:
    """(name, JSON type, required) of the parameters a caller passes (self/cls, *args, **kwargs left out)."""
    args = node.args
    positional = args.posonlyargs + args.args
    n_defaults = len(args.defaults)
    out = []
    for i, arg in enumerate(positional):
        if i == 0 and arg.arg in ("self", "cls"):
            continue
        out.append((arg.arg, _json_type(arg.annotation), i < len(positional) - n_defaults))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, _json_type(arg.annotation), default is None))
    return out


def _json_type(annotation) -> str:
    if annotation is None:
        return "string"
    name = ast.unparse(annotation).split("[", 1)[0].split(".")[-1]
    return _JSON_TYPES.get(name, "string")


def _schema(node) -> dict:
    params = _parameters(node)
    description = _summary(node) or f"{node.name.replace('_', ' ').strip()}."
    return {"name": node.name, "description": description,
            "parameters": {"type": "object", "properties": {n: {"type": t} for n, t, _ in params},
                           "required": [n for n, _, req in params if req]}}


def _value(json_type: str, seed: int):
    if json_type == "integer":
        return seed % 100
    if json_type == "number":
        return round((seed % 1000) / 10, 1)
    if json_type == "boolean":
        return bool(seed % 2)
    if json_type == "array":
        return [_WORDS[seed % len(_WORDS)], _WORDS[(seed // 7) % len(_WORDS)]]
    if json_type == "object":
        return {"key": _WORDS[seed % len(_WORDS)]}
    return _WORDS[seed % len(_WORDS)]


def instruction_pair(unit: CodeUnit) -> ChatPair | None:
    """An instruction pair from a documented function, or None (no docstring, not a function)."""
    from integrations.chat import render_plain
    from integrations.openai_messages import ChatMessage

    node = _function(unit)
    summary = _summary(node) if node is not None else None
    if summary is None:
        return None
    signature = f"{node.name}({ast.unparse(node.args)})"
    request = f"Write a Python function `{signature}`. {summary}"
    prompt = render_plain([ChatMessage(role="user", content=request)], None)
    return ChatPair("instruction", node.name, request, prompt, unit.prompt + unit.response)


def _offerable(name: str) -> bool:
    """A public function whose name OpenAI's tools accept (^[a-zA-Z0-9_-]{1,64}$: the API refuses others,
    integrations.openai_messages.FunctionSpec); a 70-character test name or a non-ASCII one is never a tool."""
    return not name.startswith("_") and TOOL_NAME.fullmatch(name) is not None


def tool_call_pair(unit: CodeUnit, others: Sequence[CodeUnit]) -> ChatPair | None:
    """A tool-call turn from a function with parameters; `others` supply up to two distractor tools."""
    from integrations.chat import render_plain
    from integrations.openai_messages import ChatMessage, ToolSpec
    from integrations.tool_calls import TOOL_CLOSE, TOOL_OPEN

    node = _function(unit)
    if node is None or not _offerable(node.name) or not _parameters(node):
        return None
    seed = _h(f"{unit.path}:{unit.name}:{unit.prompt}")
    chosen = [n for n in (_function(o) for o in others)
              if n is not None and n.name != node.name and _offerable(n.name)][:2]
    schemas = [_schema(n) for n in chosen] + [_schema(node)]
    schemas = sorted(schemas, key=lambda s: _h(f"{seed}:{s['name']}"))
    arguments = {name: _value(jtype, _h(f"{seed}:{name}")) for name, jtype, required in _parameters(node)
                 if required or _h(f"{seed}:opt:{name}") % 2}
    summary = _summary(node) or node.name.replace("_", " ").strip()
    listed = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    request = summary if not listed else f"{summary.rstrip('.')} with {listed}."
    tools = [ToolSpec(function=s) for s in schemas]
    prompt = render_plain([ChatMessage(role="user", content=request)], tools)
    call = json.dumps({"name": node.name, "arguments": arguments}, ensure_ascii=False)
    return ChatPair("tool_call", node.name, request, prompt, f"{TOOL_OPEN}{call}{TOOL_CLOSE}", tuple(schemas))


CHUNK_UNITS = 512  # units per task when chat_pairs runs in worker processes


def chat_pairs(units: Sequence[CodeUnit], workers: int = 1) -> list[ChatPair]:
    """Every instruction pair and tool-call turn the units yield, in unit order. Distractor tools come
    from the units that follow in the list (the same split), so held-out pairs use held-out code only.
    In `workers` processes (training.corpus.parallel_map) for a large corpus, the same pairs in any number:
    each task is CHUNK_UNITS units and the two after them (their distractors)."""
    units = list(units)
    chunks = [units[i : i + CHUNK_UNITS + 2] for i in range(0, len(units), CHUNK_UNITS)]
    workers = workers if len(units) >= PARALLEL_MIN_ITEMS else 1
    return [pair for pairs in parallel_map(_chunk_pairs, chunks, workers, chunksize=1, min_items=2) for pair in pairs]


def _chunk_pairs(chunk: Sequence[CodeUnit]) -> list[ChatPair]:
    """The pairs of a chunk's first CHUNK_UNITS units (the rest serve as distractors only)."""
    out: list[ChatPair] = []
    for i, unit in enumerate(chunk[:CHUNK_UNITS]):
        pair = instruction_pair(unit)
        if pair is not None:
            out.append(pair)
        turn = tool_call_pair(unit, chunk[i + 1 : i + 3])
        if turn is not None:
            out.append(turn)
    return out
