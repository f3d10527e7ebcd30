"""`refusion generate` on the random tiny model: text and JSON output, flags reach the decoder,
bad arguments give one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integrations.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run(capsys, *argv):
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_matches_a_direct_decode(tiny_model_dir, capsys):
    from decoding.loop import decode_batch
    from workers.session import RunnerSession
    from decoding.params import DecodeParams
    from decoding.refusion import RefusionDecoder
    from workers.runner import ModelRunner

    code, out, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt", "def add(a, b):", "--gen-length", "16",
                          "--slot-size", "4", "--blocks", "2", "--slot-threshold", "0.5", "--token-threshold", "0.2",
                          "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert {"text", "token_ids", "forwards", "tokens_per_forward", "elapsed_s"} <= set(result)
    runner = ModelRunner(tiny_model_dir)
    prompt_ids = runner.tokenizer("def add(a, b):")["input_ids"]
    params = DecodeParams(eos_token_id=runner.info.eos_token_id, mask_token_id=runner.info.mask_token_id,
                          gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.2)
    decoder = RefusionDecoder("x", prompt_ids, params)
    decode_batch(RunnerSession(runner), [decoder])
    assert result["token_ids"] == decoder.output_ids()
    assert result["forwards"] == decoder.stats.forwards
    assert result["text"] == runner.tokenizer.decode(decoder.output_ids(), skip_special_tokens=True)
    assert result["prompt_tokens"] == len(prompt_ids)
    assert result["tokens_per_forward"] == pytest.approx(len(result["token_ids"]) / result["forwards"], abs=1e-3)
    assert runner.info.eos_token_id not in result["token_ids"]


def test_a_short_gen_length_without_blocks_takes_a_block_count_that_fits(tiny_model_dir, capsys):
    """`--gen-length 16` on a model whose card says 4 blocks of slot 8 (16/4 = 4, not whole slots) used to
    fail (the tiny model has no refusion.json: the serving defaults apply); as on the API, the block count shrinks to one that fits (2), while an explicit --blocks is kept."""
    code, out, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt", "def add(a, b):\n    ",
                          "--gen-length", "16", "--slot-size", "8", "--json")
    assert code == 0 and err == "", err
    result = json.loads(out)
    assert result["params"]["serial_num_blocks"] == 2 and len(result["token_ids"]) <= 16
    code, _, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt", "x", "--gen-length", "16",
                        "--slot-size", "8", "--blocks", "4")
    assert code != 0 and "--blocks" in err


def test_sampling_without_a_seed_is_fresh_and_a_seed_repeats(tiny_model_dir, capsys):
    # Issue 14 item 2 on the CLI: as the API, no --seed means a fresh random seed (reported in --json).
    argv = ["--model", str(tiny_model_dir), "--prompt", "def ", "--mode", "ar", "--gen-length", "8",
            "--temperature", "1.0", "--json"]
    fresh = [json.loads(_run(capsys, *argv)[1]) for _ in range(2)]
    assert fresh[0]["params"]["seed"] != fresh[1]["params"]["seed"]
    again = [json.loads(_run(capsys, *argv, "--seed", str(fresh[0]["params"]["seed"]))[1]) for _ in range(2)]
    assert again[0]["token_ids"] == again[1]["token_ids"] == fresh[0]["token_ids"]


def test_a_negative_seed_is_read_as_the_api_reads_it(tiny_model_dir, capsys):
    # The OpenAI routes take any signed 64-bit seed, a negative one as itself + 2^63 (as vLLM): the same
    # request seeded -5 there repeats here with --seed -5 (it was refused: "must lie in 0..2^63-1")
    argv = ["--model", str(tiny_model_dir), "--prompt", "def ", "--mode", "ar", "--gen-length", "8",
            "--temperature", "1.0", "--json"]
    negative = json.loads(_run(capsys, *argv, "--seed", "-5")[1])
    mapped = json.loads(_run(capsys, *argv, "--seed", str(2**63 - 5))[1])
    assert negative["params"]["seed"] == 2**63 - 5 and negative["token_ids"] == mapped["token_ids"]
    for outside in (-(2**63) - 1, 2**63):
        code, _, err = _run(capsys, *argv, "--seed", str(outside))
        assert code == 2 and "--seed: got" in err and "use a signed 64-bit integer" in err, err


def test_penalties_and_min_p_reach_the_decoder(tiny_model_dir, capsys):
    argv = ["--model", str(tiny_model_dir), "--prompt", "def ", "--mode", "ar", "--gen-length", "16", "--json"]
    plain = json.loads(_run(capsys, *argv)[1])
    penalized = json.loads(_run(capsys, *argv, "--frequency-penalty", "2", "--presence-penalty", "1")[1])
    assert penalized["params"]["frequency_penalty"] == 2.0 and penalized["params"]["presence_penalty"] == 1.0
    assert len(set(penalized["token_ids"])) > len(set(plain["token_ids"]))  # the random model repeats itself less
    greedy_like = json.loads(_run(capsys, *argv, "--temperature", "1.5", "--min-p", "1", "--seed", "3")[1])
    assert greedy_like["token_ids"] == plain["token_ids"]  # min_p 1 keeps only the most likely token


def test_plain_output_is_the_completion_text_and_ar_mode_works(tiny_model_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("import os\n")
    code, out, _ = _run(capsys, "--model", str(tiny_model_dir), "--prompt-file", str(prompt_file), "--mode", "ar",
                        "--gen-length", "8", "--slot-size", "4", "--blocks", "1", "--json")
    result = json.loads(out)
    assert code == 0 and result["mode"] == "ar" and result["forwards"] == len(result["token_ids"]) == 8
    code, out, _ = _run(capsys, "--model", str(tiny_model_dir), "--prompt-file", str(prompt_file), "--mode", "ar",
                        "--gen-length", "8", "--slot-size", "4", "--blocks", "1")
    assert code == 0 and out == result["text"] + "\n"


def test_generation_config_end_tokens_end_the_text(tmp_path, capsys):
    """A second end token (generation_config.json's eos_token_id list) ends `generate`'s text as the
    engine's: the greedy text stops right before the first token of it that is made an end token."""
    import shutil

    args = ("--prompt", "def fib(n):\n", "--mode", "ar", "--gen-length", "8", "--slot-size", "4", "--blocks", "1", "--json")
    shipped = REPO / "models" / "refusion-tiny-code"
    code, out, _ = _run(capsys, "--model", str(shipped), *args)
    free = json.loads(out)["token_ids"]
    model = Path(shutil.copytree(shipped, tmp_path / "model"))
    end = free[2]
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))
    code, out, _ = _run(capsys, "--model", str(model), *args)
    assert code == 0 and json.loads(out)["token_ids"] == free[: free.index(end)]


