"""`refusion` command line: one subcommand per module, imported only when used (keeps start-up fast)."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# subcommand -> module that defines `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "generate": ("integrations.cli_generate", "Decode one prompt with ReFusion or AR and print the completion."),
    "train": ("integrations.cli_train", "Train or fine-tune a ReFusion model with the ReFusion objective."),
    "serve": ("integrations.cli_serve", "Start the Ray Serve application (OpenAI API, editor protocol)."),
    "lsp": ("integrations.cli_lsp", "Run the LSP bridge on stdio (inline completions from the backend)."),
    "run-batch": ("integrations.cli_batch", "Answer an OpenAI batch file (JSONL) offline on a local engine."),
}


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns its exit status (130 when Ctrl-C, or SIGTERM before the subcommand
    handles signals itself, stops it: a line, not a traceback)."""
    if argv is None:  # the `refusion` process itself
        from integrations import serve_supervisor

        if serve_supervisor.wanted(sys.argv[1:]):  # `serve` on a local Ray: supervisor + server in its own session
            return serve_supervisor.supervise(sys.argv[1:])
    if argv is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM as Ctrl-C until the subcommand sets its own handlers: importing it (torch, Ray) takes
        # seconds, in which SIGTERM killed the process with no word (status 143)
        signal.signal(signal.SIGTERM, _interrupt)
    supervised = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        if supervised:  # the server under the supervisor: signals held until now, taken here as an interrupt
            serve_supervisor.unblock_signals()
        return _run(argv)
    except KeyboardInterrupt:
        name = f"refusion {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "refusion"
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("refusion-serve")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "(not installed)"


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="refusion", description="refusion-serve: ReFusion serving backend.")
    parser.add_argument("--version", action="version", version=f"refusion-serve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if argv and argv[0] in SUBCOMMANDS:
        # Import only the chosen subcommand's module; others may pull heavy dependencies.
        chosen = {argv[0]: SUBCOMMANDS[argv[0]]}
    else:
        chosen = SUBCOMMANDS
    sub_parsers = {}
    for name, (module_name, help_text) in chosen.items():
        sub_parsers[name] = sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if len(chosen) == 1:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's own usage and name, not the top-level ones
        sub_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _refuse_emptied_values(sub_parsers[args.command], args)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


def _refuse_emptied_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming the flag when a one-value flag came back as [] (Python 3.11's argparse strips "--"
    from `--flag=--` and hands the flag an empty list, which the subcommand's checks then failed on with a
    TypeError traceback)."""
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if action.nargs is None and action.option_strings and getattr(args, action.dest, None) == []:
            parser.error(f"argument {action.option_strings[-1]}: expected one value, got none "
                         f"('--' is not read as a value; write the value itself)")


if __name__ == "__main__":
    sys.exit(main())
