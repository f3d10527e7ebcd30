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


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--tokens", "0"), ("--prompt-tokens", "0"),
                                         ("--prompt-tokens", "-3")])
def test_prefix_wait_refuses_counts_below_one(flag, value, capsys):
    import prefix_wait

    refused(prefix_wait.main, [flag, value], f"argument {flag}: expected at least 1", capsys)


def test_prefix_wait_refuses_a_prompt_past_the_models_context(capsys):
    """--prompt-tokens 5000 ran past the shipped model's 4,096-token context."""
    import prefix_wait

    refused(prefix_wait.main, ["--prompt-tokens", "5000"], "--prompt-tokens 5000 + --tokens 32: 5,032 tokens in one "
            "sequence, past refusion-tiny-code's context of 4,096 tokens", capsys)
    refused(prefix_wait.main, ["--prompt-tokens", "4090", "--tokens", "1"], "4,098 tokens", capsys)  # whole slots


def test_context_problem_allows_the_whole_context():
    from bench.bench_args import context_problem

    shipped = REPO / "models" / "refusion-tiny-code"
    assert context_problem(shipped, 4096, "--x") is None
    assert context_problem(shipped, 4097, "--x 4097").startswith("--x 4097: 4,097 tokens in one sequence")


@pytest.mark.parametrize("flag, value, said", [
    ("--editors", "0", "expected at least 1"), ("--max-time-ms", "0", "expected at least 1"),
    ("--max-time-ms", "30001", "expected at most 30000"),
    ("--max-running", "-1", "expected at least 1"), ("--max-running", "0", "expected at least 1"),  # (0 was ignored)
    ("--batch-load", "-2", "expected at least 0"), ("--heavy", "-1", "expected at least 0"),
    ("--heavy-inflight", "0", "expected at least 1"), ("--heavy-inflight", "9", "expected at most 8")])
def test_editor_latency_refuses_counts_it_cannot_run(flag, value, said, capsys):
    import editor_latency

    refused(editor_latency.main, [flag, value], f"argument {flag}: {said}", capsys)


@pytest.mark.parametrize("argv, said", [
    (["--token-budget", "0"], "argument --token-budget: expected at least 1"),
    (["--token-budget", "-3"], "argument --token-budget: expected at least 1"),
    (["--params", "[1]"], "--params [1]: give a JSON object of decoding parameters"),
    (["--params", '{"temperature": -1}'], '--params {"temperature": -1}: temperature: must lie in [0, 100.0]'),
    (["--params", '{"temprature": 1}'], "temprature: is not a request parameter")])
def test_engine_overhead_refuses_a_budget_or_params_the_engine_would_not_take(argv, said, capsys):
    """The engine's own parsing of request params runs on --params before the run (it was a TypeError or
    InvalidRequestError traceback from the first request)."""
    import engine_overhead

    refused(engine_overhead.parse_args, argv, said, capsys)
    assert engine_overhead.parse_args(["--params", '{"frequency_penalty": 0.5}']).params == {"frequency_penalty": 0.5}


@pytest.mark.parametrize("flag, value, said", [("--vocabs", "abc", "expected a whole number, got 'abc'"),
                                               ("--vocabs", "64,0", "expected at least 1, got 0"),
                                               ("--rows", "-1", "expected at least 1, got -1")])
def test_logprobs_refuses_sizes_of_the_reads_part_before_any_part_runs(flag, value, said, capsys):
    import logprobs

    refused(logprobs.main, [flag, value, "--parts", "reads"], f"argument {flag}: {said}", capsys)


@pytest.mark.parametrize("argv, said", [
    (["--sizes", "1000,50"], "--sizes 50 with --prompt-blocks 100: the cache holds whole prompts only, 0 blocks"),
    (["--sizes", "63", "--prompt-blocks", "1"], "--sizes 63 with --prompt-blocks 1: the cache holds whole prompts only, "
                                                "63 blocks, fewer than the 64 evict(64) frees; use sizes of at least 64"),
    (["--sizes", "100", "--prompt-blocks", "60"], "use sizes of at least 120")])