def test_ar_mode_decodes_the_gen_length_asked_and_takes_one_that_fits_the_context_exactly(tiny_model_dir, tmp_path, capsys):
    # --mode ar rounded --gen-length up to the model's slot (8) and refused a length that fits, quoting
    # the rounded one ("4096 tokens after a 4-token prompt exceed ... use at most 4092" for 4092)
    from workers.runner import ModelRunner

    code, out, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "ar", "--gen-length", "7",
                          "--json")
    assert code == 0 and err == "" and json.loads(out)["params"]["gen_length"] == 7
    tokenizer = ModelRunner(tiny_model_dir).tokenizer
    text = "x = 1\n" * 1000
    while len(tokenizer(text)["input_ids"]) > 4089:
        text = text[: -len("x = 1\n")]
    room = 4096 - len(tokenizer(text)["input_ids"])
    if room % 8 == 0:  # (a length the slot would not round)
        text = text[: -len("x = 1\n")]
        room = 4096 - len(tokenizer(text)["input_ids"])
    assert room % 8
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(text)
    code, out, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt-file", str(prompt), "--mode", "ar",
                          "--gen-length", str(room), "--temperature", "0", "--json")
    assert code == 0 and err == "", err
    assert json.loads(out)["params"]["gen_length"] == room


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "x", "--gen-length", "64", "--slot-size", "8", "--blocks", "3"], "--blocks"),
        (["--prompt", "x", "--slot-threshold", "2"], "--slot-threshold"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--temperature", "hot"], "--temperature"),
        (["--prompt", "x", "--mode", "fast"], "--mode"),
        (["--prompt", "x", "--prompt-file", "f"], "--prompt-file"),
        ([], "--prompt"),
        (["--prompt", ""], "--prompt"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
        (["--prompt", "x", "--dtype", "int8"], "--dtype"),
        (["--prompt", "x", "--slot-size", "0"], "--slot-size"),  # was a ZeroDivisionError traceback
        (["--prompt", "x", "--mode", "ar", "--slot-size", "0"], "--slot-size"),
        (["--prompt", "x", "--gen-length", "5000"], "--gen-length"),  # past the 4,096-token context
        (["--prompt", "x", "--mode", "ar", "--gen-length", "100000"], "--gen-length"),  # was an out-of-memory traceback
        (["--prompt", "x", "--gen-length", "64", "--slot-size", "5000"], "--slot-size"),  # rounds 64 up to 5,000
        (["--prompt", "x", "--min-p", "1.5"], "--min-p"),
        (["--prompt", "x", "--mode", "ar", "--presence-penalty", "3"], "--presence-penalty"),
        (["--prompt", "x", "--frequency-penalty", "1"], "--frequency-penalty"),  # ReFusion: needs --mode ar
        # A prompt past the context names itself, not the decode flags ("--slot-size: use at most 1")
        (["--prompt", "x = 1\n" * 3000], "--prompt: "),
        (["--prompt", "x = 1\n" * 3000, "--mode", "ar"], "shorten the prompt to at most 4095 tokens"),
        # the largest gen_length that fits once rounded up to whole slots (it suggested the 4095 asked for)
        (["--prompt", "x", "--gen-length", "4095", "--slot-size", "8"], "use at most 4088 (ReFusion decodes whole"),
        (["--prompt", "x", "--mode", "ar", "--gen-length", "4096"], "use at most 4095"),
        # the path once, with the reason (it was repeated in the OSError's own text)
        (["--prompt-file", "/nonexistent/p.txt"], "--prompt-file: cannot read /nonexistent/p.txt: No such file or directory"),
        # an undecodable argv byte (a lone surrogate, PEP 383) was the tokenizer's TypeError traceback
        (["--prompt", "def f():\n\udcff"], "--prompt: is not UTF-8 text"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_non_zero(tiny_model_dir, capsys, argv, needle):
    try:
        code = main(["generate", "--model", str(tiny_model_dir), *argv])
    except SystemExit as exc:  # argparse-level errors exit from the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err


def test_ctrl_c_is_one_line_and_exit_130(tiny_model_dir, capsys, monkeypatch):
    """Ctrl-C while the model loads or decodes was a KeyboardInterrupt traceback (the process died of
    SIGINT); the CLI catches what a subcommand does not handle itself."""
    from integrations import cli_generate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "generate", interrupted)
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x"])
    assert code == 130 and capsys.readouterr().err == "refusion generate: interrupted\n"


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    code, out, err = _run(capsys, "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and out == "" and err.count("\n") == 1 and "does not exist" in err and "--model" in err


def test_an_empty_model_flag_is_refused_by_every_command(tmp_path, capsys):
    """`--model ""` (an unset variable in a script) ran the shipped model without a word in generate,
    run-batch and serve (helper-186): one line naming --model."""
    import argparse
    import asyncio

    from integrations import cli_batch, cli_serve
    from integrations.batch_file import BatchArgumentError

    code = main(["generate", "--model", "", "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("refusion generate: error: --model: is empty; give a model directory, or leave "
                                 "--model out for the shipped model\n"), err
    # run-batch's own check (its main() points the process's structlog at this test's captured stderr)
    (tmp_path / "in.jsonl").write_text("")
    parser = argparse.ArgumentParser()
    cli_batch.add_arguments(parser)
    args = parser.parse_args(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--model", ""])
    with pytest.raises(BatchArgumentError, match="^--model: is empty; give a model directory"):
        asyncio.run(cli_batch.run_batch(args))
    assert not (tmp_path / "out.jsonl").exists()
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    with pytest.raises(cli_serve.CLIError, match="^--model: is empty; give a model directory"):
        cli_serve.merged_config(parser.parse_args(["--model", " "]))


def test_an_unknown_flag_is_reported_by_the_subcommand(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == "refusion generate: error: unrecognized arguments: --bogus\n"


@pytest.mark.parametrize("argv", [["generate", "--prompt=--"], ["train", "--out", "unused", "--lr=--"],
                                  ["serve", "--port=--"]])
def test_a_flag_written_with_double_dash_as_its_value_is_a_usage_error(argv, capsys):
    # Python 3.11's argparse hands `--flag=--` an empty list; train's --lr check was a TypeError traceback
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    flag = argv[-1].split("=")[0]
    assert exc.value.code == 2 and f"refusion {argv[0]}: error: argument {flag}: expected one value" in err, err


def test_a_file_given_as_the_model_is_named_as_such(tmp_path, capsys):
    (tmp_path / "README.md").write_text("not a model")
    code, _, err = _run(capsys, "--model", str(tmp_path / "README.md"), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "is a file, not a model directory" in err


def test_directory_that_is_not_a_model_is_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "--model", str(tmp_path), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "--model" in err and "config.json" in err


def _damaged_copy(model_dir, tmp_path, name, content) -> str:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    target = copy / name
    if callable(content):
        content(target)
    else:
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(copy)


def _config_with(**changes):
    def write(path):
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, **changes}))
    return write


@pytest.mark.parametrize("name, content, needle", [
    ("model.safetensors", b"", "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable safetensors"),
    ("model.safetensors", (2**40).to_bytes(8, "little") + b"{}", "not a readable safetensors"),
    ("config.json", "[]", "config.json: must hold a JSON object"),
    ("config.json", _config_with(hidden_size="abc"), "config.json: hidden_size is 'abc'; it must be an integer"),
    ("config.json", _config_with(eos_token_id=[]), "config.json: no eos_token_id"),
    ("config.json", _config_with(rms_norm_eps="abc"), "config.json: a value has the wrong type"),
    ("config.json", _config_with(num_hidden_layers=-2), "num_hidden_layers is -2; it must be a positive integer"),
    ("config.json", _config_with(max_position_embeddings=-1), "max_position_embeddings is -1"),
    ("config.json", _config_with(max_position_embeddings="big"), "max_position_embeddings is 'big'"),
    # transformers' tokenizer loading failed on it: "tokenizer.json: cannot be loaded (AttributeError ...)"
    ("config.json", _config_with(dtype="float7"), "config.json: dtype is 'float7'; give a torch dtype's name"),
    ("config.json", _config_with(torch_dtype=16), "config.json: torch_dtype is 16; give a torch dtype's name"),
    ("config.json", _config_with(dtype="auto"), "config.json: dtype is 'auto'; give a torch dtype's name"),
    ("tokenizer.json", '{"garbage": 1}', "tokenizer.json: cannot be loaded"),
    ("refusion.json", '{"slot_size": -4}', "refusion.json: slot_size: "),
    # the file itself (a key it may not hold, not an object, not JSON) was prefixed "refusion.json:", not --model
    ("refusion.json", '{"bogus": 1}', "refusion.json: unknown key 'bogus'"),
    ("refusion.json", '{"seed": 1}', "refusion.json: 'seed' in "),
    ("refusion.json", "[1]", "refusion.json: "),
    ("refusion.json", "{not json", "refusion.json: cannot read "),
])
def test_a_damaged_model_directory_is_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys, name, content, needle):
    """A truncated or foreign safetensors file, a config.json of the wrong shape or types, a tokenizer.json
    of the wrong structure: one line naming the file, not a library traceback; a bad setting of the
    model's refusion.json is named there, not as a flag the user never passed (a break-test)."""
    model = _damaged_copy(tiny_model_dir, tmp_path, name, content)
    code, out, err = _run(capsys, "--model", model, "--prompt", "x")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("refusion generate: error: --model: ") and needle in err, err


def test_prompt_file_dash_reads_standard_input(tiny_model_dir, capsys, monkeypatch):
    """`--prompt-file -` said "cannot read -: No such file" (run-batch takes `-` for standard input)."""
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"def add(a, b):\n")))
    flags = ("--model", str(tiny_model_dir), "--mode", "ar", "--gen-length", "4", "--json")
    code, piped, _ = _run(capsys, "--prompt-file", "-", *flags)
    direct_code, direct, _ = _run(capsys, "--prompt", "def add(a, b):\n", *flags)
    assert code == direct_code == 0
    assert json.loads(piped)["prompt_tokens"] == json.loads(direct)["prompt_tokens"] > 0
    assert json.loads(piped)["token_ids"] == json.loads(direct)["token_ids"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, _, err = _run(capsys, "--prompt-file", "-", *flags)
    assert code == 2 and "--prompt-file: is empty" in err, err  # the flag given (it said --prompt)


def test_a_prompt_file_past_the_bound_is_refused_unread(capsys, tiny_model_dir):
    """/dev/zero (or any endless file) is read up to 64 MiB, then refused (it grew to 24 GB and the
    kernel killed it)."""
    code, _, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt-file", "/dev/zero")
    assert code == 2 and "--prompt-file: /dev/zero is larger than 64 MiB" in err


def test_entry_point_in_a_subprocess(tiny_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(
        [sys.executable, "-m", "integrations.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "class A:",
         "--gen-length", "8", "--slot-size", "4", "--blocks", "2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) <= 8
    bad = subprocess.run(
        [sys.executable, "-m", "integrations.cli", "generate", "--prompt", "x", "--top-k", "many"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1 and "--top-k" in bad.stderr


@pytest.mark.skipif(not (REPO / "models" / "refusion-tiny-code" / "config.json").is_file(),
                    reason="the shipped model is not in models/ yet")
def test_default_model_is_the_shipped_one(capsys):
    code, out, err = _run(capsys, "--prompt", "def add(a, b):\n", "--json")  # the model's own defaults
    assert code == 0, err
    result = json.loads(out)
    assert 0 < len(result["token_ids"]) <= result["params"]["gen_length"] and result["forwards"] >= 1


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_sigterm_while_the_command_loads_is_an_interrupt_not_a_silent_kill(command, tiny_model_dir):
    """Importing a subcommand (torch, Ray) takes seconds before it sets its own handlers; a SIGTERM then
    killed `refusion` with status 143 and no word. The signal is sent as the subcommand's module is imported."""
    script = ("import importlib, os, signal, sys\n"
              "real = importlib.import_module\n"
              "def import_module(name, *args):\n"
              "    if name.startswith('integrations.cli_'):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(name, *args)\n"
              "importlib.import_module = import_module\n"
              "from integrations.cli import main\n"
              f"sys.argv = ['refusion', {command!r}, '--model', {str(tiny_model_dir)!r}]\n"
              "sys.exit(main())\n")
    # (as the server `refusion serve` runs under its supervisor, integrations/serve_supervisor.py, which
    # loads nothing: it forwards the signal to this process)
    env = {**os.environ, "REFUSION_SERVE_CHILD": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == f"refusion {command}: interrupted", done.stderr[-2000:]


def test_a_config_without_max_position_embeddings_has_transformers_default_context(tiny_model_dir, tmp_path, capsys):
    """A config.json that leaves max_position_embeddings out had no context at all: a 200,000-token
    --gen-length ran for 45 s and 7 GB, and serve and run-batch took any length (helper-186). It is
    transformers' Qwen3Config default, 32768, as transformers and vLLM read such a model."""
    from integrations.serve_config import model_context
    from workers.model_config import DEFAULT_CONTEXT

    def drop(path):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k != "max_position_embeddings"}))

    model = _damaged_copy(tiny_model_dir, tmp_path, "config.json", drop)
    assert model_context(model) == DEFAULT_CONTEXT == 32768
    code, _, err = _run(capsys, "--model", model, "--prompt", "x", "--mode", "ar", "--gen-length", "200000")
    assert code == 2 and "--gen-length: 200000 tokens after a 1-token prompt exceed the model's context of 32768" in err, err


def test_a_length_over_the_context_is_quoted_as_typed(tiny_model_dir, capsys):
    """ReFusion decodes whole slots, so --gen-length is rounded up to them; the refusal quoted the rounded
    length (4096 for a typed 4090, helper-248): it quotes the typed one, and the rounded one beside it."""
    from integrations.serve_config import model_context

    context = model_context(tiny_model_dir)
    asked = context - 2  # fits after a 1-token prompt; whole 8-token slots do not
    code, _, err = _run(capsys, "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "refusion", "--slot-size", "8",
                        "--gen-length", str(asked))
    assert code == 2 and err.startswith(f"refusion generate: error: --gen-length: {asked} tokens (") and (
        " in whole slots) after a 1-token prompt exceed the model's context" in err), err
