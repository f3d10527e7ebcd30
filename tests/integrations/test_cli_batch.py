"""`refusion run-batch` (vLLM's run-batch: the OpenAI batch file format, offline) as a subprocess on the
random tiny model: one result line per input line in input order, each request answered exactly as the
served app answers the same body, line faults and route faults as OpenAI's batch output writes them, a
full engine retried, a request that can never fit answered with its 503, bad flags one line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLED = {"mode": "ar", "temperature": 1.0, "seed": 11}


def _run_batch(tmp_path: Path, model_dir: Path, lines: list, *flags: str) -> tuple[int, list[dict], str]:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    target = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", str(target),
                           "--model", str(model_dir), *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
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
    assert [r["custom_id"] for r in results] == ["chat", "completion", "response", None, "chat", "wrong-url",
                                                  "wrong-method", "streamed", "refused", "unknown-model"]
    assert len({r["id"] for r in results}) == len(results)
    served_chat = client.chat.completions.create(**{k: v for k, v in chat.items() if k not in SAMPLED},
                                                 temperature=1.0, seed=11, extra_body={"mode": "ar"})
    served_completion = client.completions.create(**{k: v for k, v in completion.items() if k not in SAMPLED},
                                                  temperature=1.0, seed=11, extra_body={"mode": "ar"})
    ok = {r["custom_id"]: r["response"] for r in results[:3]}
    assert all(r["status_code"] == 200 and r["request_id"] for r in ok.values()) and results[0]["error"] is None
    assert ok["chat"]["body"]["choices"][0]["message"]["content"] == served_chat.choices[0].message.content
    assert ok["completion"]["body"]["choices"][0]["text"] == served_completion.choices[0].text
    assert ok["completion"]["body"]["usage"] == served_completion.usage.model_dump(exclude_none=True)
    assert ok["response"]["body"]["object"] == "response"
    line_faults = {r["custom_id"]: r["error"]["message"] for r in results[3:8]}
    assert all(r["response"] is None for r in results[3:8])
    assert "line 4: not JSON" in line_faults[None] and "used by an earlier line" in line_faults["chat"]
    assert "url must be one of" in line_faults["wrong-url"] and "method" in line_faults["wrong-method"]
    assert "body.stream" in line_faults["streamed"]
    refused, unknown = results[8], results[9]
    assert refused["response"]["status_code"] == 400 and refused["error"]["message"].startswith("temperature")
    assert refused["response"]["body"]["error"]["param"] == "temperature"
    assert unknown["response"]["status_code"] == 404 and unknown["error"]["code"] == "model_not_found"
    assert "10 lines, 3 succeeded, 7 failed" in stderr


def test_a_full_engine_is_retried_and_a_request_that_can_never_fit_gets_its_503(tmp_path, tiny_model_dir):
    """One running request and no queue: four requests in flight at once are refused in turn and retried
    until each runs; a request of two choices can never be admitted, so once it is alone its 503 is
    the answer (it does not spin for ever)."""
    model = tiny_model_dir.name
    lines = [_line(f"r{i}", "/v1/completions", {"model": model, "prompt": f"x = {i}", "max_tokens": 4, **SAMPLED})
             for i in range(4)]
    lines.append(_line("two", "/v1/completions", {"model": model, "prompt": "y", "max_tokens": 4, "n": 2, **SAMPLED}))
    code, results, stderr = _run_batch(tmp_path, tiny_model_dir, lines, "--max-num-seqs", "1", "--max-queue", "0",
                                       "--concurrency", "5")
    assert code == 0, stderr
    assert [r["response"]["status_code"] for r in results[:4]] == [200] * 4
    assert results[4]["response"]["status_code"] == 503 and results[4]["error"]["code"] == "overloaded"


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "0"], "--concurrency: must be at least 1"),
    (["--max-queue", "-1"], "--max-queue:"),
    (["--model", "/nonexistent"], "--model: /nonexistent is not a model directory"),
])
def test_bad_flags_are_one_line_on_stderr(tmp_path, tiny_model_dir, flags, message):
    source = tmp_path / "in.jsonl"
    source.write_text("")
    argv = [sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(source), "-o", str(tmp_path / "o.jsonl"),
            "--model", str(tiny_model_dir), *flags]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "integrations.cli", "run-batch", "-i", str(tmp_path / "none"),
                              "-o", str(tmp_path / "o.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--input-file: cannot read" in missing.stderr
