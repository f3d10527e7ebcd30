"""`refusion run-batch`: offline batch inference in the OpenAI batch file format, as `vllm run-batch`.

    refusion run-batch -i requests.jsonl -o results.jsonl [--model DIR] [--concurrency 32]

Input: one JSON object per line, OpenAI's batch request form, {"custom_id": "...", "method": "POST",
"url": "/v1/chat/completions" | "/v1/completions" | "/v1/responses", "body": {...}} (the body exactly as
the route takes it; `model` is the served name, the model directory's name unless --served-model-name
says otherwise). Output: one line per input line, in input order, OpenAI's batch output form:
{"id": "batch_req_<hex>", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}; a
request the route refused keeps its status and error body under `response` and sets `error`
({"code", "message"}); a line that is not a request (bad JSON, a missing or wrong `custom_id`,
`method`, `url` or `body`, a repeated custom_id, `stream: true`) gets `response: null` and an `error`
naming the field (OpenAI's line validation). Every line is answered; the summary goes to stderr.

Each request runs through the same app as `refusion serve` (integrations/openai_api.create_app: every
field, default and check alike) in this process, on a local engine, with no HTTP server and no Ray:
httpx's ASGI transport calls the app directly. Up to --concurrency requests are in flight, so the
engine batches them as it batches a server's traffic; a request the engine refuses as full (503) is
retried after its Retry-After while others are in flight (alone, it can never fit: its 503 is the answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from integrations.cli_generate import DEFAULT_MODEL

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
OVERLOADED_RETRY_S = 0.5  # the least wait before resubmitting a request the engine refused as full


class BatchArgumentError(ValueError):
    """A `refusion run-batch` argument is unusable: `flag` names it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `refusion run-batch` (vLLM's names where it has them)."""
    a = parser.add_argument
    a("-i", "--input-file", required=True, help="OpenAI batch requests, one JSON object per line ('-': stdin)")
    a("-o", "--output-file", required=True, help="where the results go, one JSON object per line ('-': stdout)")
    a("--model", default=None, help=f"HF model directory (default: {DEFAULT_MODEL})")
    a("--served-model-name", default=None, help="the `model` the bodies name (default: the directory's name)")
    a("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    a("--max-num-seqs", type=int, default=None, help="engine: requests decoded at once (vLLM's name; engine max_running)")
    a("--max-queue", type=int, default=None, help="engine: requests waiting beyond those (engine max_queue)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
      help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    a("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def run(args) -> int:
    import structlog

    # The engine's log goes to stderr with the request log: stdout may carry the results (-o -)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        summary = asyncio.run(run_batch(args))
    except BatchArgumentError as exc:
        print(f"refusion run-batch: error: {exc}", file=sys.stderr)
        return 2
    print(f"refusion run-batch: {summary['requests']} lines, {summary['succeeded']} succeeded, {summary['failed']} "
          f"failed, {summary['completion_tokens']} tokens generated in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0


async def run_batch(args) -> dict:
    """Answer every line of args.input_file into args.output_file (module docstring). Returns counts:
    requests, succeeded, failed, completion_tokens, seconds. Raises BatchArgumentError for unusable
    arguments (before the model loads)."""
    import httpx

    from integrations.engine_client import LocalEngineClient, read_model_card
    from integrations.engine_host import build_engine, engine_config
    from scheduler.config import EngineConfigError
    from integrations.openai_api import APISettings, create_app
    from integrations.request_limits import RequestLimits

    if args.concurrency < 1:
        raise BatchArgumentError("--concurrency", f"must be at least 1, got {args.concurrency}")
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    if not model_dir.is_dir():
        raise BatchArgumentError("--model", f"{model_dir} is not a model directory")
    lines = _read_lines(args.input_file)
    output = _open_output(args.output_file)
    options = {k: v for k, v in (("dtype", args.dtype), ("device", args.device)) if v is not None}
    engine_options = {k: v for k, v in (("max_running", args.max_num_seqs), ("max_queue", args.max_queue)) if v is not None}
    try:
        engine_config(engine_options)  # checked before the model loads
    except EngineConfigError as exc:
        flag = {"max_running": "--max-num-seqs", "max_queue": "--max-queue"}.get(exc.field, exc.field)
        raise BatchArgumentError(flag, str(exc).split(": ", 1)[-1]) from None
    engine, tokenizer = build_engine(model_dir, runner_options=options, engine_options=engine_options)
    card = read_model_card(model_dir)
    name = args.served_model_name or card["model"]
    settings = APISettings(model_name=name, decode_defaults=card["defaults"],
                           limits=RequestLimits(context_length=card["limits"]["context_length"]))
    app = create_app(settings, LocalEngineClient(engine, tokenizer, name))
    started = time.monotonic()
    await engine.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://refusion-batch", timeout=None) as http:
            results = await _answer_all(http, lines, args.concurrency, output)
    finally:
        await engine.stop()
        if output is not sys.stdout:
            output.close()
    return {"requests": len(results), "succeeded": sum(r["error"] is None for r in results),
            "failed": sum(r["error"] is not None for r in results),
            "completion_tokens": sum(_completion_tokens(r) for r in results), "seconds": time.monotonic() - started}


def _read_lines(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchArgumentError("--input-file", f"cannot read {path}: {exc}") from None
    return [line for line in text.splitlines() if line.strip()]


def _open_output(path: str):
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise BatchArgumentError("--output-file", f"cannot write {path}: {exc}") from None


async def _answer_all(http, lines: list[str], concurrency: int, output) -> list[dict]:
    """Answer every line, at most `concurrency` at once; results are written in input order as soon as
    every earlier one is done (so a long batch's output grows as it runs)."""
    gate = asyncio.Semaphore(concurrency)
    results: list[dict | None] = [None] * len(lines)
    written = 0
    in_flight = [0]  # requests being answered now (a refusal with none beside it can never be admitted)
    seen: set[str] = set()
    requests = [_parse(k + 1, line, seen) for k, line in enumerate(lines)]

    async def answer(k: int):
        nonlocal written
        request = requests[k]
        if "error" in request:
            results[k] = _result(request.get("custom_id"), None, request["error"])
        else:
            async with gate:
                in_flight[0] += 1
                try:
                    results[k] = await _post(http, request, in_flight)
                finally:
                    in_flight[0] -= 1
        while written < len(results) and results[written] is not None:
            output.write(json.dumps(results[written], ensure_ascii=False) + "\n")
            written += 1
        output.flush()

    await asyncio.gather(*(answer(k) for k in range(len(lines))))
    return results


def _parse(number: int, line: str, seen: set[str]) -> dict:
    """The request of input line `number`, or {"custom_id"?, "error"} naming what is wrong with it."""
    try:
        request = json.loads(line)
    except ValueError as exc:
        return {"error": _error("invalid_json", f"line {number}: not JSON ({exc})")}
    if not isinstance(request, dict):
        return {"error": _error("invalid_request", f"line {number}: must be a JSON object")}
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return {"error": _error("invalid_request", f"line {number}: custom_id must be a non-empty string")}
    problem = None
    if custom_id in seen:
        problem = f"custom_id {custom_id!r} is used by an earlier line: give each request its own"
    elif request.get("method") != "POST":
        problem = f"method must be \"POST\", got {request.get('method')!r}"
    elif request.get("url") not in URLS:
        problem = f"url must be one of {', '.join(URLS)}, got {request.get('url')!r}"
    elif not isinstance(request.get("body"), dict):
        problem = "body must be a JSON object (the request body of `url`)"
    elif request["body"].get("stream"):
        problem = "body.stream: a batch does not stream; drop it or set it to false"
    else:
        unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
        problem = f"{unknown[0]}: unknown field of a batch line (custom_id, method, url, body)" if unknown else None
    seen.add(custom_id)
    if problem:
        return {"custom_id": custom_id, "error": _error("invalid_request", f"line {number}: {problem}")}
    return request


async def _post(http, request: dict, in_flight: list[int]) -> dict:
    """Run one request through the app. A 503 the engine sends when full is retried after Retry-After
    while other requests of the batch are in flight (they will free room); refused with none beside it,
    it can never be admitted (its `n` choices exceed the engine's room) and is answered with that 503."""
    while True:
        response = await http.post(request["url"], json=request["body"])
        detail = _json(response).get("error")
        detail = detail if isinstance(detail, dict) else {}
        if response.status_code != 503 or detail.get("code") != "overloaded" or in_flight[0] <= 1:
            break
        await asyncio.sleep(max(OVERLOADED_RETRY_S, float(response.headers.get("retry-after", 1))))
    body = _json(response)
    error = None
    if response.status_code >= 400:
        error = _error(detail.get("code") or detail.get("type") or str(response.status_code),
                       detail.get("message") or response.text)
    data = {"status_code": response.status_code, "request_id": response.headers.get("x-request-id"), "body": body}
    return _result(request["custom_id"], data, error)


def _json(response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def _result(custom_id: str | None, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": response, "error": error}


def _completion_tokens(result: dict) -> int:
    usage = ((result.get("response") or {}).get("body") or {}).get("usage") or {}
    return int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
