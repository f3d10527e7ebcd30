"""Editor post-processing of a raw infill: the rules editors expect, as plain functions.

Applied in this order to the text generated so far (cumulative, so it also runs on partials):
  0. invalid bytes (the editor protocol only, `Rules.cut_invalid`): stop before the first U+FFFD,
     which the engine's text holds only where the model wrote bytes that are no UTF-8 (its detokenizer
     holds back a character still incomplete) or, at the end, where the text ended inside a character,
     so an editor never inserts one; a lone U+FFFD last is dropped without a cut (the completion goes
     on, or keeps the reason it ended for); off when the document holds U+FFFD itself (the model may
     copy it);
  1. single-line: when `multiline` is off, stop at the first newline after visible text
     (a completion that starts with a newline keeps that one newline and its next line, unless the
     cursor is mid-line: text follows it on its line, which a line break would split);
  2. indentation (llama.cpp `n_indent`): stop before the first new line whose indentation is
     smaller than `indent` (only lines with visible text count; a line is judged once it has some);
  3. suffix repeat: stop where the completion starts repeating the text after the cursor;
  4. trailing line breaks (final): when the text after the cursor starts with a line break, the
     completion's trailing line breaks and blank lines are dropped (the document has that line break;
     kept, they would insert a blank line). Partials never show them (a line with no visible text waits).
In a CRLF or CR document (`Rules.crlf`) the rules read each "\r\n" the model wrote as the one line break it
is (a "\r" last as unread, until the next character is known): a cut before it takes its "\r".

Each rule returns the kept text and whether it cut; a cut is final (more tokens cannot undo it),
so the caller may cancel generation at once. `final=True` enables the rules that only make sense
once generation has ended (tail repeat of the suffix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

# Stop reasons a rule reports (also the wire values of the final result's `stop_reason`).
CUT_NEWLINE = "newline"
CUT_INDENT = "indent"
CUT_SUFFIX = "suffix"
CUT_INVALID = "invalid"

REPLACEMENT = "\ufffd"  # what decoding puts where bytes are no UTF-8

# A suffix line this short ("}", ")", "end") is too common to prove a repeat on its own.
_SHORT_LINE = 4
# A partial repeat of the suffix at the end of the gap must be at least this many visible chars.
_TAIL_MIN = 4
_CRLF = re.compile("\r\n")


@dataclass(frozen=True)
class Rules:
    """What to apply. suffix: the document text after the cursor (as sent by the editor)."""

    suffix: str = ""
    multiline: bool = True
    indent: int = 0
    line_prefix: str = ""  # the cursor's line before the cursor (its brackets decide closing overlaps)
    # rule 0: on for the editor protocol (text goes straight into a document), off for /infill and
    # /v1/completions' suffix (llama.cpp and vLLM return the model's text, U+FFFD included), and off
    # whenever the document holds U+FFFD itself (InfillPrompt.holds_replacement)
    cut_invalid: bool = False
    # The document breaks lines with "\r\n" or "\r" (DocumentStyle.line_ending), where a "\r\n" the model
    # writes is one line break (DocumentStyle.to_document): a cut before a line break takes its "\r" too,
    # and a partial holds a "\r" last. Off (an LF document): a "\r" stays as the model wrote it.
    crlf: bool = False


@dataclass(frozen=True)
class Processed:
    text: str
    cut: str | None = None  # CUT_* when a rule ended the completion


def single_line(text: str, mid_line: bool = False) -> tuple[str, bool]:
    """Keep up to the first newline that follows visible text; with `mid_line` (the cursor has text
    after it on its line), up to the first newline at all: a single-line completion never splits the
    cursor's line."""
    seen_visible = mid_line
    for i, ch in enumerate(text):
        if ch == "\n" and seen_visible:
            return text[:i], True
        if not ch.isspace():
            seen_visible = True
    return text, False


