"""What the LSP bridge spends per keystroke on a large document: an incremental edit (the document
splice and its lines) and the work before a completion is sent (cursor position, prefix and suffix).

An editor sends textDocument/didChange and, typing, textDocument/inlineCompletion for every keystroke;
both run on the bridge's one event loop, so their time is latency added to every completion. The
document is Python-shaped lines (62 characters each) of the given sizes; the edit inserts one character
in the middle, and the completion context is the bridge's defaults (256 lines above, 64 below).

    python bench/lsp_document.py                      # prints a markdown table
    python bench/lsp_document.py --mb 1,30 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsprotocol import types  # noqa: E402
from pygls.workspace import PositionCodec  # noqa: E402

from bench.bench_args import positive_floats, positive_int  # noqa: E402
from integrations.lsp.bridge_config import BridgeConfig  # noqa: E402
from integrations.lsp.documents import (LspTextDocument, clamp_position, cursor_context,  # noqa: E402
                                        position_at_offset)

LINE = "    result = compute(alpha, beta) + other_value  # comment here\n"


def measure(megabytes: float, repeats: int) -> dict:
    """Milliseconds per edit and per completion's context on a document of `megabytes` MB (medians)."""
    source = LINE * max(1, int(megabytes * 1_000_000) // len(LINE))
    doc = LspTextDocument("file:///bench.py", source=source, version=1,
                          sync_kind=types.TextDocumentSyncKind.Incremental,
                          position_codec=PositionCodec(types.PositionEncodingKind.Utf16))
    middle, config = len(doc.lines) // 2, BridgeConfig()
    edits, contexts = [], []
    for k in range(repeats):
        here = types.Position(middle, 10 + k)
        started = time.perf_counter()
        doc.apply_change(types.TextDocumentContentChangePartial(range=types.Range(here, here), text="x"))
        doc.lines  # noqa: B018 - what the next position lookup needs
        edits.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        offset = doc.offset_at_position(clamp_position(doc, here))
        position_at_offset(doc, offset)
        cursor_context(doc.source, offset, config.prefix_lines, config.suffix_lines)
        contexts.append((time.perf_counter() - started) * 1000)
    return {"mb": megabytes, "lines": len(doc.lines), "edit_ms": statistics.median(edits),
            "context_ms": statistics.median(contexts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=positive_floats, default=[0.1, 1, 10, 30], help="document sizes in MB, comma-separated")
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args(argv)
    print(f"{platform.machine()} CPU, Python {platform.python_version()}; medians of {args.repeats}\n")
    print("| document MB | lines | edit ms | completion context ms |")
    print("|---:|---:|---:|---:|")
    for megabytes in args.mb:
        row = measure(megabytes, args.repeats)
        print(f"| {row['mb']:g} | {row['lines']:,} | {row['edit_ms']:.2f} | {row['context_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
