"""The model card's judgement of generated code (bench/model_card.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from model_card import agreement, parses  # noqa: E402

PROMPT = "def is_even(n):\n"


def test_a_finished_completion_must_close_the_unit():
    assert parses(PROMPT, "    return n % 2 == 0\n", ended=True)
    assert not parses(PROMPT, "    return 'b''\n", ended=True)  # unterminated string
    assert not parses(PROMPT, "    if n:\n", ended=True)  # block with no body


def test_an_unfinished_completion_is_judged_on_its_complete_lines():
    assert parses(PROMPT, "    x = n % 2\n    return x ==", ended=False)  # the partial last line is dropped
    assert not parses(PROMPT, "    x = (n %\n    return x", ended=False)
    assert not parses(PROMPT, "", ended=False)  # nothing: a def with no body


def test_a_chat_answer_cut_before_its_first_line_ends_is_not_valid_python():
    """A 256-token answer `    return self.......` cut by max_tokens left "" to judge, which ast parses:
    the card counted such garbage as valid Python."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from chat_card import valid_answer

    assert not valid_answer("    return self" + "." * 300, cut=True)
    assert valid_answer("def f(x):\n    return x\n", cut=False)
    assert valid_answer("def f(x):\n    return x\ndef g(", cut=True)  # judged on its complete lines
    assert not valid_answer("", cut=False) and not valid_answer("def f(:\n", cut=False)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "model_card: "),
    (["--set", "slot_size=abc"], "--set slot_size=abc: the value must be JSON"),
    (["--set", "=1"], "--set =1: use KEY=VALUE"),
    # before the model loads: it tried to allocate 156 TB (a traceback)
    (["--set", "gen_length=100000000"], "--set gen_length=100000000 beside held-out prompts of up to seq_len 256 "
                                        "tokens: 100,000,256 tokens in one sequence, past refusion-tiny-code's context "
                                        "of 4,096 tokens"),
])
def test_bad_inputs_are_one_line_and_exit_2(argv, message, capsys):
    from model_card import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as code:
        main(["--prompts", "0"])
    assert code.value.code == 2


def test_chat_card_has_a_command_line(capsys):
    """`python bench/chat_card.py --help` printed nothing (the module had no command line)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from chat_card import main

    with pytest.raises(SystemExit) as code:
        main(["--help"])
    assert code.value.code == 0 and "--requests" in capsys.readouterr().out
    with pytest.raises(SystemExit) as code:
        main(["--requests", "0"])
    assert code.value.code == 2 and "--requests must be at least 1" in capsys.readouterr().err


def test_agreement_counts_identical_outputs_and_matching_prefixes():
    eos = 0
    same, prefix = agreement([[5, 6, 0, 9], [5, 7]], [[5, 6, 0], [5, 6, 8, 9]], eos)
    assert same == 0.5 and prefix == (1.0 + 0.25) / 2


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped model is not in models/")
def test_the_shipped_model_writes_valid_python_on_heldout_prompts():
    """The card's claim at the shipped settings: most completions keep the held-out unit valid Python
    (measured 87.5% AR / 77% ReFusion on 256 prompts; asserted with a margin on 32)."""
    from model_card import measure

    row = measure(SHIPPED, 32, {}, skip_loss=True, chat_requests=0)
    assert row["prompts"] == 32
    assert row["ar_valid_python"] >= 0.7, row
    assert row["refusion_valid_python"] >= 0.6, row


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped model is not in models/")
def test_chat_rows_come_from_the_chat_endpoint_and_are_identical_on_two_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from chat_card import measure_chat

    first = measure_chat(SHIPPED, ["stdlib"], 0.03, n=2, modes=("ar",), max_tokens=96)  # (the card's 256: a minute more)
    assert first["chat_requests"] == first["tool_requests"] == 2
    assert all(0.0 <= first[f"ar_{k}"] <= 1.0 for k in ("chat_nonempty", "chat_valid_python", "tool_call_rate",
                                                       "forced_tool_call_rate", "forced_tool_call_exact"))
    assert first["ar_chat_example"]["request"].startswith("Write a Python function `")
    assert measure_chat(SHIPPED, ["stdlib"], 0.03, n=2, modes=("ar",), max_tokens=96) == first
    # ReFusion mode: the forced rows are AR's alone (the API refuses a forced call in ReFusion mode: the
    # card's one command failed with a 400 there)
    refusion = measure_chat(SHIPPED, ["stdlib"], 0.03, n=1, modes=("refusion",), max_tokens=96)
    assert 0.0 <= refusion["refusion_tool_call_rate"] <= 1.0 and "refusion_forced_tool_call_rate" not in refusion
