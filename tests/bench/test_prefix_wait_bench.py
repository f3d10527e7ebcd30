"""bench/prefix_wait.py runs and measures what it claims: with waiting on, copies of one prompt compute it
about once; with it off, once per copy."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import prefix_wait  # noqa: E402


def test_prefix_wait_bench_computes_a_shared_prompt_once(capsys):
    assert prefix_wait.main(["--copies", "3", "--rounds", "1", "--prompt-tokens", "128", "--tokens", "8"]) == 0
    rows = {int(line.split("|")[2]): int(line.split("|")[3]) for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 3 |")}
    assert rows[0] == 3 * 128  # every copy computed the whole prompt
    assert 128 <= rows[2] < 128 + 3 * 16  # once, plus each waiter's last (uncached) block
