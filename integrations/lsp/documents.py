"""The LSP bridge's copy of the open documents and the text around a cursor: pygls documents split at
LSP's line breaks only (LspTextDocument, LspWorkspace), client positions clamped and mapped to offsets,
the prefix and suffix cut around the cursor, and the document as if the editor's selected item were in.
"""

from __future__ import annotations

import itertools
import logging
import re
from urllib.parse import unquote

from lsprotocol import types
from pygls.workspace import TextDocument, Workspace

from integrations.editor.document import LINE_BREAK

log = logging.getLogger(__name__)


# LSP's line breaks are "\n", "\r\n" and "\r" only (LSP 3.17, "Text Documents"). pygls splits lines
# with str.splitlines, which also breaks at form feeds, U+2028 and others: positions in a file with a
# form feed (common in Python, C and Lisp sources) then point into the wrong line, and incremental edits
# land there too, corrupting the bridge's copy of the document.
_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class LspTextDocument(TextDocument):
    """A pygls document whose lines end only at LSP's line breaks (see _LSP_LINE), and whose edits clamp
    positions as LSP says (`clamp_position`; pygls moved a character past the line's end one back, into
    the line, and counted the line break as part of the line)."""

    _lines_of: tuple = (None, ())  # (source, its lines): pygls reads `lines` for every edit and position
    version_went_back = False  # a didChange came with a lower version (LspWorkspace.update_text_document)

    @property
    def lines(self):
        source = self.source
        if self._lines_of[0] is not source:
            self._lines_of = (source, tuple(_LSP_LINE.findall(source)))
        return self._lines_of[1]

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        """Splice the edit into the source and re-split only the lines it touched. pygls rebuilt the whole
        document line by line for every edit, and `lines` then re-split all of it: 0.4 s a keystroke on a
        30 MB file (bench/lsp_document.py, docs/benchmarks.md)."""
        lines, text = self.lines, change.text
        start, end = clamp_position(self, change.range.start), clamp_position(self, change.range.end)
        if not lines:  # an empty document
            self._source = text
            return

        def server_position(position: types.Position) -> tuple[int, int]:
            """(line, character offset into it); the document's end after a final line break is the
            last line's end, line break included."""
            if position.line >= len(lines):
                return len(lines) - 1, len(lines[-1])
            return position.line, self._position_codec.position_from_client_units(lines, position).character

        first, last = sorted([server_position(start), server_position(end)])
        # One unchanged line of margin on each side: an inserted "\n" after a line ending in "\r" joins it
        # into one "\r\n" break, which a split of the touched lines alone would not see.
        low, high = max(0, first[0] - 1), min(len(lines), last[0] + 2)
        starts = list(itertools.accumulate(map(len, lines[low:high]), initial=sum(map(len, lines[:low]))))
        begin, finish = starts[first[0] - low] + first[1], starts[last[0] - low] + last[1]
        source = self.source
        edited = "".join((source[:begin], text, source[finish:]))
        region = edited[starts[0]:starts[-1] + len(text) - (finish - begin)]
        self._source = edited
        self._lines_of = (edited, lines[:low] + tuple(_LSP_LINE.findall(region)) + lines[high:])


class LspWorkspace(Workspace):
    """A pygls workspace of LspTextDocuments."""

    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None) -> TextDocument:
        return LspTextDocument(doc_uri, source=source, version=version, language_id=language_id,
                               sync_kind=self._sync_kind, position_codec=self.position_codec)

    def update_text_document(self, text_doc: types.VersionedTextDocumentIdentifier,
                             change: types.TextDocumentContentChangeEvent) -> None:
        """Apply a textDocument/didChange edit in the order it came, whatever its version. LSP 3.17 says a
        document's versions increase; one lower than the document's is a client's slip, not a late
        message (a connection delivers in order, and pygls applies didChange in order), and the edit was
        made on the editor's text as it is now: dropping it would put every later incremental edit at
        the wrong place, with no way to ask the editor for its text again. So the order of arrival wins,
        as in the editor protocol, which compares no versions (docs/editor-protocol.md); the going back
        is logged as a warning, once per opened document, for whoever reads the editor's LSP log."""
        doc = self._text_documents.get(unquote(text_doc.uri))
        if doc is not None and doc.version is not None and text_doc.version is not None \
                and text_doc.version < doc.version and not doc.version_went_back:
            doc.version_went_back = True
            log.warning("textDocument/didChange for %s has version %d, lower than the document's %d (LSP's "
                        "versions increase): applied in the order it came; the client's versions are not "
                        "to be relied on", text_doc.uri, text_doc.version, doc.version)
        super().update_text_document(text_doc, change)