def min_indent(text: str, indent: int) -> tuple[str, bool]:
    """Cut before the first line after the first whose indentation is below `indent`."""
    if indent <= 0:
        return text, False
    start = text.find("\n")
    while start != -1:
        line_end = text.find("\n", start + 1)
        line = text[start + 1 : line_end if line_end != -1 else len(text)]
        body = line.lstrip(" \t")
        if body and len(line) - len(body) < indent:
            return text[:start], True
        start = line_end
    return text, False


def _visible_lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def _suffix_anchor(suffix: str) -> list[str]:
    """The suffix lines (stripped, non-blank) that prove a repeat: the first one, plus the next
    while the anchor is shorter than _SHORT_LINE chars (so "}" alone never proves anything)."""
    lines = _visible_lines(suffix)
    anchor: list[str] = []
    for line in lines:
        anchor.append(line)
        if sum(len(x) for x in anchor) >= _SHORT_LINE:
            break
    return anchor


def trim_suffix_repeat(text: str, suffix: str, final: bool = False, line_prefix: str = "") -> tuple[str, bool]:
    """Cut `text` where it starts repeating `suffix`.

    Line rule (safe while streaming): a completion line (after the first) that equals the first
    visible suffix line, followed by lines equal to the rest of the anchor, is a repeat: cut at the
    newline before it. While streaming, the anchor must be complete; at the end, a match that runs
    into the end of the text counts too.
    Rest-of-line rule (final): when the cursor is mid-line, a first line ending with the rest of the
    cursor line repeats it: drop that part and everything after, unless the line's brackets (from
    `line_prefix`) need it (`_needs_its_closers`).
    Closing-overlap rule (final): a one-line completion ending with closing brackets and quotes that
    start the rest of the cursor line (an editor auto-closed them: `print(d['` + `a']` before `'])`)
    drops them when the line's brackets, from `line_prefix` through the rest of the line, then close
    everything they open and no more (`f(g(x` + `)` before `)` keeps its bracket).
    Tail rule (final): text ending with the start of the suffix (>= _TAIL_MIN visible chars) was cut
    by the gap's end in the middle of a repeat: drop that tail.
    """
    if not suffix.strip() or not text:
        return text, False
    lines = text.split("\n")
    anchor = _suffix_anchor(suffix)
    offsets = [0]
    for line in lines[:-1]:
        offsets.append(offsets[-1] + len(line) + 1)
    complete = len(lines) if final else len(lines) - 1  # the last line may still grow
    rest_of_line = _rest_of_cursor_line(suffix)
    # With the cursor mid-line, the first generated line continues that line: never a whole repeat.
    for k in range(1 if rest_of_line else 0, complete):
        if _anchor_matches(lines[k:complete], anchor, allow_partial=final):
            return text[: max(offsets[k] - 1, 0)], True
    if not final:
        return text, False
    first = lines[0].rstrip()
    if rest_of_line and first.endswith(rest_of_line) and not _needs_its_closers(line_prefix, first, rest_of_line):
        return first[: len(first) - len(rest_of_line)].rstrip(" \t"), True
    if rest_of_line and not any(line.strip() for line in lines[1:]):
        overlap = _closing_overlap(line_prefix, first, rest_of_line)
        if overlap:
            return first[: len(first) - overlap].rstrip(" \t"), True
    return _trim_tail(text, suffix)


_CLOSERS = frozenset(")]}'\"`")
_PAIRS = {")": "(", "]": "[", "}": "{"}


def _closing_overlap(line_prefix: str, first: str, rest_of_line: str) -> int:
    """How many closing characters at the end of `first` to drop: the longest run of closing brackets and
    quotes ending it that starts `rest_of_line` and whose dropping leaves the cursor line's brackets
    balanced where keeping it would leave a closer with no opener; 0 when none does."""
    if _brackets_balanced(line_prefix + first + rest_of_line):
        return 0  # kept, the line balances: nothing written twice
    for size in range(min(len(first), len(rest_of_line)), 0, -1):
        tail = first[-size:]
        if set(tail) <= _CLOSERS and rest_of_line.startswith(tail) and _brackets_balanced(
                line_prefix + first[:-size] + rest_of_line):
            return size
    return 0


