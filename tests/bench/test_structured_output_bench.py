"""bench/structured_output.py's flags: a --tokens the engine cannot split into the model's blocks of whole
slots is argparse's usage error (exit 2) naming --tokens and the lengths that work, before any model loads
(it was an InvalidRequestError traceback from the first request, after the first table's run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import structured_output  # noqa: E402
from bench.bench_args import check_gen_length  # noqa: E402

SHIPPED = REPO / "models" / "refusion-tiny-code"  # slot_size 8, serial_num_blocks 8: steps of 64 tokens


def test_tokens_the_engine_cannot_split_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        structured_output.main(["--tokens", "8"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--tokens 8:" in err and "use a multiple of 64" in err and "Traceback" not in err, err


@pytest.mark.parametrize("tokens", [57, 64, 128])
def test_lengths_that_round_up_to_whole_steps_pass(tokens):
    check_gen_length(argparse.ArgumentParser(), "--tokens", tokens, SHIPPED)  # 57 rounds up to 64 (whole slots)


@pytest.mark.parametrize("tokens", [1, 56, 65, 120])
def test_lengths_off_the_step_are_refused_naming_the_flag(tokens, capsys):
    with pytest.raises(SystemExit) as exited:
        check_gen_length(argparse.ArgumentParser(), "--gen-length", tokens, SHIPPED)
    assert exited.value.code == 2
    assert f"--gen-length {tokens}: " in capsys.readouterr().err
