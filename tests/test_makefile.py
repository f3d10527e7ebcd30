"""The Makefile's install target: two runs at once (`make test` beside `make serve` in a fresh clone) take
turns on .install.lock, so the second finds the first's install instead of installing over it. Played on
a copy of the Makefile with a stand-in .venv/bin/python whose `pip install` logs its start and end."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAND_IN_PYTHON = """#!/bin/sh
case "$*" in
  *"-m pip install"*) echo "start $$" >> pip.log; while [ ! -e release ]; do sleep 0.05; done; echo "end $$" >> pip.log ;;
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

    def make() -> subprocess.Popen:
        return subprocess.Popen(["make", "--no-print-directory", "install"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    # Forced, not timed: the first install holds the lock in its pip (which waits for `release`) when the
    # second starts; `release` is made once the second has said that it waits
    first, deadline = make(), time.monotonic() + 60
    while not (tmp_path / "pip.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = make()
    ready, _, _ = select.select([second.stdout], [], [], 60)
    waiting = second.stdout.readline() if ready else ""
    (tmp_path / "release").touch()
    runs = [first, second]
    said = [first.communicate(timeout=60)[0], waiting + second.communicate(timeout=60)[0]]
    assert [run.returncode for run in runs] == [0, 0], said
    log = (tmp_path / "pip.log").read_text().split()
    # one install: its two pip runs (torch, then the project), one after the other; the second make
    # waited and found the stamp newer than pyproject.toml (without the lock: four runs, interleaved)
    events = log[0::2]
    assert events == ["start", "end", "start", "end"], log
    assert "waiting for another make install" in waiting, said
    assert (tmp_path / ".venv" / ".installed").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_serve_passes_args_to_refusion_serve(tmp_path):
    """`make serve ARGS="--port 8013"` runs `refusion serve --port 8013` (make serve took no flags, so
    another port or model meant leaving make; helper-224). Played with a stand-in .venv/bin/refusion that
    prints its arguments, after an install the stamp says is done."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'stand-in'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("python", "exit 0\n"), ("refusion", 'echo "refusion $*"\n')):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # newer than pyproject.toml: nothing to install
    env = {**os.environ, "ARGS": "--port 9"}  # an ARGS of the environment is not taken (helper-226)
    for args, expected in ((["ARGS=--port 8013 --model m"], "refusion serve --port 8013 --model m"), ([], "refusion serve")):
        run = subprocess.run(["make", "--no-print-directory", "-s", "serve", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.splitlines()[-1] == expected, run
