"""bench/cluster_editor.py's flags (no Ray is started): --quick's smoke-run sizes are defaults that flags
given beside it override (it silently overwrote --editors, --burst, --keystrokes, --agents), and sizes the
run cannot use are usage errors naming the flag, before Ray starts (--num-blocks 0 was a pydantic
traceback 20 s in, after Ray had started)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import cluster_editor  # noqa: E402


def test_flags_given_beside_quick_win():
    args = cluster_editor.parse_args(["--quick", "--editors", "2", "--burst", "1", "--keystrokes", "6", "--agents", "0"])
    assert (args.editors, args.burst, args.keystrokes, args.agents) == (2, 1, 6, 0)
    assert (args.documents, args.turns) == (2, 2)  # the rest: --quick's
    assert vars(cluster_editor.parse_args(["--quick"])) | {"quick": False} != vars(cluster_editor.parse_args([]))


@pytest.mark.parametrize("flag, value, said", [
    ("--num-blocks", "0", "expected at least 1, got 0"),
    ("--num-blocks", "3", "runner.num_blocks: the KV cache needs at least 4 blocks of 16 tokens"),
    ("--keystrokes", "0", "expected at least 1"), ("--burst", "0", "expected at least 1"),
    ("--editors", "0", "expected at least 1"), ("--agents", "-1", "expected at least 0"),
    ("--turns", "8", "expected at most 7"), ("--editor-max-tokens", "257", "expected at most 256"),
    ("--timeout-s", "0", "expected numbers above 0")])
def test_sizes_the_run_cannot_use_are_refused_before_ray_starts(flag, value, said, capsys):
    with pytest.raises(SystemExit) as exited:
        cluster_editor.parse_args(["--quick", flag, value])
    assert exited.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cluster_editor.parse_args(["--imbalanced-threshold", "-1"])
    assert "--imbalanced-threshold -1.0: give a number >= 0" in capsys.readouterr().err


def test_more_documents_and_agents_than_stdlib_files_is_refused(capsys):
    """Each document and each agent conversation draws a standard library file of its own: asking for
    more than there are was random.sample's ValueError traceback in the workload's building."""
    files = len(cluster_editor.stdlib_pool())
    with pytest.raises(SystemExit) as exited:
        cluster_editor.parse_args(["--documents", str(files), "--agents", "1"])
    assert exited.value.code == 2 and f"ask for at most {files} in all" in capsys.readouterr().err
    assert cluster_editor.parse_args(["--documents", str(files - 1), "--agents", "1"]).documents == files - 1