def _needs_its_closers(line_prefix: str, first: str, rest_of_line: str) -> bool:
    """Whether a first line ending with the rest of the cursor line closes brackets of its own there:
    the line's brackets balance with it kept and not with that end dropped (`f(g(x` + `)` before `)`)."""
    return (_brackets_balanced(line_prefix + first + rest_of_line)
            and not _brackets_balanced(line_prefix + first[: len(first) - len(rest_of_line)] + rest_of_line))


def _brackets_balanced(line: str) -> bool:
    """Whether every closing bracket of `line` closes the bracket opened last and every one opened is
    closed (quotes are not read: a bracket inside a string literal counts)."""
    stack: list[str] = []
    for ch in line:
        if ch in "([{":
            stack.append(ch)
        elif ch in _PAIRS:
            if not stack or stack.pop() != _PAIRS[ch]:
                return False
    return not stack


def _anchor_matches(lines: list[str], anchor: list[str], allow_partial: bool) -> bool:
    visible = [line.strip() for line in lines if line.strip()]
    if not visible or visible[0] != anchor[0]:
        return False
    needed = anchor[: len(visible)] if allow_partial else anchor
    return visible[: len(needed)] == needed and (allow_partial or len(visible) >= len(anchor))


def _trim_tail(text: str, suffix: str) -> tuple[str, bool]:
    head = suffix.lstrip()
    for start in range(len(text)):
        tail = text[start:].lstrip()
        if len(tail.replace(" ", "").replace("\n", "")) < _TAIL_MIN:
            break
        if head.startswith(tail) and (start == 0 or text[start - 1].isspace() or not text[start].isalnum()):
            kept = text[:start].rstrip()
            return kept, True
    return text, False


def shown_partial(text: str, suffix: str, crlf: bool = False) -> str:
    """What a partial may show: only text that every way generation can go on keeps in the final result,
    so streamed text is always a prefix of the final one (a stream cannot take text back). Held back:
    a trailing line with no visible text yet; trailing lines that may still become a repeat of the
    suffix (line rule); an unfinished first line's end that may still become the rest of the cursor
    line (rest-of-line rule); an end that may still become the start of the suffix (tail rule); with
    `crlf` (Rules.crlf), a "\r" last, which a "\n" next makes a line break that a cut takes whole."""
    if not crlf:
        return _shown_partial(text, suffix)
    body = text[:-1] if text.endswith("\r") else text  # (a "\n" next would make it a line break: not read yet)
    return body[: _unfolded_length(body, len(_shown_partial(body.replace("\r\n", "\n"), suffix)))]


def _unfolded_length(raw: str, kept: int) -> int:
    """The length of the prefix of `raw` whose form with each "\r\n" as "\n" is `kept` characters long; a
    cut before such a "\n" falls before its "\r" (the rules keep a prefix of the text they are given)."""
    return kept + sum(1 for k, m in enumerate(_CRLF.finditer(raw)) if m.start() - k < kept)


def _shown_partial(text: str, suffix: str) -> str:
    cut = text.rfind("\n")
    if cut >= 0 and not text[cut + 1 :].strip():
        return _shown_partial(text[:cut], suffix)  # a new line with no visible text yet: wait
    anchor = _suffix_anchor(suffix)
    rest_of_line = _rest_of_cursor_line(suffix)
    lines = text.split("\n")
    start = 0
    for k, line in enumerate(lines):  # the earliest line from which the text may still be a repeat
        if k >= (1 if rest_of_line else 0) and _may_become_anchor(lines[k:], anchor):
            text = text[: max(start - 1, 0)]
            break
        start += len(line) + 1
    if rest_of_line:
        first, newline, after = text.partition("\n")
        if newline and first.rstrip().endswith(rest_of_line):
            return first.rstrip()[: len(first.rstrip()) - len(rest_of_line)].rstrip(" \t")
        if not newline:
            text = first[: _held_from(first, rest_of_line)].rstrip(" \t")
    head = suffix.lstrip()
    lo = max(len(text) - len(head), 0)  # a longer end cannot be a start of `head` (after its spaces)
    while 0 < lo < len(text) and text[lo - 1].isspace():
        lo -= 1
    for i in range(lo, len(text)) if head else ():
        if head.startswith(text[i:].lstrip()) and (i == 0 or text[i - 1].isspace() or not text[i].isalnum()):
            return text[:i].rstrip()
    return text


