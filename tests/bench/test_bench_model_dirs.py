"""A --model that is no model directory (a folder without config.json, a file) is argparse's usage error
naming --model (exit 2), as bench/concurrency.py's and bench/rebalance.py's (bench_args.model_dir), before
anything loads: it was a ModelDirError traceback (chat_card, prefix_wait, logprobs, structured_output,
cluster_editor), BatchArgumentError's (run_batch), or one from inside transformers (train_throughput)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import chat_card  # noqa: E402
import cluster_editor  # noqa: E402
import logprobs  # noqa: E402
import prefix_wait  # noqa: E402
import run_batch  # noqa: E402
import structured_output  # noqa: E402
import train_throughput  # noqa: E402

# (the other flags keep an old run short: logprobs' reads part would run first)
SCRIPTS = [(chat_card, []), (cluster_editor, []), (logprobs, ["--parts", "engine"]), (prefix_wait, []),
           (run_batch, []), (structured_output, []), (train_throughput, [])]


@pytest.mark.parametrize("module, more", SCRIPTS, ids=[m.__name__ for m, _ in SCRIPTS])
def test_a_model_flag_that_names_no_model_directory_is_a_usage_error(module, more, tmp_path, capsys):
    for bad in (str(tmp_path), str(REPO / "models" / "refusion-tiny-code" / "config.json")):
        with pytest.raises(SystemExit) as exited:
            module.main(["--model", bad, *more])
        out, err = capsys.readouterr()
        assert exited.value.code == 2 and out == "", out
        assert f"argument --model: {bad}: no config.json there" in err and "Traceback" not in err, err
