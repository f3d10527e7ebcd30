"""A document's line endings and indent style, and the one conversion between it and the model's text.

The model was trained on files with LF line endings, indented with spaces. An editor's document may
use CRLF or tabs. The infill path (editor protocol, llama.cpp's /infill, `suffix` on /v1/completions)
converts the document to the model's form before it builds the prompt, and converts the completion
back, so that:
  - a CRLF document gets the same completion as its LF twin, with CRLF line breaks;
  - a tab-indented document gets the completion of its space-indented twin (MODEL_TAB_WIDTH spaces a
    tab), indented with tabs.
Only indentation is converted (tabs at the start of a line; runs of spaces at the start of a
completion line): tabs and spaces inside a line are text and stay as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Spaces per indent level in the model's text; Python code (PEP 8) and the training corpus use 4.
MODEL_TAB_WIDTH = 4

_LEADING_TABS = re.compile(r"^\t+", re.MULTILINE)
_LEADING_SPACES = re.compile(r"^ +", re.MULTILINE)
_INDENT_START = re.compile(r"^([ \t])", re.MULTILINE)


@dataclass(frozen=True)
class DocumentStyle:
    """How a document writes line breaks and indentation.

    line_ending: "\\r\\n" when the document's first line break is CRLF, else "\\n".
    tabs: the document indents with tabs (more of its indented lines start with a tab than a space).
    """

    line_ending: str = "\n"
    tabs: bool = False

    @classmethod
    def of(cls, *texts: str) -> "DocumentStyle":
        """The style of the document made of `texts` (e.g. prefix and suffix), judged on all of them."""
        text = "".join(texts)
        newline = text.find("\n")
        line_ending = "\r\n" if newline > 0 and text[newline - 1] == "\r" else "\n"
        starts = _INDENT_START.findall(text)
        return cls(line_ending, starts.count("\t") > starts.count(" "))

    def to_model(self, text: str) -> str:
        """Document text as the model reads it: LF line breaks (also for a mixed document), leading tabs
        as MODEL_TAB_WIDTH spaces each when the document indents with tabs."""
        text = text.replace("\r\n", "\n")
        if self.tabs:
            text = _LEADING_TABS.sub(lambda m: " " * (MODEL_TAB_WIDTH * len(m.group())), text)
        return text

    def to_document(self, text: str, *, at_indent: bool) -> str:
        """A completion (model text) in the document's style. at_indent: the cursor stands in the line's
        indentation at a tab stop (only tabs before it), so the completion's own leading spaces are
        indentation too; otherwise its first line is left as written."""
        if self.tabs:
            head, newline, rest = text.partition("\n")
            if at_indent:
                head = _tabs_for_spaces(head)
            text = head + newline + _tabs_for_spaces(rest)
        if self.line_ending != "\n":
            text = text.replace("\n", self.line_ending)
        return text


def _tabs_for_spaces(text: str) -> str:
    """Leading spaces of each line as tabs (MODEL_TAB_WIDTH a tab); a remainder stays spaces."""
    def indent(match: re.Match) -> str:
        levels, rest = divmod(len(match.group()), MODEL_TAB_WIDTH)
        return "\t" * levels + " " * rest

    return _LEADING_SPACES.sub(indent, text)


_OPEN_INDENT = re.compile(r"(?:^|\n) *$")  # a run of spaces (maybe empty) that starts the last line


class DocumentTextStream:
    """A completion streamed in pieces of model text, converted to the document's style piece by piece.

    DocumentStyle.to_document is line-local, so converting the text so far and sending what is new
    gives the same text as converting it whole, except while the last line is still nothing but
    spaces: how many tabs they make is known only when the line's text (or its end) arrives, so that
    run is held back. Used by /v1/completions without `suffix` (the infill path converts whole texts).
    """

    def __init__(self, style: DocumentStyle, *, at_indent: bool):
        self.style, self.at_indent = style, at_indent
        self._model = ""  # model text so far
        self._sent = 0  # characters of the converted text already returned

    def feed(self, text: str) -> str:
        """The newly final document text after `text` (model text) arrives."""
        self._model += text
        end = len(self._model)
        if self.style.tabs and (match := _OPEN_INDENT.search(self._model)):
            end = match.start() + (1 if self._model[match.start():match.start() + 1] == "\n" else 0)
        return self._release(self._model[:end])

    def finish(self) -> str:
        """Everything held back (the stream has ended)."""
        return self._release(self._model)

    def _release(self, model_text: str) -> str:
        converted = self.style.to_document(model_text, at_indent=self.at_indent)
        piece = converted[self._sent:]
        self._sent = max(self._sent, len(converted))
        return piece
