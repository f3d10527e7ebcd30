"""A document's line endings and indent style, and the one conversion between it and the model's text.

The model was trained on files with LF line endings, indented with spaces. An editor's document may
use CRLF or CR line breaks (LSP counts "\n", "\r\n" and "\r") or tabs. The infill path (editor
protocol, llama.cpp's /infill, `suffix` on /v1/completions) converts the document to the model's form
before it builds the prompt, and converts the completion back, so that:
  - a CRLF or CR document gets the same completion as its LF twin, with its own line breaks;
  - a tab-indented document gets the completion of its space-indented twin (MODEL_TAB_WIDTH spaces a
    tab), indented with tabs.
Only indentation is converted (tabs at the start of a line; runs of spaces at the start of a
completion line): tabs and spaces inside a line are text and stay as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scheduler.detokenizer import MODEL_TAB_WIDTH, tabs_for_spaces  # (the width: spaces a tab in the model's text)


_LEADING_TABS = re.compile(r"^\t+", re.MULTILINE)
_INDENT_START = re.compile(r"^([ \t])", re.MULTILINE)
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # LSP's line breaks (integrations/lsp/documents.py splits by them too)


@dataclass(frozen=True)
class DocumentStyle:
    """How a document writes line breaks and indentation.

    line_ending: the document's most common line break ("\\r\\n", "\\r" or "\\n"; the first one's
        on a tie); "\\n" when it has none.
    tabs: the document indents with tabs (more of its indented lines start with a tab than a space).
    """

    line_ending: str = "\n"
    tabs: bool = False

    @classmethod
    def of(cls, *texts: str) -> "DocumentStyle":
        """The style of the document made of `texts` (e.g. prefix and suffix), judged on all of them."""
        text = "".join(texts)
        breaks = LINE_BREAK.findall(text)
        # The most common line break (a stray one in a string or a pasted line does not decide); on a
        # tie the first one's.
        line_ending = max(dict.fromkeys(breaks), key=breaks.count) if breaks else "\n"
        starts = _INDENT_START.findall(LINE_BREAK.sub("\n", text))
        return cls(line_ending, starts.count("\t") > starts.count(" "))

    def to_model(self, text: str) -> str:
        """Document text as the model reads it: LF line breaks (also for a mixed document), leading tabs
        as MODEL_TAB_WIDTH spaces each when the document indents with tabs."""
        text = LINE_BREAK.sub("\n", text)
        if self.tabs:
            text = _LEADING_TABS.sub(lambda m: " " * (MODEL_TAB_WIDTH * len(m.group())), text)
        return text

    def model_stops(self, stops: list[str]) -> list[str]:
        """Stop strings as the engine matches them: line breaks to "\n" when the document's are CRLF or CR
        (an LF document's "\r\n" stop keeps its meaning: it never matches). Tabs stay: the engine
        matches the stops of a tab-indented document on the text with its indentation as tabs
        (GenerationRequest.tab_indent, which `engine_fields` sets), where the client's text has them."""
        return [LINE_BREAK.sub("\n", stop) if self.line_ending != "\n" else stop for stop in stops]

    def engine_fields(self, *, at_indent: bool) -> dict:
        """The GenerationRequest fields that match stop strings on the text in this style (model_stops):
        tab_indent when the document indents with tabs, tab_indent_first_line when the completion's first
        line is indentation too (at_indent, as to_document's), crlf when its line breaks are CRLF or CR (a
        "\r\n" the model writes is one line break there, as to_document makes it), cr_only when they are CR
        (a lone "\r" the model writes is one too: to_document leaves it as written)."""
        return {"tab_indent": self.tabs, "tab_indent_first_line": self.tabs and at_indent,
                "crlf": self.line_ending != "\n", "cr_only": self.line_ending == "\r"}

    def client_stop(self, stops: list[str], word: str) -> str:
        """The client's stop string (one of `stops`) whose model form (model_stops) is `word`, the string
        the engine reports it matched (Delta.stats["stop_word"]); `word` when none is."""
        return next((stop for stop in stops if self.model_stops([stop]) == [word]), word)

    def to_document(self, text: str, *, at_indent: bool) -> str:
        """A completion (model text) in the document's style. at_indent: the cursor stands in the line's
        indentation at a tab stop (only tabs before it), so the completion's own leading spaces are
        indentation too; otherwise its first line is left as written. In a CRLF or CR document a "\r\n"
        the model wrote is one line break too (it became "\r\r\n"); a lone "\r" stays as written."""
        if self.tabs:
            head, newline, rest = text.partition("\n")
            if at_indent:
                head = tabs_for_spaces(head)
            text = head + newline + tabs_for_spaces(rest)
        if self.line_ending != "\n":  # (a text cut after its "\r" converts to a prefix of the whole's)
            text = text.replace("\r\n", "\n").replace("\n", self.line_ending)
        return text


def cursor_at_indent(prefix: str) -> bool:
    """Whether the cursor after `prefix` stands in its line's indentation at a tab stop (only tabs
    before it on the line): DocumentStyle.to_document's at_indent."""
    return not prefix[max(prefix.rfind("\n"), prefix.rfind("\r")) + 1:].strip("\t")


class DocumentTextStream:
    """A completion streamed in pieces of model text, converted to the document's style piece by piece.

    DocumentStyle.to_document is line-local, so converting line by line gives the same text as
    converting the whole, and a line's converted start never changes once the line has a character
    that is not a space: only a line that is nothing but spaces so far is held back (how many tabs
    they make is known when its text or its end arrives). Each piece costs the length of the lines
    it touches. Used by /v1/completions without `suffix` (the infill paths convert whole texts).
    """

    def __init__(self, style: DocumentStyle, *, at_indent: bool):
        self.style = style
        self._at_indent = at_indent  # for the first line; later lines start at a line start
        self._line = ""  # model text of the open (last) line
        self._line_sent = 0  # characters of its conversion already returned

    def feed(self, text: str) -> str:
        """The newly final document text after `text` (model text) arrives."""
        *done, self._line = (self._line + text).split("\n")
        out = ""
        if done:  # the open line and the lines after it are complete up to their newline
            out = self._convert("\n".join(done) + "\n")[self._line_sent:]
            self._line_sent, self._at_indent = 0, True
        if not (self.style.tabs and not self._line.strip(" ")):
            out += self._release_line()
        return out

    def finish(self) -> str:
        """Everything held back (the stream has ended)."""
        return self._release_line()

    def _release_line(self) -> str:
        converted = self._convert(self._line)
        piece = converted[self._line_sent:]
        self._line_sent = max(self._line_sent, len(converted))
        return piece

    def _convert(self, text: str) -> str:
        return self.style.to_document(text, at_indent=self._at_indent)
