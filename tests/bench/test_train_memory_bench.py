"""bench/train_memory.py trains a shape one step in a process of its own and prints its measured peak beside
the estimate `refusion train`'s memory check uses; a malformed shape is argparse's one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_memory_bench_prints_the_peak_and_the_estimate_of_each_shape():
    done = subprocess.run([sys.executable, "bench/train_memory.py", "--shapes", "512 2 1 32 64"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 512 ")]
    assert len(rows) == 1, done.stdout
    seq_len, rows_, layers, hidden, intermediate, peak, estimate, ratio = (cell.strip() for cell in rows[0])
    assert (seq_len, rows_, layers, hidden, intermediate) == ("512", "2", "1", "32", "64")
    assert float(peak) > 0 and float(estimate) > 0
    assert abs(float(ratio) - float(estimate) / float(peak)) < 0.1  # (rounded to two places each)
    bad = subprocess.run([sys.executable, "bench/train_memory.py", "--shapes", "512 2 1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected \"SEQ_LEN ROWS LAYERS HIDDEN INTERMEDIATE\"" in bad.stderr
