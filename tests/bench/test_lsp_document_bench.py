"""bench/lsp_document.py runs: a row per document size, with its line count and both timings."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import lsp_document  # noqa: E402


def test_the_bench_prints_a_row_per_document_size(capsys):
    assert lsp_document.main(["--mb", "0.01,0.05", "--repeats", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.0")]
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [("0.01", "156"), ("0.05", "781")]
    assert all(float(r.split("|")[3]) > 0 and float(r.split("|")[4]) > 0 for r in rows)

