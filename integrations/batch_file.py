"""The batch file of `refusion run-batch` (OpenAI's batch input form; integrations/cli_batch.py runs it):
reading the input file's lines, checking each is a request (`parse_all`: every fault named with its
file line and field, as OpenAI's line validation), and checking the output file can be written before
the model loads.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from integrations.request_body import check_json_tree
from integrations.request_limits import MAX_JSON_DEPTH, InputError

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


class BatchArgumentError(ValueError):
    """A `refusion run-batch` argument is unusable: `flag` names it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def read_lines(path: str) -> list[tuple[int, bytes]]:
    """(file line number, bytes) of every non-blank line; lines end at b"\\n" only (U+2028 and the like
    are text inside a JSON string), a leading UTF-8 BOM is dropped."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise BatchArgumentError("--input-file", f"cannot read {path}: {exc.strerror or exc}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    return [(k, line.rstrip(b"\r")) for k, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


def check_output(path: str, input_path: str) -> None:
    """Refuse an output the run could not write, before the model loads (the file is not touched)."""
    if path == "-":
        return
    target = Path(path)
    if input_path != "-" and _same_file(target, Path(input_path)):
        raise BatchArgumentError("--output-file", "is the input file: write the results elsewhere")
    if problem := output_problem(target):
        raise BatchArgumentError("--output-file", problem)


def output_problem(target: Path) -> str | None:
    """What keeps a run from writing the file `target` at its end, or None: a directory, a folder that
    does not exist, or a file or folder this process cannot write. Tried, not guessed: root passes
    os.access for /proc and /sys, whose writes then fail; an existing regular file is opened for
    appending and closed (nothing written), a new one is probed with a temporary file in its folder
    (removed). Shared by `refusion run-batch --output-file` and the bench scripts' output flags
    (bench/bench_args.writable_file)."""
    try:
        if target.is_dir():
            return f"{target} is a directory: name a file"
        folder = target.parent
        if not folder.is_dir():
            return f"{folder} {'is not a directory' if folder.exists() else 'does not exist'}: create it or write elsewhere"
        if target.exists() and not target.is_file():  # a device or a pipe (opening a pipe could block)
            return None if os.access(target, os.W_OK) else f"cannot write {target}: permission denied"
        if target.exists():
            open(target, "ab").close()
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:  # (a folder on the way this user may not search: PermissionError from is_dir)
        return f"cannot write {target}: {exc.strerror or exc}; write elsewhere"
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file: the same path, a symlink or a hard link (which comparing
    resolved paths cannot see)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def open_output(path: str):
    """The output file for writing (UTF-8; `-`: stdout). Raises BatchArgumentError naming --output-file."""
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise BatchArgumentError("--output-file", f"cannot write {path}: {exc.strerror or exc}") from None


def parse_all(lines: list[tuple[int, bytes]]) -> list[dict]:
    """Each (file line number, bytes) as its request, or {"custom_id"?, "error"} naming the line and what
    is wrong with it (a custom_id used by an earlier line included)."""
    seen: set[str] = set()
    return [_parse(number, line, seen) for number, line in lines]


def _parse(number: int, raw: bytes, seen: set[str]) -> dict:
    """The request of file line `number`, or {"custom_id"?, "error"} naming what is wrong with it."""
    try:
        request = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return {"error": batch_error("invalid_json", f"line {number}: not UTF-8 (byte {exc.start + 1} of the line)")}
    except ValueError as exc:
        return {"error": batch_error("invalid_json", f"line {number}: not JSON ({exc})")}
    except RecursionError:  # Python's decoder recurses per level: ~1,000 levels exhaust it
        return {"error": batch_error("invalid_json", f"line {number}: nests arrays/objects deeper than "
                                                f"{MAX_JSON_DEPTH} levels: flatten it")}
    if not isinstance(request, dict):
        return {"error": batch_error("invalid_request", f"line {number}: must be a JSON object")}
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return {"error": batch_error("invalid_request", f"line {number}: custom_id must be a non-empty string")}
    if not _is_text(custom_id):
        return {"error": batch_error("invalid_request", f"line {number}: custom_id is not valid Unicode text "
                                                    "(a lone surrogate)")}
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
        try:
            check_json_tree(request["body"])  # as the HTTP API checks a body; json.dumps then cannot recurse too deep
        except InputError as exc:
            where = "body" if exc.field == "body" else f"body.{exc.field}"
            problem = problem or f"{where}: {exc.message}"
    seen.add(custom_id)
    if problem:
        return {"custom_id": custom_id, "error": batch_error("invalid_request", f"line {number}: {problem}")}
    return request


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def batch_error(code: str, message: str) -> dict:
    """An output line's `error` ({"code", "message"}, OpenAI's batch output form)."""
    return {"code": code, "message": message}