def cursor_context(source: str, offset: int, prefix_lines: int, suffix_lines: int) -> tuple[str, str]:
    """(prefix, suffix) around a character offset: the cursor's line and at most `prefix_lines` lines
    above and `suffix_lines` below (LSP line breaks, kept as they are). Reads only the text near the
    cursor (a window that grows until it holds the lines), not the whole document."""
    window, start = max(4096, 128 * (prefix_lines + 1)), 0  # most code lines are shorter: one pass
    while True:
        low = max(0, offset - window)
        # ends of the line breaks before the cursor; a "\r\n" cut at `low` ends at the same place
        starts = [m.end() for m in LINE_BREAK.finditer(source, low, offset)]
        if len(starts) > prefix_lines:
            start = starts[-(prefix_lines + 1)]
            break
        if low == 0:
            break
        window *= 4
    ends = [m.start() for m in itertools.islice(LINE_BREAK.finditer(source, offset), suffix_lines + 1)]
    end = ends[suffix_lines] if len(ends) > suffix_lines else len(source)
    return source[start:offset], source[offset:end]


def position_at_offset(doc, offset: int) -> types.Position:
    """The client position (the negotiated encoding's units) of a character offset into doc.source. Not
    pygls's client_position_at_offset, which answers (last line + 1, 0) at the end of a document that
    does not end with a line break and fails on an empty one."""
    lines = doc.lines
    for number, line in enumerate(lines):
        if offset < len(line) or (number == len(lines) - 1 and not LINE_BREAK.search(line[-1:])):
            return types.Position(number, doc.position_codec.client_num_units(line[:offset]))
        offset -= len(line)
    return types.Position(len(lines), 0)


def clamp_position(doc, position: types.Position) -> types.Position:
    """A character past the end of its line means the line's end (LSP 3.17, Position: "If the character
    value is greater than the line length it defaults back to the line length"; the end-of-line
    characters do not count), and a line past the document's last means the document's end."""
    lines = doc.lines
    if position.line >= len(lines):
        return position_at_offset(doc, len(doc.source))
    text = lines[position.line].rstrip("\r\n")
    return types.Position(position.line, min(position.character, doc.position_codec.client_num_units(text)))


def with_selected_item(doc, selected: types.SelectedCompletionInfo,
                       offset: int) -> tuple[str, int, types.Range] | None:
    """(source, cursor offset, range to answer over) when the editor's suggest popup has an item selected
    (InlineCompletionContext.selectedCompletionInfo): the document as if the item's text replaced its
    range, the cursor after it, and that range. LSP 3.18: "If set, provided inline completions must
    extend the text of the selected item and use the same range, otherwise they are not shown as
    preview" (they were completed at the cursor, so VS Code dropped every one made with the popup open).
    None when the cursor is outside the range: no answer over that range continues the text at the
    cursor (one widened to take the cursor in deleted the text between them)."""
    start, end = sorted(doc.offset_at_position(clamp_position(doc, p)) for p in (selected.range.start, selected.range.end))
    if not start <= offset <= end:
        return None
    source = "".join((doc.source[:start], selected.text, doc.source[end:]))
    return source, start + len(selected.text), types.Range(start=position_at_offset(doc, start),
                                                           end=position_at_offset(doc, end))
