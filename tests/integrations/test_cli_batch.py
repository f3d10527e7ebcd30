"""`refusion run-batch` (vLLM's run-batch: the OpenAI batch file format, offline) as a subprocess on the
random tiny model: one result line per input line in input order, each request answered exactly as the
served app answers the same body, line faults and route faults as OpenAI's batch output writes them, a
full engine retried, a request that can never fit answered with a 400 naming `n`, bad flags one line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLED = {"mode": "ar", "temperature": 1.0, "seed": 11}
RUN_S = 600  # bound on a run-batch subprocess (start-up included): generous for a loaded 2-core machine


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_batch(tmp_path: Path, model_dir: Path, lines: list, *flags: str) -> tuple[int, list[dict], str]:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() if isinstance(line, str)
                                  else json.dumps(line).encode() for line in lines) + b"\n")
    target = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", str(target),
                           "--model", str(model_dir), *flags], cwd=REPO, capture_output=True, text=True, timeout=RUN_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = [json.loads(line) for line in target.read_text().splitlines()] if target.exists() else []
    return proc.returncode, results, proc.stderr


def _line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_every_line_is_answered_in_order_as_the_server_answers_it(tmp_path, tiny_model_dir, client, model):
    chat = {"model": model, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 12, **SAMPLED}
    completion = {"model": model, "prompt": "def add(a, b):\n", "max_tokens": 12, **SAMPLED}
    lines = [
        _line("chat", "/v1/chat/completions", chat),
        _line("completion", "/v1/completions", completion),
        _line("response", "/v1/responses", {"model": model, "input": "def f():", "max_output_tokens": 6, **SAMPLED}),
        _line("message", "/v1/messages", {"model": model, "max_tokens": 6, **SAMPLED,
                                          "messages": [{"role": "user", "content": "def f():"}]}),
        "{not json",
        _line("chat", "/v1/completions", completion),  # a repeated custom_id
        _line("wrong-url", "/v1/embeddings", {"model": model, "input": "x"}),
        {"custom_id": "wrong-method", "method": "GET", "url": "/v1/completions", "body": completion},
        _line("streamed", "/v1/completions", {**completion, "stream": True}),
        _line("refused", "/v1/completions", {**completion, "temperature": 9}),
        _line("unknown-model", "/v1/completions", {**completion, "model": "gpt-nope"}),
    ]
    code, results, stderr = _run_batch(tmp_path, tiny_model_dir, lines)
    assert code == 0, stderr
    assert [r["custom_id"] for r in results] == ["chat", "completion", "response", "message", None, "chat",
                                                  "wrong-url", "wrong-method", "streamed", "refused", "unknown-model"]
    assert len({r["id"] for r in results}) == len(results)
    served_chat = client.chat.completions.create(**{k: v for k, v in chat.items() if k not in SAMPLED},
                                                 temperature=1.0, seed=11, extra_body={"mode": "ar"})
    served_completion = client.completions.create(**{k: v for k, v in completion.items() if k not in SAMPLED},
                                                  temperature=1.0, seed=11, extra_body={"mode": "ar"})
    ok = {r["custom_id"]: r["response"] for r in results[:4]}
    assert all(r["status_code"] == 200 and r["request_id"] for r in ok.values()) and results[0]["error"] is None
    # the id the server's proxy would give: the body's id (a chat completion's, a response's, a message's)
    assert all(r["body"]["id"] == r["request_id"] for r in ok.values() if r["body"].get("object") != "response")
    assert ok["response"]["body"]["id"].endswith(ok["response"]["request_id"])
    assert ok["chat"]["body"]["choices"][0]["message"]["content"] == served_chat.choices[0].message.content
    assert ok["completion"]["body"]["choices"][0]["text"] == served_completion.choices[0].text
    assert ok["completion"]["body"]["usage"] == served_completion.usage.model_dump(exclude_none=True)
    assert ok["response"]["body"]["object"] == "response" and ok["message"]["body"]["type"] == "message"
    line_faults = {r["custom_id"]: r["error"]["message"] for r in results[4:9]}
    assert all(r["response"] is None for r in results[4:9])
    assert "line 5: not JSON" in line_faults[None] and "used by an earlier line" in line_faults["chat"]
    assert "url must be one of" in line_faults["wrong-url"] and "method" in line_faults["wrong-method"]
    assert "body.stream" in line_faults["streamed"]
    refused, unknown = results[9], results[10]
    assert refused["response"]["status_code"] == 400 and refused["error"]["message"].startswith("temperature")
    assert refused["response"]["body"]["error"]["param"] == "temperature"
    assert unknown["response"]["status_code"] == 404 and unknown["error"]["code"] == "model_not_found"
    ids = [r["response"]["request_id"] for r in results if r["response"]]
    assert all(ids) and len(set(ids)) == len(ids)  # refused requests have one too (it was null)
    assert "11 of 11 lines answered, 4 succeeded, 7 failed" in stderr
    # at the default --log-level info: each request's outcome, not its routing decision (~600 bytes, debug)
    assert "] finished " in stderr and "] route " not in stderr and "[debug" not in stderr, stderr[-2000:]


def test_a_full_engine_is_retried_and_a_request_that_can_never_fit_gets_a_400(tmp_path, tiny_model_dir):
    """One running request and no queue: six requests in flight at once (four completions, two Anthropic
    messages) are refused in turn and retried until each runs; a request of two choices can never be admitted: a 400 naming `n` at once, as the
    server answers it (never retried, never a retryable 503)."""
    model = tiny_model_dir.name
    lines = [_line(f"r{i}", "/v1/completions", {"model": model, "prompt": f"x = {i}", "max_tokens": 4, **SAMPLED})
             for i in range(4)]
    for i in range(2):  # Anthropic's shape of the same refusal (overloaded_error) was not retried: a 503 result
        lines.append(_line(f"m{i}", "/v1/messages", {"model": model, "max_tokens": 4, **SAMPLED,
                                                     "messages": [{"role": "user", "content": f"x = {i}"}]}))
    for name in ("two", "two-more"):  # two that can never fit must not keep each other retrying
        lines.append(_line(name, "/v1/completions", {"model": model, "prompt": "y", "max_tokens": 4, "n": 2, **SAMPLED}))
    code, results, stderr = _run_batch(tmp_path, tiny_model_dir, lines, "--max-num-seqs", "1", "--max-queue", "0",
                                       "--concurrency", "6")
    assert code == 0, stderr
    assert [r["response"]["status_code"] for r in results[:6]] == [200] * 6, [r["error"] for r in results[:6]]
    for never in results[6:]:
        assert never["response"]["status_code"] == 400, never
        assert never["response"]["body"]["error"]["param"] == "n"
        assert "at most 1 at once" in never["error"]["message"]


def test_max_model_len_is_the_context_the_batch_is_answered_in(tmp_path, tiny_model_dir):
    """vLLM's run-batch --max-model-len: a prompt and max_tokens past it are the server's 400 naming
    max_tokens with what fits; an unset max_tokens shrinks to the room left (the batch ignored the flag)."""
    model = tiny_model_dir.name
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]  # token ids: 8 of the 24 served
    lines = [_line("over", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 20, **SAMPLED}),
             _line("fits", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 16, **SAMPLED}),
             _line("unset", "/v1/chat/completions", {"model": model, **SAMPLED,
                                                     "messages": [{"role": "user", "content": "x"}]})]
    code, results, stderr = _run_batch(tmp_path, tiny_model_dir, lines, "--max-model-len", "24", "--log-level", "warning")
    assert code == 0, stderr
    # --log-level warning, as serve's: no engine info line nor request log, the summary alone
    assert stderr.strip().splitlines() == ["refusion run-batch: 3 of 3 lines answered, 2 succeeded, 1 failed, "
                                           + stderr.split("1 failed, ")[1].strip()], stderr
    over, fits, unset = (r["response"] for r in results)
    assert over["status_code"] == 400 and over["body"]["error"]["param"] == "max_tokens"
    assert "maximum context length is 24 tokens" in over["body"]["error"]["message"]
    assert "ask for at most 16" in over["body"]["error"]["message"]
    assert fits["status_code"] == 200, fits
    assert unset["status_code"] == 200, unset
    usage = unset["body"]["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 24


def test_requests_that_fit_are_never_told_they_do_not(tmp_path, tiny_model_dir):
    """Two requests of two choices each on an engine of two slots: started together, each may get one
    slot and be refused (a grammar's compile delays one choice's admission); the one refused with
    nothing else running is tried again alone, so both are answered, neither 503."""
    model = tiny_model_dir.name
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "n": 2,
            "response_format": {"type": "json_object"}, **SAMPLED}
    lines = [_line(f"g{i}", "/v1/chat/completions", body) for i in range(6)]
    code, results, stderr = _run_batch(tmp_path, tiny_model_dir, lines, "--max-num-seqs", "2", "--max-queue", "0",
                                       "--concurrency", "2")
    assert code == 0, stderr
    assert [r["response"]["status_code"] for r in results] == [200] * 6, [r["error"] for r in results]
    assert all(len(r["response"]["body"]["choices"]) == 2 for r in results)


def test_odd_bytes_are_answered_line_by_line(tmp_path, tiny_model_dir):
    """Lines end at \\n only (U+2028 is text inside a JSON string), are numbered as the file numbers them,
    may be CRLF or start with a BOM; a line that is not UTF-8, holds NaN or a lone surrogate, or nests
    deeper than the API allows (3,000 levels overflowed Python's JSON decoder and ended the batch) is
    that line's error (NaN the app's 400), never the batch's end."""
    model = tiny_model_dir.name
    body = {"model": model, "prompt": "x", "max_tokens": 2, **SAMPLED}
    lines = [
        b"\xef\xbb\xbf" + json.dumps(_line("bom", "/v1/completions", body)).encode(),
        b"",
        json.dumps(_line("sep", "/v1/chat/completions", {**body, "prompt": None, "messages": [
            {"role": "user", "content": "a\u2028b\u0085c"}]}), ensure_ascii=False).encode() + b"\r",
        b'{"custom_id": "latin1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "caf\xe9"}}',
        b'{"custom_id": "nan", "method": "POST", "url": "/v1/completions", "body": {"model": "%s", "prompt": "x", '
        b'"temperature": NaN}}' % model.encode(),
        b'{"custom_id": "surrogate", "method": "POST", "url": "/v1/completions", "body": {"model": "%s", '
        b'"prompt": "\\ud800"}}' % model.encode(),
        b'{"custom_id": "a\\udc00", "method": "POST", "url": "/v1/completions", "body": {}}',
        b'{"custom_id": "deep", "method": "POST", "url": "/v1/completions", "body": {"prompt": %s}}'
        % (b"[" * 3000 + b"]" * 3000),
        b'{"custom_id": "nested", "method": "POST", "url": "/v1/completions", "body": {"prompt": %s}}'
        % (b"[" * 200 + b"]" * 200),
        json.dumps(_line("after", "/v1/completions", body)).encode(),
    ]
    code, results, stderr = _run_batch(tmp_path, tiny_model_dir, lines)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert [r["custom_id"] for r in results] == ["bom", "sep", None, "nan", "surrogate", None, None, "nested", "after"]
    assert [(r["response"] or {}).get("status_code") for r in results] == [200, 200, None, 400, None, None, None,
                                                                           None, 200]
    assert results[2]["error"]["message"].startswith("line 4: not UTF-8")
    assert "NaN" in results[3]["error"]["message"]
    assert results[4]["error"]["message"] == ("line 6: body.prompt: has a lone UTF-16 surrogate (\\ud800) at character "
                                              "0: send valid Unicode text")
    assert results[5]["error"]["message"].startswith("line 7: custom_id is not valid Unicode")
    assert results[6]["error"] == {"code": "invalid_json",
                                   "message": "line 8: nests arrays/objects deeper than 64 levels: flatten it"}
    assert results[7]["error"]["message"].startswith("line 9: body.prompt.0.0.0.0.0.…: nests arrays/objects deeper")