def test_prefix_cache_refuses_a_cache_smaller_than_what_it_evicts(argv, said, capsys):
    """The full cache holds whole prompts: fewer than 64 cached blocks was an AssertionError from evict(64)."""
    import prefix_cache

    refused(prefix_cache.main, argv, said, capsys)


@pytest.mark.parametrize("value", ["0", "-1", "5", "1", "nan"])
def test_chat_card_refuses_a_heldout_fraction_outside_0_to_1(value, capsys):
    import chat_card

    refused(chat_card.main, ["--heldout-fraction", value], f"--heldout-fraction {float(value)}: give the fraction",
            capsys)


@pytest.mark.parametrize("argv, said", [
    (["--batch-tokens", "32", "--seq-len", "64"], "--batch-tokens 32: use at least --seq-len (64), one row"),
    (["--batch-tokens", "200000", "--seq-len", "100000"],
     "--seq-len: 100000 is longer than the --model model's context (max_position_embeddings 4096); give at most 4096")])
def test_train_throughput_refuses_a_batch_shape_it_cannot_train_before_the_model_loads(argv, said, capsys):
    """--batch-tokens below one row was the trainer's TrainingError traceback after the corpus was read;
    rows of 100,000 tokens on the 4,096-token model were killed for memory at 23 GB."""
    import train_throughput

    refused(train_throughput.main, argv, said, capsys)


@pytest.mark.parametrize("value", ["-5", "nan", "0", "inf", "abc"])
def test_a_bandwidth_that_is_no_positive_number_is_refused(value, capsys):
    """-5 or nan made a negative or nan floor and a silently wrong table; 0 silently measured instead."""
    import forward_latency
    import gpu_check

    for main in (forward_latency.main, gpu_check.parse_args):
        refused(main, ["--device", "cpu", "--bandwidth-gbs", value], "argument --bandwidth-gbs: expected numbers", capsys)


@pytest.mark.parametrize("flag, value, said", [
    ("--gen-length", "0", "argument --gen-length: expected at least 1"),
    ("--gen-length", "-32", "argument --gen-length: expected at least 1"),  # (both passed the multiple-of-32 check)
    ("--gen-length", "48", "--gen-length 48: use a multiple of 32"),
    ("--budget-s", "-1", "argument --budget-s: expected numbers above 0"),  # (it skipped every part, exit 0)
    ("--budget-s", "0", "argument --budget-s: expected numbers above 0"),
    ("--context", "-5", "argument --context: expected at least 1, got -5"),
    ("--long-context", "-1", "argument --long-context: expected at least 0"),
    ("--token-budget", "0", "argument --token-budget: expected at least 1")])
def test_gpu_check_refuses_lengths_and_budgets_it_cannot_run(flag, value, said, capsys):
    import gpu_check

    refused(gpu_check.parse_args, ["--device", "cpu", flag, value], said, capsys)


@pytest.mark.parametrize("blocks", ["1", "7"])
def test_concurrency_names_num_blocks_when_the_kv_cache_cannot_hold_one_request(blocks, capsys):
    """--gen-length 64 --num-blocks 1: the usage error blamed --gen-length and said "shorten the prompt" (the
    engine's words), after the model loaded; the longest short prompt (26 tokens) + 64 + one 8-token
    ReFusion block need 8 blocks of 16 by the engine's own admission rule."""
    import concurrency

    err = refused(concurrency.main, ["--gen-length", "64", "--num-blocks", blocks, "--levels", "1", "--rounds", "1"],
                  f"--num-blocks {blocks}: the engine's KV cache ({blocks} blocks of 16 tokens) cannot hold one "
                  "request: the longest prompt (26 tokens) + gen_length 64", capsys)
    assert "use --num-blocks 8 or more" in err and "--gen-length 64:" not in err and "shorten" not in err
