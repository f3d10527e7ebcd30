"""The bench scripts' output flags (--json, --append) are checked when the flags are parsed: a path the run
could not write at its end (a folder that does not exist, a directory, a place no file can be created) is
argparse's usage error naming the flag (exit 2), before any part runs or any model loads. Each was opened
only at the end, so a bad one threw the run away (on a GPU: paid device time)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import cluster_editor  # noqa: E402
import concurrency  # noqa: E402
import editor_latency  # noqa: E402
import engine_overhead  # noqa: E402
import forward_latency  # noqa: E402
import gpu_check  # noqa: E402
import layer_kernels  # noqa: E402
import prefix_cache  # noqa: E402
import rebalance  # noqa: E402

from bench.bench_args import writable_file  # noqa: E402

SCRIPT_FLAGS = [(gpu_check, "--json"), (gpu_check, "--append"), (forward_latency, "--append"),
                (layer_kernels, "--json"), (engine_overhead, "--append"), (prefix_cache, "--append"),
                (concurrency, "--append"), (editor_latency, "--append"), (cluster_editor, "--append"),
                (rebalance, "--append")]


def bad_paths(tmp_path: Path) -> dict[str, str]:
    """path -> what the refusal says about it."""
    return {"/proc/x/f.json": "/proc/x does not exist", str(tmp_path): "is a directory",
            str(tmp_path / "no" / "f.md"): f"{tmp_path / 'no'} does not exist",
            "/proc/f.json": "cannot write /proc/f.json"}  # (no file can be made in /proc, not even by root)


@pytest.mark.parametrize("module, flag", SCRIPT_FLAGS, ids=[f"{m.__name__} {f}" for m, f in SCRIPT_FLAGS])
def test_an_output_path_the_run_cannot_write_is_refused_before_it_runs(module, flag, tmp_path, capsys):
    for path, said in bad_paths(tmp_path).items():
        with pytest.raises(SystemExit) as exited:
            module.main([flag, path])
        out, err = capsys.readouterr()
        assert exited.value.code == 2 and out == "", (path, out)
        assert f"argument {flag}: " in err and said in err, (path, err)


def test_a_writable_path_passes_and_an_existing_file_is_left_as_it_was(tmp_path):
    existing = tmp_path / "t.md"
    existing.write_text("kept\n")
    assert writable_file(str(existing)) == existing and existing.read_text() == "kept\n"
    assert writable_file(str(tmp_path / "new.json")) == tmp_path / "new.json"
    assert not (tmp_path / "new.json").exists() and [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_a_file_in_a_folder_this_user_cannot_write_is_refused(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere a file system lets it")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write .*Permission denied"):
        writable_file(str(locked / "f.json"))
