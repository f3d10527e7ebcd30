"""Chat and tool-call rows of the model card (bench/model_card.py): held-out requests sent through the
real /v1/chat/completions handler (integrations.openai_api.create_app over an in-process engine, called
with httpx over ASGI; the same code a Ray Serve ingress runs).

The requests are the synthetic ones of training/chat_data.py made from the held-out files of the
model-card split (never trained on): `n` documented functions ("Write a Python function `sig`. <doc
summary>") and `n` tool-call turns (the function and up to two distractors as `tools`, the user asks
with argument values), spread evenly over the held-out files. Greedy (temperature 0), max_tokens 256
(the card's; `measure_chat`'s max_tokens), each decoding mode pinned, so two runs give the same numbers.

  - chat_nonempty: share of instruction answers with non-empty content;
  - chat_valid_python: share whose content parses with `ast` (an answer cut by max_tokens is judged on
    its complete lines, like the completion rows);
  - tool_call_rate: share of tool turns answered with `tool_calls` whose first call names an offered tool;
  - tool_call_exact: share whose first call names the asked function with exactly the asked arguments;
  - forced_tool_call_rate / forced_tool_call_exact: the same with tool_choice "required" (the API
    prefills the call's opening, docs/api.md), i.e. what an agent that demands a call gets. AR only: a
    forced call decodes autoregressively under its grammar, and the API refuses it with mode "refusion".
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path


def heldout_chat_pairs(corpus: list[str], heldout_fraction: float, n: int):
    """(instruction pairs, tool-call pairs): n of each from the held-out units, evenly spread."""
    from training.chat_data import chat_pairs
    from training.corpus import load_units

    _, heldout = load_units(corpus, heldout_fraction)
    pairs = chat_pairs(heldout)
    out = []
    for kind in ("instruction", "tool_call"):
        chosen = [p for p in pairs if p.kind == kind]
        out.append(chosen[:: max(1, len(chosen) // n)][:n])
    return out[0], out[1]


async def _ask(client, pair, mode: str, max_tokens: int, tool_choice: str | None = None) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": pair.request}], "temperature": 0,
            "max_tokens": max_tokens, "mode": mode}
    if pair.tools:
        body["tools"] = [{"type": "function", "function": t} for t in pair.tools]
    if tool_choice:
        body["tool_choice"] = tool_choice
    response = await client.post("/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]


def valid_answer(content: str, cut: bool) -> bool:
    """Whether a chat answer is valid Python: judged on its complete lines when max_tokens cut it
    (bench/model_card.judged), and never when nothing is left to judge (an answer cut before its first
    newline counted as valid: ast parses "")."""
    from bench.model_card import judged, parses

    return bool(judged(content, not cut).strip()) and parses("", content, ended=not cut)


async def _score(model_dir: Path, instructions, tool_turns, modes, max_tokens: int) -> dict:
    import httpx

    from decoding.params import load_model_defaults
    from integrations.engine_client import LocalEngineClient
    from integrations.engine_host import build_engine
    from integrations.openai_api import APISettings, create_app
    from integrations.tool_call_stream import split_tool_calls

    engine, tokenizer = build_engine(model_dir)
    await engine.start()
    app = create_app(APISettings(model_name="m", decode_defaults=load_model_defaults(model_dir)),
                     LocalEngineClient(engine, tokenizer, "m"))
    row: dict = {"chat_requests": len(instructions), "tool_requests": len(tool_turns)}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://card") as client:
            for mode in modes:
                # all at once: the engine batches them (greedy decoding is batch-invariant, tests/decoding)
                answers = await asyncio.gather(*(_ask(client, p, mode, max_tokens) for p in instructions))
                contents = [(a["message"].get("content") or "", a["finish_reason"] == "length") for a in answers]
                row[f"{mode}_chat_nonempty"] = round(sum(bool(c.strip()) for c, _ in contents) / len(answers), 4)
                row[f"{mode}_chat_valid_python"] = round(sum(valid_answer(c, cut) for c, cut in contents) / len(answers), 4)
                forced = (("forced_", "required"),) if mode != "refusion" else ()  # a 400 in ReFusion mode
                for prefix, choice in (("", None), *forced):
                    turns = await asyncio.gather(*(_ask(client, p, mode, max_tokens, choice) for p in tool_turns))
                    calls = [t["message"].get("tool_calls") or [] for t in turns]
                    named = exact = 0
                    for pair, made in zip(tool_turns, calls):
                        first = made[0]["function"] if made else None
                        named += first is not None and first["name"] in pair.tool_names
                        (asked,) = split_tool_calls(pair.response)[1]
                        exact += first is not None and (first["name"], json.loads(first["arguments"])) == (
                            asked.name, json.loads(asked.arguments))
                    row[f"{mode}_{prefix}tool_call_rate"] = round(named / len(tool_turns), 4)
                    row[f"{mode}_{prefix}tool_call_exact"] = round(exact / len(tool_turns), 4)
                row[f"{mode}_chat_example"] = {"request": instructions[0].request, "content": contents[0][0]}
    finally:
        await engine.stop(drain_timeout_s=1)
    return row


def measure_chat(model_dir: Path, corpus: list[str], heldout_fraction: float, n: int = 20,
                 modes: tuple[str, ...] = ("ar", "refusion"), max_tokens: int = 256) -> dict:
    """The chat and tool-call rows for one model directory (module doc); `max_tokens` each answer's cap
    (the card's 256; the tests ask for fewer)."""
    instructions, tool_turns = heldout_chat_pairs(corpus, heldout_fraction, n)
    return asyncio.run(_score(model_dir, instructions, tool_turns, modes, max_tokens))


def main(argv: list[str] | None = None) -> int:
    """`python bench/chat_card.py [--model DIR] [--requests N]`: the chat rows alone, as one JSON object
    (bench/model_card.py prints them with the rest of the card)."""
    import argparse
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from bench.bench_args import model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(repo / "models" / "refusion-tiny-code"))
    parser.add_argument("--requests", type=int, default=20, help="held-out chat and tool-call requests each")
    parser.add_argument("--heldout-fraction", type=float, default=0.03,
                        help="the model's held-out split: the fraction of files held out, above 0 and below 1")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if not 0 < args.heldout_fraction < 1:  # (0 holds out nothing to ask; training takes [0, 1))
        parser.error(f"--heldout-fraction {args.heldout_fraction}: give the fraction the model held out, above 0 and "
                     "below 1 (the shipped model's is 0.03, its train_args.json)")
    print(json.dumps(measure_chat(Path(args.model), ["stdlib"], args.heldout_fraction, args.requests)))
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bench_args import engine_log_to_stderr

    engine_log_to_stderr()  # stdout: the one JSON object alone
    raise SystemExit(main())
