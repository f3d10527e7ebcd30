"""The model's text as the client reads it, for matching stop strings where the client's text has them.

The model writes LF line breaks and indents with spaces; an editor's document may break lines with
"\r\n" or "\r" and indent with tabs, and its completion comes back in that style
(integrations/editor/document.py). A stop string is in the client's style; the engine gets it with its
line breaks as "\n" where the document's are CRLF or CR (DocumentStyle.model_stops) and matches it on a
view of the model's text: each line's leading spaces as tabs for a tab-indented client (TabView), each
"\r\n" the model wrote as "\n" for a CRLF or CR one (CrlfView). A view is (view, at): the view's text
and, for each of its characters, where it starts in the model's text, plus where the view ends.
"""

from __future__ import annotations

import re

from scheduler.detokenizer import MODEL_TAB_WIDTH

_CRLF = re.compile("\r\n")


class TabView:
    """The model's text as a tab-indented client reads it (tabs_for_spaces; the first line's indent only
    with `first_line`: the client's cursor stood in its line's indentation), so that stop strings are
    matched where the client's text has them (GenerationRequest.tab_indent): "\t" at an indent level,
    never at four spaces inside a line, and "\n    " never (a client's line never starts so)."""

    def __init__(self, first_line: bool):
        self.first_line = first_line

    def view(self, text: str, start: int, final: bool) -> tuple[str, list[int]]:
        """(view, at): the view of text[base:], base the start of the line holding text[start], and at[v]
        the index in `text` where the view's v-th character starts (len(view) + 1 entries: the last is
        where the view ends). Unless `final`, the view stops before an open last line's leading spaces
        that do not make a whole tab yet (another space would turn them into one)."""
        base = text.rfind("\n", 0, start) + 1
        view, at, pos = [], [], base
        lines = text[base:].split("\n")
        for k, line in enumerate(lines):
            spaces = len(line) - len(line.lstrip(" ")) if k or base or self.first_line else 0
            tabs = spaces // MODEL_TAB_WIDTH
            view.append("\t" * tabs)
            at.extend(range(pos, pos + tabs * MODEL_TAB_WIDTH, MODEL_TAB_WIDTH))
            if k == len(lines) - 1 and spaces == len(line) and not final:  # (spaces only so far)
                at.append(pos + tabs * MODEL_TAB_WIDTH)
                return "".join(view), at
            rest = line[tabs * MODEL_TAB_WIDTH:] + ("\n" if k < len(lines) - 1 else "")  # (as it is)
            view.append(rest)
            at.extend(range(pos + tabs * MODEL_TAB_WIDTH, pos + tabs * MODEL_TAB_WIDTH + len(rest)))
            pos += len(line) + 1
        at.append(len(text))
        return "".join(view), at


class CrlfView:
    """The model's text as a CRLF or CR client reads it (GenerationRequest.crlf): a "\r\n" the model wrote is
    one line break of the document (DocumentStyle.to_document), so it reads as "\n", the form of the stop
    strings' line breaks (model_stops), and a stop string's cut falls before its "\r". A "\r" the text
    ends in waits (the view stops before it) unless `final`: a "\n" next would join it into a line break.
    A lone "\r" stays as the model wrote it, except for a CR-only client (`cr_only`, GenerationRequest.cr_only),
    whose line break it is: it reads as "\n" there. `tabs`: the tab view under it (a tab-indented client), or
    None."""

    def __init__(self, tabs: TabView | None, cr_only: bool = False):
        self.tabs = tabs
        self.cr_only = cr_only

    def view(self, text: str, start: int, final: bool) -> tuple[str, list[int]]:
        """(view, at) as TabView.view's, from `start` (or the tab view's base)."""
        if self.tabs is not None:
            shown, at = self.tabs.view(text, start, final)
        else:
            shown, at = text[start:], list(range(start, len(text) + 1))
        if "\r" not in shown:
            return shown, at
        joined = {m.start() + 1 for m in _CRLF.finditer(shown)}  # each pair's "\n": it reads from its "\r"
        at = [a for v, a in enumerate(at) if v not in joined]
        shown = shown.replace("\r\n", "\n")
        if shown.endswith("\r") and at[-1] == len(text) and not final:
            shown, at = shown[:-1], at[:-1]
        if self.cr_only:  # (one character for one: `at` holds)
            shown = shown.replace("\r", "\n")
        return shown, at


def client_view(tab_indent: bool, tab_indent_first_line: bool, crlf: bool,
                cr_only: bool = False) -> TabView | CrlfView | None:
    """The view a request's stop strings are matched on (GenerationRequest.tab_indent, .crlf, .cr_only); None:
    the model's text itself."""
    tabs = TabView(tab_indent_first_line) if tab_indent else None
    return CrlfView(tabs, cr_only) if crlf or cr_only else tabs