def test_an_interrupted_run_leaves_whole_lines_and_says_how_far_it_got(tmp_path, tiny_model_dir, wait_until):
    import signal

    model = tiny_model_dir.name
    source, target, stderr_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    source.write_text("".join(json.dumps(_line(f"r{i}", "/v1/completions", {
        "model": model, "prompt": f"x = {i}", "max_tokens": 32, **SAMPLED})) + "\n" for i in range(2000)))
    with open(stderr_path, "w") as stderr:  # a file: the request log (~1 KB a line) would fill an unread pipe
        proc = subprocess.Popen([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o",
                                 str(target), "--model", str(tiny_model_dir)], cwd=REPO, stderr=stderr,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    patient = type(wait_until)(timeout_s=RUN_S)  # a niced start-up under load took 132 s
    try:
        # Interrupted only once answering has begun (the model loaded, results flowing), however long the
        # start takes: a Ctrl-C during start-up is another outcome. A run that ends by itself stops the wait.
        patient.blocking(lambda: proc.poll() is not None or _line_count(target) >= 3, "three answered lines")
        assert proc.returncode is None, stderr_path.read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=RUN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = stderr_path.read_text()
    written = target.read_text().splitlines()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert [json.loads(line)["custom_id"] for line in written] == [f"r{i}" for i in range(len(written))]
    assert f"interrupted: {len(written)} of 2000 lines answered" in stderr and len(written) < 2000


def _line_count(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "0"], "--concurrency: must be at least 1"),
    (["--max-queue", "-1"], "--max-queue:"),
    (["--model", "/nonexistent"], "--model: /nonexistent is not a model directory"),
    (["--model", "/tmp"], "--model: /tmp cannot be loaded"),
    (["--served-model-name", "a", " "], "--served-model-name: give one or more non-empty names"),
    (["--served-model-name", "a", "a"], "--served-model-name: names repeat"),
    (["--max-model-len", "0"], "--max-model-len: got 0; give 1 to 4096 (the model's context"),
    (["--max-model-len", "4097"], "--max-model-len: got 4097; give 1 to 4096 (the model's context"),
    # it said "--model: ... cannot be loaded"
    pytest.param(["--device", "cuda"], "--device: cuda requested but no CUDA device is available; use --device cpu",
                 marks=pytest.mark.skipif(_has_cuda(), reason="CUDA is available here")),
])
def test_bad_flags_are_one_line_on_stderr(tmp_path, tiny_model_dir, flags, message):
    source = tmp_path / "in.jsonl"
    source.write_text("")
    argv = [sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", str(tmp_path / "o.jsonl"),
            "--model", str(tiny_model_dir), *flags]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()  # a refused run leaves the output alone


