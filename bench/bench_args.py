"""argparse value types the bench scripts share: a bad value is argparse's one-line usage error (exit 2)
naming the flag, not a traceback from deep inside the run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _whole_number(text, 1)


def count(text: str) -> int:
    """An integer >= 0."""
    return _whole_number(text, 0)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 ("1,8,32")."""
    return [positive_int(part) for part in text.split(",")]


def positive_float(text: str) -> float:
    """A finite number > 0 (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected numbers above 0, got {text}")
    return value


def positive_floats(text: str) -> list[float]:
    """A comma-separated list of finite numbers > 0 ("0.1,1,30")."""
    return [positive_float(part) for part in text.split(",")]


def model_dir(text: str) -> Path:
    """A model directory: one holding a config.json (the loader's own checks run later)."""
    path = Path(text)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no config.json there; pass a model directory "
                                         "(the shipped one is models/refusion-tiny-code)")
    return path


def writable_file(text: str) -> Path:
    """A file the run can write at its end (--json, --append): its folder exists and takes a new file, or
    the file exists and can be appended to; not a directory (integrations.batch_file.output_problem,
    which `refusion run-batch --output-file` uses). Checked when the flags are parsed, so a bad path is
    refused before the run, not after it (on a GPU: paid device time)."""
    from integrations.batch_file import output_problem

    if problem := output_problem(Path(text)):
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def append_section(path: Path | None, text: str) -> None:
    """Append `text` (a dated table or section) to the markdown file `path` (--append, checked by
    writable_file before the run), with a blank line before and after; nothing when `path` is None."""
    if path is not None:
        with Path(path).open("a") as out:
            out.write("\n" + text + "\n")


def serve_num_blocks(text: str) -> int:
    """KV blocks per engine replica of a served app (runner.num_blocks): at least what the replicas'
    start-up warm-up requests need (integrations.engine_host.check_runner_options, the serving config's
    own check), so a script that deploys on local Ray refuses it before Ray starts, not in a config
    traceback after."""
    from integrations.engine_host import check_runner_options

    value = positive_int(text)
    try:
        check_runner_options({"num_blocks": value})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def regex(text: str) -> str:
    """A regular expression llguidance compiles (the structured-output engine's syntax)."""
    from llguidance import LLMatcher

    from decoding.grammar import grammar_error

    problem = grammar_error(LLMatcher.grammar_from_regex(text))
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} does not compile: {problem}")
    return text


def at_most(limit: int, parse=positive_int):
    """`parse` (positive_int or positive_ints) whose value(s) may not exceed `limit`: a size past what a
    script's run can hold is a usage error, not an out-of-memory crash minutes later."""
    def bounded(text: str):
        value = parse(text)
        for v in value if isinstance(value, list) else [value]:
            if v > limit:
                raise argparse.ArgumentTypeError(f"expected at most {limit}, got {v}")
        return value

    return bounded


def check_gen_length(parser: argparse.ArgumentParser, flag: str, tokens: int, model: str | Path) -> None:
    """Exit with argparse's usage error naming `flag` when the engine would refuse gen_length `tokens` for
    the model directory `model`: it rounds the length up to whole slots and splits it into the model's
    serial_num_blocks equal blocks of whole slots (decoding.params.DecodeParams, with the model's
    refusion.json defaults), so only multiples of slot_size x serial_num_blocks work. Checked before
    the run, not a traceback from the first request minutes in."""
    from decoding.api import DecodeParamError
    from decoding.params import DecodeParams, load_model_defaults

    defaults = load_model_defaults(model)
    slot, blocks = defaults["slot_size"], defaults["serial_num_blocks"]
    try:
        DecodeParams(eos_token_id=0, mask_token_id=0, gen_length=tokens, slot_size=slot, serial_num_blocks=blocks)
    except DecodeParamError:
        step = slot * blocks
        parser.error(f"{flag} {tokens}: the engine decodes {Path(model).name}'s requests in {blocks} blocks of whole "
                     f"{slot}-token slots (its serial_num_blocks and slot_size), which {tokens} tokens do not split "
                     f"into; use a multiple of {step} ({step}, {2 * step}, ...)")


def context_problem(model: str | Path, tokens: int, flags: str) -> str | None:
    """What is wrong with `tokens` tokens in one sequence of the model directory `model`, which `flags`
    ask for ("--prompt-tokens 5000 + --tokens 32"), or None: more than the model's context (config.json
    max_position_embeddings, integrations.serve_config.model_context; nothing is checked where it cannot
    be read). Checked before the run: past it a run computed positions the model was never trained on,
    or tried to allocate for them (terabytes)."""
    from integrations.serve_config import model_context

    context = model_context(model)
    if context and tokens > context:
        return (f"{flags}: {tokens:,} tokens in one sequence, past {Path(model).name}'s context of {context:,} "
                f"tokens (config.json max_position_embeddings); ask for at most {context:,} in all")
    return None


def check_context(parser: argparse.ArgumentParser, model: str | Path, tokens: int, flags: str) -> None:
    """Exit with argparse's usage error when `context_problem` finds one."""
    if problem := context_problem(model, tokens, flags):
        parser.error(problem)


def torch_device(text: str) -> str:
    """A torch device this machine has: cpu, or cuda[:N] where CUDA is available."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: the bench scripts run on cpu or cuda")
    return text


def engine_log_to_stderr() -> None:
    """Send structlog's lines (the engine's log) to stderr for the rest of the process, so that a bench
    script's stdout holds its table or JSON alone (the engine logged a line per request there). For a
    script's `__main__` block; tests calling its main() keep their own logging."""
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
