"""`refusion run-batch`: offline batch inference in the OpenAI batch file format, as `vllm run-batch`.

    refusion run-batch -i requests.jsonl -o results.jsonl [--model DIR] [--concurrency 32]

Input: one JSON object per line (lines end at "\\n"; blank lines are skipped but counted, a leading
BOM is dropped), OpenAI's batch request form, {"custom_id": "...", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions" | "/v1/responses" | "/v1/messages" (Anthropic's), "body":
{...}} (the body exactly as the
route takes it; `model` is the served name, the model directory's name unless --served-model-name says
otherwise). Output: one line per request line, in input order, OpenAI's batch output form:
{"id": "batch_req_<hex>", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
(`request_id` a UUID sent as X-Request-Id, as Ray Serve's proxy sends one, so it is the body's `id` and
the request log's, refused requests included); a
request the route refused keeps its status and error body under `response` and sets `error`
({"code", "message"}); a line that is not a request (not UTF-8, bad JSON, a missing or wrong
`custom_id`, `method`, `url` or `body`, a repeated custom_id, `stream: true`) gets `response: null`
and an `error` naming the file line and the field (OpenAI's line validation). Every line is answered
once; the summary goes to stderr. Interrupted (Ctrl-C, SIGTERM), the lines written so far are whole
and the summary says how many.

The batch file itself (reading, line checks, the output file) is integrations/batch_file.py.

Each request runs through the same app as `refusion serve` (integrations/openai_api.create_app: every
field, default and check alike) in this process, on a local engine, with no HTTP server and no Ray:
httpx's ASGI transport calls the app directly, with the body as JSON text (so NaN, Infinity or a lone
surrogate get the server's 400, not a crash here). Up to --concurrency requests are in flight, so the
engine batches them as it batches a server's traffic. A request the engine refuses as full (503
`overloaded`) waits until another request of the batch has finished and is retried; refused while no
other request is being answered, it is tried once more alone (new requests held back until it is
answered), and that answer is its result. A request whose choices could never fit (more than
--max-num-seqs plus --max-queue) is the app's 400 naming `n`, as on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from integrations.batch_file import BatchArgumentError, batch_error, check_output, open_output, parse_all, read_lines
from integrations.cli_generate import DEFAULT_MODEL, EMPTY_MODEL_FLAG
from integrations.engine_host import RUNNER_DTYPES

class BatchOutputError(Exception):
    """The results could not be written (a full disk, a lost mount): the run stops there."""


def _written(action, path: str) -> None:
    """Run a write, flush or close of the output; an OSError (but a reader that stopped reading `-o -`,
    BrokenPipeError, which `run` handles) becomes BatchOutputError naming the file and the reason."""
    try:
        action()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise BatchOutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `refusion run-batch` (vLLM's names where it has them)."""
    a = parser.add_argument
    a("-i", "--input-file", required=True, help="OpenAI batch requests, one JSON object per line ('-': stdin)")
    a("-o", "--output-file", required=True, help="where the results go, one JSON object per line ('-': stdout)")
    a("--model", default=None, help=f"HF model directory (default: {DEFAULT_MODEL})")
    a("--served-model-name", nargs="+", metavar="NAME", default=None,
      help="the `model` id(s) the bodies may name, as vLLM's: answers carry the first (default: the directory's name)")
    a("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    a("--max-num-seqs", type=int, default=None, help="engine: requests decoded at once (vLLM's name; engine max_running)")
    a("--max-queue", type=int, default=None, help="engine: requests waiting beyond those (engine max_queue)")
    a("--max-model-len", type=int, default=None, metavar="N",
      help="the context served, in tokens, below the model's (vLLM's name): prompts and max_tokens fit it")
    a("--dtype", choices=RUNNER_DTYPES, default=None,
      help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    a("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    a("--log-level", type=str.lower, choices=("debug", "info", "warning", "error"), default="info",
      help="the engine's and the request log's lines on stderr, as `refusion serve`'s (default info: each request's "
           "outcome; debug adds each routing decision, ~600 bytes)")


def run(args) -> int:
    import structlog

    # The engine's log goes to stderr with the request log: stdout may carry the results (-o -); at
    # --log-level, as a serve replica's (it wrote each request's ~600-byte routing decision, a debug line)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(args.log_level.upper())))
    progress = Progress()
    try:
        asyncio.run(run_batch(args, progress))
    except BatchArgumentError as exc:
        print(f"refusion run-batch: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C; SIGTERM (run_batch cancels itself)
        print(f"refusion run-batch: interrupted: {progress.summary()}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # -o - into a reader that stopped reading (`| head`): nothing more to say there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # keep the exit-time flush quiet
        return 1
    except BatchOutputError as exc:  # (the lines counted were handed to the file, not all of them stored)
        print(f"refusion run-batch: error: --output-file: {exc}; stopped: {progress.summary()}", file=sys.stderr)
        return 1
    print(f"refusion run-batch: {progress.summary()}", file=sys.stderr)
    return 0


class Progress:
    """What a run has answered so far (the summary line; counted as results are written)."""

    def __init__(self):
        self.requests = self.written = self.failed = self.completion_tokens = 0
        self.started: float | None = None  # set when answering starts (the model loaded)
        self.finished: float | None = None

    def seconds(self) -> float:
        """Answering time so far (or in all, once finished), model loading excluded: 0 before answering
        starts (a run stopped while the model loads)."""
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    def add(self, result: dict) -> None:
        self.written += 1
        self.failed += result["error"] is not None
        self.completion_tokens += _completion_tokens(result)

    def summary(self) -> str:
        return (f"{self.written} of {self.requests} lines answered, {self.written - self.failed} succeeded, "
                f"{self.failed} failed, {self.completion_tokens} tokens generated in {self.seconds():.1f} s")


async def run_batch(args, progress: Progress | None = None) -> Progress:
    """Answer every line of args.input_file into args.output_file (module docstring). Raises
    BatchArgumentError for unusable arguments, before the output file is touched."""
    progress = progress or Progress()
    task = asyncio.current_task()
    signal.signal(signal.SIGTERM, lambda *_: task.cancel())  # as Ctrl-C: lands at the next await, loading included
    model_dir, engine_options = _checked_batch_flags(args)
    requests = parse_all(read_lines(args.input_file))
    progress.requests = len(requests)
    engine, app = _batch_engine_and_app(args, model_dir, engine_options)
    await asyncio.sleep(0)  # a signal that came while the model loaded stops the run here, output untouched
    await _answer_into_output(args, engine, app, requests, progress)
    return progress


def _checked_batch_flags(args) -> tuple[Path, dict]:
    """(model directory, engine options) of the flags, every flag checked before the model loads (the
    directory and its refusion.json defaults too) and the output file checked (batch_file.check_output);
    BatchArgumentError naming the flag."""
    from decoding.api import DecodeParamError
    from decoding.params import model_default_params
    from integrations.engine_host import engine_config
    from integrations.serve_config import max_model_len_problem, served_names_problem
    from scheduler.config import EngineConfigError
    from workers.loader import ModelDirError, check_model_dir

    if args.concurrency < 1:
        raise BatchArgumentError("--concurrency", f"must be at least 1, got {args.concurrency}")
    if args.served_model_name and (problem := served_names_problem(args.served_model_name)):
        raise BatchArgumentError("--served-model-name", problem)
    if args.model is not None and not args.model.strip():  # (it answered with the shipped model)
        raise BatchArgumentError("--model", EMPTY_MODEL_FLAG)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    if not model_dir.is_dir():
        raise BatchArgumentError("--model", f"{model_dir} is not a model directory")
    try:  # the directory, then the decode defaults every request starts from, as `refusion serve` checks them
        # (refusion.json's slot_size 0 was a ZeroDivisionError traceback per request)
        model_default_params(model_dir, check_model_dir(model_dir))
    except ModelDirError as exc:
        raise BatchArgumentError("--model", f"{model_dir} cannot be loaded: {exc}") from None
    except DecodeParamError as exc:
        raise BatchArgumentError("--model", str(exc)) from None
    if args.device == "cuda":  # (the load's error was blamed on --model)
        import torch

        if not torch.cuda.is_available():
            raise BatchArgumentError("--device", "cuda requested but no CUDA device is available; use --device cpu")
    if args.max_model_len is not None and (problem := max_model_len_problem(args.max_model_len, model_dir)):
        raise BatchArgumentError("--max-model-len", problem)
    check_output(args.output_file, args.input_file)
    engine_options = {k: v for k, v in (("max_running", args.max_num_seqs), ("max_queue", args.max_queue)) if v is not None}
    try:
        engine_config(engine_options)  # checked before the model loads
    except EngineConfigError as exc:
        flag = {"max_running": "--max-num-seqs", "max_queue": "--max-queue"}.get(exc.field, exc.field)
        raise BatchArgumentError(flag, str(exc).split(": ", 1)[-1]) from None
    return model_dir, engine_options


def _batch_engine_and_app(args, model_dir: Path, engine_options: dict):
    """(engine, app): the model loaded into a local engine (not started) and the serving app on it, with
    the served names and request limits `refusion serve` would have; BatchArgumentError("--model") when
    the model cannot be loaded. Warns when the KV cache cannot hold one full context."""
    from integrations.engine_client import LocalEngineClient, read_model_card
    from integrations.engine_host import build_engine, kv_short_of_context
    from integrations.openai_api import APISettings, create_app
    from integrations.request_limits import RequestLimits
    from workers.loader import ModelDirError

    options = {k: v for k, v in (("dtype", args.dtype), ("device", args.device)) if v is not None}
    try:
        engine, tokenizer = build_engine(model_dir, runner_options=options, engine_options=engine_options)
        card = read_model_card(model_dir, tokenizer, args.max_model_len)
    except (ModelDirError, OSError, ValueError) as exc:
        raise BatchArgumentError("--model", f"{model_dir} cannot be loaded: {exc}") from None
    name, *aliases = args.served_model_name or [card["model"]]
    limits = RequestLimits(context_length=card["limits"]["context_length"],
                           max_sequences=engine.config.max_running + engine.config.max_queue)
    settings = APISettings(model_name=name, model_aliases=tuple(aliases), decode_defaults=card["defaults"], limits=limits)
    app = create_app(settings, LocalEngineClient(engine, tokenizer, name))
    if short := kv_short_of_context(engine, limits.context_length):
        print(f"refusion run-batch: warning: {short}", file=sys.stderr)
    return engine, app


async def _answer_into_output(args, engine, app, requests: list[dict], progress: Progress) -> None:
    """Open the output file (only now: a refused run leaves an existing file as it was), start the engine
    and answer every request through the app (BatchRun); the engine is stopped and the file closed
    however that ends (a close that fails raises BatchOutputError only after every line was answered)."""
    import httpx

    output = open_output(args.output_file)  # only now: a refused run leaves an existing file as it was
    await engine.start()
    progress.started = time.monotonic()
    answered = False
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://refusion-batch", timeout=None) as http:
            await BatchRun(http, args.concurrency, output, progress, args.output_file).answer_all(requests)
        progress.finished = time.monotonic()
        answered = True
    finally:
        await engine.stop(drain_timeout_s=0)
        if output is not sys.stdout:
            try:
                _written(output.close, args.output_file)
            except BatchOutputError:
                if answered:  # (else the run is ending on an error already: a failed write, an interrupt)
                    raise


class BatchRun:
    """The requests of one run in flight (module docstring): at most `concurrency` at once, results
    written in input order as soon as every earlier one is done (a long batch's output grows as it
    runs); a request refused as full waits for another to finish (`finished`) and is retried."""

    def __init__(self, http, concurrency: int, output, progress: Progress, path: str = "-"):
        self.http, self.output, self.progress, self.path = http, output, progress, path
        self.gate = asyncio.Semaphore(concurrency)
        self.posting = 0  # requests being answered by the app right now (holding engine room, or asking)
        self.done = 0  # requests answered for good so far
        self.finished = asyncio.Condition()  # notified when either count changes
        self.solo = asyncio.Lock()  # held while a refused request is tried alone

    async def answer_all(self, requests: list[dict]) -> None:
        results: list[dict | None] = [None] * len(requests)
        written = 0

        async def answer(k: int):
            nonlocal written
            request = requests[k]
            if "error" in request:
                results[k] = _result(request.get("custom_id"), None, request["error"])
            else:
                async with self.gate:
                    results[k] = await self._post(request)
            flushed = written
            while written < len(results) and results[written] is not None:
                line = json.dumps(results[written], ensure_ascii=False) + "\n"
                _written(lambda: self.output.write(line), self.path)
                written += 1
            _written(self.output.flush, self.path)
            for result in results[flushed:written]:  # counted once on disk (-o /dev/full: "1 of 1 answered")
                self.progress.add(result)

        await asyncio.gather(*(answer(k) for k in range(len(requests))))

    async def _post(self, request: dict) -> dict:
        """Answer one request (module docstring). Refused as full: retried at once if another request
        finished meanwhile, else after one does; refused with nothing else being answered, it is tried
        once more alone (new requests held back), and that answer is its result."""
        body = json.dumps(request["body"], ensure_ascii=True).encode()  # NaN stays NaN: the app's 400
        while True:
            done_before = self.done
            async with self.solo:  # wait while a request runs alone
                pass
            response = await self._send(request["url"], body)
            if not _overloaded(response) or self.done != done_before:
                if _overloaded(response):
                    continue  # another request finished meanwhile: there may be room now
                break
            if self.posting > 0:
                async with self.finished:
                    await self.finished.wait_for(lambda: self.done != done_before)
                continue
            async with self.solo:  # nothing else was being answered: try alone, no new request starting
                async with self.finished:
                    await self.finished.wait_for(lambda: self.posting == 0)
                response = await self._send(request["url"], body)
            break
        self.done += 1
        async with self.finished:
            self.finished.notify_all()
        detail = _json(response).get("error")
        detail = detail if isinstance(detail, dict) else {}
        error = None
        if response.status_code >= 400:
            error = batch_error(detail.get("code") or detail.get("type") or str(response.status_code),
                           detail.get("message") or response.text)
        data = {"status_code": response.status_code, "request_id": response.request.headers["x-request-id"],
                "body": _json(response)}
        return _result(request["custom_id"], data, error)

    async def _send(self, url: str, body: bytes):
        self.posting += 1
        try:
            # Every attempt gets its own request id, as Ray Serve's proxy gives every HTTP request one: the
            # body's id and the log lines carry it, and a request the app refused has one too.
            return await self.http.post(url, content=body, headers={"content-type": "application/json",
                                                                     "x-request-id": str(uuid.uuid4())})
        finally:
            self.posting -= 1
            async with self.finished:
                self.finished.notify_all()


def _overloaded(response) -> bool:
    """The engine refused the request as full (retryable), as opposed to any other answer: OpenAI's
    shape (error.code "overloaded") or, on /v1/messages, Anthropic's (error.type "overloaded_error")."""
    if response.status_code != 503:
        return False
    detail = _json(response).get("error")
    return isinstance(detail, dict) and (detail.get("code") == "overloaded" or detail.get("type") == "overloaded_error")


def _json(response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _result(custom_id: str | None, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": response, "error": error}


def _completion_tokens(result: dict) -> int:
    usage = ((result.get("response") or {}).get("body") or {}).get("usage") or {}
    return int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
