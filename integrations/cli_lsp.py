"""`refusion lsp`: the LSP bridge on stdio (inline completions from a running refusion-serve backend).

    refusion lsp --url ws://127.0.0.1:8000/v1/editor

The editor starts this command as its language server; see README "Editor setup". Exit codes: 0 after
the client's shutdown and exit, 1 for exit (or the end of input) without shutdown (LSP 3.17, "Exit
Notification") or a malformed LSP header, 2 for a bad flag, 130 on Ctrl-C (SIGINT; SIGTERM ends it too).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/editor",
                        help="the backend's editor WebSocket (default: %(default)s)")
    parser.add_argument("--api-key", help="API key, when the server requires one (default: env REFUSION_API_KEY)")
    parser.add_argument("--multiline", choices=("auto", "always", "never"), default="auto",
                        help="auto: multi-line only when nothing follows the cursor on its line")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens per completion")
    parser.add_argument("--max-time-ms", type=int, default=2000, help="time budget per completion (ms)")
    parser.add_argument("--prefix-lines", type=int, default=256, help="lines above the cursor to send")
    parser.add_argument("--suffix-lines", type=int, default=64, help="lines below the cursor to send")
    parser.add_argument("--log-file", default=None, help="write logs here (stdout carries the protocol)")


def api_key(flag: str | None, environ=os.environ) -> str | None:
    """The key to send: --api-key as typed, else env REFUSION_API_KEY stripped, a blank one read as unset
    (as the server reads it: auth.keys_from_env). A blank --api-key (`--api-key "$KEY"` with KEY unset)
    raises BridgeConfigError("api_key"): it was taken and no key was sent, as `refusion serve` refuses
    an empty --api-key."""
    from integrations.lsp.bridge_config import BridgeConfigError

    if flag is None:
        return environ.get("REFUSION_API_KEY", "").strip() or None
    if not flag.strip():
        raise BridgeConfigError("api_key", "is empty; give the key the server requires, or leave --api-key "
                                           "out to send env REFUSION_API_KEY's (or none)")
    return flag


def run(args: argparse.Namespace) -> int:
    from integrations.lsp.base_protocol import FramingError, serve_stdio
    from integrations.lsp.bridge_config import BridgeConfig, BridgeConfigError
    from integrations.lsp.server import build_server

    try:
        config = BridgeConfig(url=args.url, api_key=api_key(args.api_key), prefix_lines=args.prefix_lines,
                              suffix_lines=args.suffix_lines, multiline=args.multiline, max_tokens=args.max_tokens,
                              max_time_ms=args.max_time_ms)
        config.check()
    except BridgeConfigError as exc:  # as argparse reports a bad flag: prefixed, exit code 2
        print(f"refusion lsp: error: --{exc.field.replace('_', '-')} {exc.message}", file=sys.stderr)
        return 2
    if args.log_file:
        try:
            logging.basicConfig(handlers=[logging.FileHandler(args.log_file)], level=logging.INFO)
        except OSError as exc:
            print(f"refusion lsp: error: --log-file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        return serve_stdio(build_server(config))
    except FramingError as exc:  # the editor's LSP log shows stderr
        print(f"refusion lsp: error: {exc}; the message boundaries are lost", file=sys.stderr)
        return 1
