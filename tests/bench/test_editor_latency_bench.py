"""bench/editor_latency.py with other editors kept busy beside the measured one (--heavy) runs on the
shipped model over a real uvicorn server and reports what it ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import editor_latency  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fair", [True, False])
def test_editor_latency_with_busy_editors_beside(capsys, fair):
    argv = ["--heavy", "2", "--heavy-inflight", "2", "--max-running", "3", "--cases", "1", "--repeats", "1",
            "--max-time-ms", "5000"] + ([] if fair else ["--no-fair-share"])
    assert editor_latency.main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| complete one-line suggestion |"))
    assert row.split("|")[-2].strip() == "1"  # n: the one measured completion answered
    assert "Beside it: 2 other editor connections with 2 multiline completions" in out
    assert ("fair share on" if fair else "fair share off (--no-fair-share)") in out
