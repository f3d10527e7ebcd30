"""The Makefile's install target: two runs at once (`make test` beside `make serve` in a fresh clone) take
turns on .install.lock, so the second finds the first's install instead of installing over it. Played on
a copy of the Makefile with a stand-in .venv/bin/python whose `pip install` logs its start and end."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAND_IN_PYTHON = """#!/bin/sh
case "$*" in
  *"-m pip install"*) echo "start $$" >> pip.log; sleep 1; echo "end $$" >> pip.log ;;
esac
exit 0
"""


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("flock") is None, reason="needs make and flock")
def test_two_installs_at_once_take_turns(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'stand-in'\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    runs = [subprocess.Popen(["make", "--no-print-directory", "install"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    said = [run.communicate(timeout=60)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], said
    log = (tmp_path / "pip.log").read_text().split()
    # one install: its two pip runs (torch, then the project), one after the other; the second make
    # waited and found the stamp newer than pyproject.toml (without the lock: four runs, interleaved)
    events = log[0::2]
    assert events == ["start", "end", "start", "end"], log
    assert any("waiting for another make install" in text for text in said), said
    assert (tmp_path / ".venv" / ".installed").exists()
