"""Bench flag values a run cannot use (zero, negative, not a number, past what the model holds) are
argparse's usage error naming the flag (exit 2), before any part runs or any model loads; each was a
traceback minutes in, or a silently wrong table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import step_overhead  # noqa: E402


def refused(main, argv: list[str], said: str, capsys) -> str:
    """Run `main(argv)`; assert argparse's usage error (exit 2, nothing on stdout) whose text holds `said`."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == "", (argv, out)
    assert said in err and "Traceback" not in err, (argv, err)
    return err


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--slot-size", "0"), ("--slots", "0"),
                                         ("--context", "-5"), ("--context", "abc")])
def test_step_overhead_refuses_sizes_it_cannot_run(flag, value, capsys):
    refused(step_overhead.main, [flag, value], f"argument {flag}: ", capsys)
