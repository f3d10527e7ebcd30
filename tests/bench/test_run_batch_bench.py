"""bench/run_batch.py runs, answers every line, and the runs at each concurrency give the same (seeded) texts."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import run_batch  # noqa: E402


def test_run_batch_bench_answers_every_line_the_same_at_each_concurrency(capsys):
    assert run_batch.main(["--requests", "6", "--tokens", "4", "--concurrency", "1,3"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [r for r in rows if r[1].strip().isdigit()]
    assert [int(r[1]) for r in rows] == [1, 3]
    assert all(int(r[5]) == 0 and r[6].strip() == "yes" for r in rows)
