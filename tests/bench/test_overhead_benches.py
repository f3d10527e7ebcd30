"""bench/step_overhead.py and bench/engine_overhead.py run (their zero-cost stand-in model has to keep up
with the runner's model interface) and measure what they claim: the engine on the stand-in runs every
request to gen_length, AR one token per forward, ReFusion with confident drafts accepts whole slots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import engine_overhead  # noqa: E402
import forward_latency  # noqa: E402
import step_overhead  # noqa: E402


def test_step_overhead_runs_every_shape(capsys):
    assert step_overhead.main(["--requests", "1,4", "--repeats", "2", "--vocab", "64"]) == 0
    out = capsys.readouterr().out
    for shape in step_overhead.SHAPES:
        assert f"| {shape} | 4 |" in out, shape


def test_engine_overhead_on_the_zero_cost_model(capsys, tmp_path):
    table = tmp_path / "t.md"
    assert engine_overhead.main(["--levels", "1,2", "--gen-length", "32", "--append", str(table)]) == 0
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| ar")
            or line.startswith("| refusion")]
    by = {(r[0].strip(), r[1].strip(), int(r[2])): r for r in rows}
    assert set(by) == {(m, c, n) for m, c in (("ar", "confident"), ("refusion", "confident"),
                                               ("refusion", "uncertain")) for n in (1, 2)}
    for (mode, confidence, n), r in by.items():
        steps, ms, inside, outside, tpf = int(r[3]), float(r[4]), float(r[5]), float(r[6]), float(r[7])
        assert steps > 0 and ms > 0 and inside > 0 and outside > 0
        assert abs(inside + outside - ms) < 0.02 + 0.01 * ms  # the two parts make up the step
        if mode == "ar":
            assert tpf == 1.0
            assert steps >= 32 * max(2 * n, 4) / n  # one token per request per step, 32 tokens each
        elif confidence == "confident":
            assert tpf > 2.0  # whole slots verified at once
        else:
            assert tpf < 1.0  # single-slot fallback: a draft and a verify per token


def test_engine_overhead_counts_the_steps_launched_ahead_of_staggered_auto_requests(capsys):
    assert engine_overhead.main(["--levels", "3", "--gen-length", "64", "--modes", "auto,ar", "--confidence",
                                 "uncertain", "--async-scheduling", "on", "--device-ms", "2", "--stagger-ms",
                                 "2.2"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| auto", "| ar"))}
    assert set(rows) == {"auto", "ar"}
    for mode, r in rows.items():
        assert float(r[7]) == 1.0, mode  # the router put the uncertain stand-in's AUTO requests in AR
        assert 0.4 < int(r[9].strip(" %")) / 100 <= 1.0, mode  # pipelined but for arrivals and ends


def test_prefix_cache_bench_measures_a_full_cache(capsys):
    import prefix_cache

    assert prefix_cache.main(["--sizes", "300", "--prompt-blocks", "10", "--repeats", "2"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300 |")]
    assert len(row) == 1 and all(float(x) > 0 for x in row[0].split("|")[2:-1])


def test_forward_latency_refuses_sizes_past_what_a_run_holds(capsys):
    """--tokens 100000 used to build 100000 x 100000 masks and die of an allocation error minutes in."""
    for flag, value in (("--tokens", "1,100000"), ("--context", "100000")):
        with pytest.raises(SystemExit) as code:
            forward_latency.main([flag, value, "--device", "cpu"])
        assert code.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and "at most" in err, err


def test_forward_latency_beside_decode_steps_reports_the_whole_step_too(capsys):
    """--beside: the timed segment shares its step with decode steps, timed grouped and whole."""
    assert forward_latency.main(["--device", "cpu", "--tokens", "64", "--context", "256", "--beside", "8",
                                 "--beside-context", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 one-token decode steps at 32 cached tokens each" in out and "no attention groups" in out
    [row] = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert len(row.split("|")) == 9 and all(float(x.strip(" x")) > 0 for x in row.split("|")[2:-1])


@pytest.mark.parametrize("module", [step_overhead, engine_overhead])
def test_cuda_asked_on_a_machine_without_it_is_one_line(module, capsys):
    """`--device cuda` where torch has no CUDA: argparse's usage error naming the flag (exit 2), as
    forward_latency's; it was an AssertionError traceback from inside torch."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exited:
        module.main(["--device", "cuda"])
    assert exited.value.code == 2
    assert "argument --device: cuda: this machine has no CUDA device; use cpu" in capsys.readouterr().err


def test_bad_bench_arguments_are_one_usage_line(capsys):
    """A missing model directory, a regex that does not compile, a zero document size: argparse's usage
    error naming the flag (exit 2); each was a traceback (from the loader, the engine's grammar compile
    after the model loaded, or a row for a 0 MB document)."""
    import concurrency
    import lsp_document

    for module, argv, said in (
            (concurrency, ["--model", "/nonexistent"], "argument --model: /nonexistent: no config.json"),
            (engine_overhead, ["--regex", "["], "argument --regex: '[' does not compile"),
            (lsp_document, ["--mb", "1,0"], "argument --mb: expected numbers above 0, got 0")):
        with pytest.raises(SystemExit) as exited:
            module.main(argv)
        assert exited.value.code == 2 and said in capsys.readouterr().err, module.__name__


def test_concurrency_gen_length_the_engine_cannot_split_is_refused_before_the_model_loads(capsys):
    """--gen-length 8 on the shipped model (8 blocks of 8-token slots): the usage error names the multiples
    that work, before the model loads and the router calibrates (it came after, in the engine's words)."""
    import concurrency

    with pytest.raises(SystemExit) as exited:
        concurrency.main(["--gen-length", "8", "--levels", "1", "--rounds", "1", "--requests", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--gen-length 8: " in err and "use a multiple of 64" in err, err


def test_editor_latency_against_no_server_says_so(capsys):
    """--url where nothing listens: one line naming --url (it was a ConnectionRefusedError traceback)."""
    import socket

    import editor_latency

    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}/v1/editor"
        with pytest.raises(SystemExit) as exited:
            editor_latency.main(["--url", url, "--cases", "1", "--repeats", "1"])
    assert str(exited.value).startswith(f"--url {url}: no editor endpoint answered")