def _rest_of_cursor_line(suffix: str) -> str:
    """The visible text after the cursor on its line: the suffix up to its first line break (LF, CRLF or a
    lone CR: the suffix is in the document's own style), stripped."""
    return re.split(r"\r\n|\r|\n", suffix, maxsplit=1)[0].strip()


def _may_become_anchor(lines: list[str], anchor: list[str]) -> bool:
    """`lines` (the last one unfinished) may still grow into the anchor: every finished visible line is
    the anchor's next line, and the unfinished one a start of it."""
    if not anchor:
        return False
    visible = [line.strip() for line in lines[:-1] if line.strip()]
    last = lines[-1].strip()
    if not visible and not last or len(visible) + bool(last) > len(anchor):
        return False
    if visible != anchor[: len(visible)]:
        return False
    return not last or anchor[len(visible)].startswith(last)


def _held_from(line: str, rest_of_line: str) -> int:
    """Where an unfinished first line stops being safe to show: the start of its longest end that is a
    start of `rest_of_line` (len(line) when none)."""
    core = line.rstrip()
    for j in range(len(core)):
        if rest_of_line.startswith(core[j:]):
            return j
    return len(line)


def postprocess(raw: str, rules: Rules, final: bool = False) -> Processed:
    """Apply the invalid-bytes, single-line, indentation and suffix-repeat rules in that order (module
    docstring); a cut at a "\r\n" the model wrote in a CRLF or CR document takes it whole (Rules.crlf)."""
    if rules.crlf:  # the rules read each "\r\n" as the one line break it is; the text kept is a prefix of raw
        # (a "\n" next would make a "\r" last a line break: not read yet, unless a U+FFFD before it is cut anyway)
        pending = not final and raw.endswith("\r") and not (rules.cut_invalid and REPLACEMENT in raw)
        body = raw[:-1] if pending else raw
        kept = postprocess(body.replace("\r\n", "\n"), replace(rules, crlf=False), final)
        text = body[: _unfolded_length(body, len(kept.text))]
        return Processed(raw if pending and text == body and not kept.cut else text, kept.cut)
    text, cut = raw, None
    if rules.cut_invalid and REPLACEMENT in text:
        # Cut before the first. A lone U+FFFD at the very end may be a character the end or a token cap
        # cut short: dropped without a cut (the completion goes on, or keeps the reason it ended for,
        # `length`); a second one, or text after it, is bytes that are no UTF-8. So the label is a
        # function of the text, not of how its deltas arrived (helper-161)
        at = text.index(REPLACEMENT)
        text, cut = text[:at], CUT_INVALID if len(text) - at > 1 else None
    if not rules.multiline:
        text, did = single_line(text, mid_line=bool(_rest_of_cursor_line(rules.suffix)))
        cut = CUT_NEWLINE if did else cut
    text, did = min_indent(text, rules.indent)
    cut = CUT_INDENT if did else cut
    text, did = trim_suffix_repeat(text, rules.suffix, final=final, line_prefix=rules.line_prefix)
    cut = CUT_SUFFIX if did else cut
    if final and rules.suffix.startswith("\n"):
        body = text.rstrip()
        tail = text[len(body):]
        if "\n" in tail:  # spaces before the first dropped line break stay: a partial may have shown them
            text = body + tail[: tail.index("\n")]
    return Processed(text, cut)