@pytest.mark.parametrize("defaults, said", [
    ({"slot_size": 0}, "slot_size: must be >= 1, got 0"),  # (a ZeroDivisionError traceback, exit 1, no line out)
    ({"gen_length": 0}, "gen_length: must be >= 1, got 0"),  # (these two were taken without a word)
    ({"gen_length": "x"}, "gen_length: must be an integer, got 'x'"),
])
def test_a_bad_decode_default_in_the_model_directory_is_one_line_before_any_request(tmp_path, tiny_model_dir,
                                                                                   defaults, said):
    """refusion.json's values are checked as `refusion serve` and `refusion generate` check them at load
    (decoding.params.model_default_params): one line naming the file and the key, exit 2, output untouched."""
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "refusion.json").write_text(json.dumps(defaults))
    code, results, stderr = _run_batch(tmp_path, model, [_line("a", "/v1/completions", {
        "model": "model", "prompt": "x = 1", "max_tokens": 4})])
    assert code == 2 and results == [] and not (tmp_path / "out.jsonl").exists(), stderr
    assert stderr == f"refusion run-batch: error: --model: {model / 'refusion.json'}: {said}\n", stderr


def test_bad_files_are_one_line_on_stderr_and_leave_the_output_alone(tmp_path, tiny_model_dir):
    source = tmp_path / "in.jsonl"
    source.write_text("")
    missing = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(tmp_path / "none"),
                              "-o", str(tmp_path / "o.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--input-file: cannot read" in missing.stderr
    assert not (tmp_path / "o.jsonl").exists()  # a refused run leaves the output alone
    same = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", str(source)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert same.returncode == 2 and "--output-file: is the input file" in same.stderr
    linked = tmp_path / "linked.jsonl"
    os.link(source, linked)  # one file under two names: resolve() does not see it, the run overwrote its input
    before = source.read_bytes()
    hard = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", str(linked)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert hard.returncode == 2 and "--output-file: is the input file" in hard.stderr and source.read_bytes() == before
    for target, why in ((tmp_path, "is a directory"), (tmp_path / "no" / "o.jsonl", "does not exist")):
        refused = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o",
                                  str(target), "--model", str(tiny_model_dir)], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail with ENOSPC)")
def test_an_output_that_cannot_be_written_is_one_line_on_stderr(tmp_path, tiny_model_dir):
    # /dev/full stands for a disk that fills up mid-run: two chained tracebacks before
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(_line(f"r{i}", "/v1/completions", {
        "model": tiny_model_dir.name, "prompt": f"x = {i}", "max_tokens": 4, **SAMPLED})) + "\n" for i in range(3)))
    proc = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", "/dev/full",
                           "--model", str(tiny_model_dir)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    # the summary counts lines written: none reached the file (it said "1 of 3 lines answered", helper-186)
    assert "--output-file: cannot write /dev/full: No space left on device; stopped: 0 of 3 lines answered" in proc.stderr


def test_the_summary_counts_answering_time_only(monkeypatch):
    """A run stopped while the model loads answered for 0 s (it said "0 tokens generated in 5.3 s",
    the load's time, though the summary excludes it; helper-149)."""
    import integrations.cli_batch as cli_batch

    from types import SimpleNamespace

    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(cli_batch, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    progress = cli_batch.Progress()  # (the model loads now)
    assert progress.seconds() == 0.0 and progress.summary().endswith("in 0.0 s")
    progress.started = cli_batch.time.monotonic()
    assert progress.seconds() == 5.0
