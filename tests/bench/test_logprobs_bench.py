"""bench/logprobs.py runs and reports every case: reads with and without the log-probability stage (and
ranks), the engine in both modes with and without logprobs (its requests assert they got them), the ingress format."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import logprobs  # noqa: E402


def test_logprobs_bench_reports_every_case(capsys):
    assert logprobs.main(["--vocabs", "64", "--rows", "2", "--repeats", "1", "--requests", "2", "--tokens", "64",
                          "--score-prompt-tokens", "40"]) == 0
    out = capsys.readouterr().out
    reads = next(line for line in out.splitlines() if line.startswith("| 64 | 2 |"))
    assert len(reads.split("|")) == 7  # vocab, rows, plain, with logprobs, with logprobs and ranks
    for mode in ("ar", "refusion"):
        for asked in ("-", "5"):
            row = next(line for line in out.splitlines() if line.startswith(f"| {mode} | {asked} | 2 |"))
            assert int(row.split("|")[4]) > 0  # tokens came back
    assert "us/token" in out
    for case in ("prefill + 1 AR token", "scored, max_tokens 0"):  # (each request asserted its scores)
        row = next(line for line in out.splitlines() if line.startswith(f"| {case} | 2 | 40 |"))
        assert float(row.split("|")[5]) > 0


def test_logprobs_bench_measures_only_the_parts_asked(capsys):
    assert logprobs.main(["--vocabs", "64", "--rows", "2", "--repeats", "1", "--parts", "reads"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | 2 |" in out and "engine:" not in out and "scoring:" not in out and "us/token" not in out


def test_tokens_the_engine_cannot_split_is_refused_before_any_part_runs(capsys):
    """--tokens 8 on the shipped model (8 blocks of 8-token slots): the usage error names the multiples
    that work, before the reads part or a model load (it came after them, in the engine's words)."""
    with pytest.raises(SystemExit) as exited:
        logprobs.main(["--parts", "engine", "--tokens", "8"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "--tokens 8: " in err and "use a multiple of 64" in err, (out, err)
