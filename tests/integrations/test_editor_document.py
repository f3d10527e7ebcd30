"""Line endings and indentation of an editor's document (integrations/editor/document.py), and the
infill path's use of them: prompt in the model's text, completion in the document's (issue 14 items 5, 6).
The real app on the shipped model: test_serve_client_text.py."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from test_editor_fakes import FakeEngineClient, bpe_tokenizer  # noqa: F401 - fixture

from integrations.editor.document import DocumentStyle
from integrations.editor.infill import build_infill_prompt
from integrations.editor.postprocess import (CUT_INDENT, CUT_INVALID, CUT_NEWLINE, CUT_SUFFIX, Processed, Rules,
                                             postprocess, shown_partial)
from integrations.editor.runner import CompletionJob, run_completion

TAB_PREFIX = "def parse_args(argv):\n\tparser = argparse.ArgumentParser()\n\t"  # issue 14, item 6
TAB_SUFFIX = "\n\treturn parser.parse_args(argv)\n"


@pytest.mark.parametrize("texts, style", [
    (("a\r\nb",), DocumentStyle("\r\n", False)),
    (("a\nb\r\n",), DocumentStyle("\n", False)),  # a tie: the first line break decides
    (("10%\r20%\ndef f():\n    pass\n",), DocumentStyle("\n", False)),  # the most common one, not a stray CR
    (("a\rb\r\tc",), DocumentStyle("\r", True)),  # CR-only (LSP's third line break), tab-indented
    (("no line break",), DocumentStyle("\n", False)),
    ((TAB_PREFIX, TAB_SUFFIX), DocumentStyle("\n", True)),
    (("if x:\n    y\n\tz\n    w",), DocumentStyle("\n", False)),  # mostly spaces
    (("x = 1", "\r\nif y:\r\n\tz()"), DocumentStyle("\r\n", True)),  # judged on prefix and suffix together
])  # fmt: skip
def test_style_of_a_document(texts, style):
    assert DocumentStyle.of(*texts) == style


def test_to_model_converts_line_endings_and_leading_tabs_only():
    style = DocumentStyle("\r\n", True)
    assert style.to_model("if x:\r\n\tif y:\r\n\t\tz = 'a\tb'\r\n") == "if x:\n    if y:\n        z = 'a\tb'\n"
    assert DocumentStyle("\n", False).to_model("\tx\r\n") == "\tx\n"  # a space-indented document keeps its tabs


def test_to_document_round_trips_the_indentation():
    style = DocumentStyle("\r\n", True)
    model = "return x\n    y = 1\n        z = 2\n      w\n"
    assert style.to_document(model, at_indent=False) == "return x\r\n\ty = 1\r\n\t\tz = 2\r\n\t  w\r\n"
    assert style.to_document("    pass", at_indent=True) == "\tpass"  # the cursor stands at a tab stop
    assert style.to_document("  # note", at_indent=False) == "  # note"  # mid-line: spaces are text
    assert DocumentStyle().to_document("a\n    b", at_indent=True) == "a\n    b"


def test_a_crlf_the_model_wrote_is_one_line_break_of_the_document():
    # (to_document turned it into "\r\r\n": two line breaks for an editor)
    assert DocumentStyle("\r\n", True).to_document("a\r\n    b\r\n", at_indent=False) == "a\r\n\tb\r\n"
    assert DocumentStyle("\r", False).to_document("a\r\nb\nc", at_indent=False) == "a\rb\rc"
    assert DocumentStyle("\r\n", False).to_document("a\rb", at_indent=False) == "a\rb"  # a lone CR: as written
    assert DocumentStyle().to_document("a\r\nb", at_indent=False) == "a\r\nb"  # an LF document: as written


def test_prompt_of_a_crlf_or_tab_document_equals_its_lf_space_twin(bpe_tokenizer):  # noqa: F811
    lf = build_infill_prompt(bpe_tokenizer, TAB_PREFIX.replace("\t", "    "), TAB_SUFFIX.replace("\t", "    "))
    for prefix, suffix in ((TAB_PREFIX, TAB_SUFFIX),
                           (TAB_PREFIX.replace("\n", "\r\n"), TAB_SUFFIX.replace("\n", "\r\n")),
                           (TAB_PREFIX.replace("\n", "\r"), TAB_SUFFIX.replace("\n", "\r"))):
        doc = build_infill_prompt(bpe_tokenizer, prefix, suffix)
        assert (doc.prompt_ids, doc.suffix_ids, doc.healed) == (lf.prompt_ids, lf.suffix_ids, lf.healed)
        assert doc.style.tabs and doc.at_indent


async def _complete(client, prefix: str, suffix: str, partials: list[str]) -> str:
    job = CompletionJob("t", build_infill_prompt(client.tokenizer, prefix, suffix), (32,), Rules(suffix=suffix))

    async def on_partial(text: str, _token_ids: list[int]) -> None:
        partials.append(text)

    return (await run_completion(client, job, on_partial)).text


async def test_a_crlf_tab_document_gets_its_own_style_back_partials_included(bpe_tokenizer):  # noqa: F811
    # The model writes space indentation and LF, then repeats the suffix (trimmed as for an LF document).
    model_text = "    parser.add_argument('x')\n    if argv:\n        argv = list(argv)\n    return parser.parse_args(argv)\n"
    client = FakeEngineClient(bpe_tokenizer, default_text=model_text, delay_s=0)
    partials: list[str] = []
    text = await _complete(client, TAB_PREFIX.replace("\n", "\r\n"), TAB_SUFFIX.replace("\n", "\r\n"), partials)
    assert text == "parser.add_argument('x')\r\n\tif argv:\r\n\t\targv = list(argv)"
    assert partials and all(text.startswith(p) for p in partials)  # every partial a prefix of the result
    assert "\n" not in text.replace("\r\n", "")
    cr = await _complete(client, TAB_PREFIX.replace("\n", "\r"), TAB_SUFFIX.replace("\n", "\r"), [])
    assert cr == text.replace("\r\n", "\r")  # a CR-only document: the same completion with CR breaks


async def test_an_lf_space_document_is_left_as_the_model_wrote_it(bpe_tokenizer):  # noqa: F811
    client = FakeEngineClient(bpe_tokenizer, default_text="    x = 1\n    y = 2\n    return x\n", delay_s=0)
    text = await _complete(client, "def f():\n    ", "\n    return x\n", [])
    assert text == "x = 1\n    y = 2"


@pytest.mark.parametrize("style", [DocumentStyle("\r\n", True), DocumentStyle("\n", True), DocumentStyle("\r\n", False),
                                   DocumentStyle("\r", False)])
def test_a_streamed_completion_converts_to_the_same_text_as_the_whole(style):
    # /v1/completions without suffix streams model text piece by piece; cut anywhere (here: at random
    # points, fixed seed), the pieces joined must equal the whole text converted at once.
    from integrations.editor.document import DocumentTextStream

    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(["a", " ", "  ", "    ", "\n", "x = 1", "\t", "\r"]) for _ in range(rng.randint(0, 20)))
        at_indent = rng.random() < 0.5
        stream, out, i = DocumentTextStream(style, at_indent=at_indent), "", 0
        while i < len(text):
            j = rng.randint(i, len(text))
            out += stream.feed(text[i:j])
            i = j
        assert out + stream.finish() == style.to_document(text, at_indent=at_indent), repr(text)
    held = DocumentTextStream(DocumentStyle("\n", True), at_indent=False)
    assert held.feed("x = 1\n    ") == "x = 1\n"  # the open indentation waits for its line's text
    assert held.feed("    y") == "\t\ty"


def test_stop_strings_follow_the_document_and_keep_their_meaning_in_an_lf_one():
    assert DocumentStyle("\r\n", False).model_stops(["\r\n\r\n", "x"]) == ["\n\n", "x"]
    assert DocumentStyle().model_stops(["\r\n"]) == ["\r\n"]  # an LF document: "\r\n" is not "\n"
    # ... tab-indented too (it cut at every "\n" once); tabs stay: the engine matches them on the text with
    # its indentation as tabs (tab_indent), where converting them to spaces matched four spaces in a line
    assert DocumentStyle("\n", True).model_stops(["\r\n", "\r\n\tx", "\n\tpass"]) == ["\r\n", "\r\n\tx", "\n\tpass"]
    assert DocumentStyle("\r\n", True).model_stops(["\r\n\tx"]) == ["\n\tx"]
    assert DocumentStyle("\r", False).model_stops(["\t\r"]) == ["\t\n"]
    assert DocumentStyle("\n", True).engine_fields(at_indent=True) == {
        "tab_indent": True, "tab_indent_first_line": True, "crlf": False, "cr_only": False}
    assert DocumentStyle("\n", True).engine_fields(at_indent=False)["tab_indent_first_line"] is False
    assert DocumentStyle("\r\n", False).engine_fields(at_indent=True) == {
        "tab_indent": False, "tab_indent_first_line": False, "crlf": True, "cr_only": False}
    # the engine reads the model's "\r\n" as one line break of a CRLF or CR document (GenerationRequest.crlf),
    # and a lone "\r" as one of a CR-only document (GenerationRequest.cr_only)
    assert DocumentStyle("\r", True).engine_fields(at_indent=False)["crlf"] is True
    assert DocumentStyle("\r", True).engine_fields(at_indent=False)["cr_only"] is True
    assert DocumentStyle("\n", True).engine_fields(at_indent=False)["crlf"] is False


def test_the_client_gets_its_own_stop_string_back():
    """llama.cpp's stopping_word is the request's string; the engine reports the model's form."""
    style = DocumentStyle("\r\n", True)
    assert style.client_stop(["x", "\r\n\t"], "\n\t") == "\r\n\t"
    assert style.client_stop(["x"], "y") == "y"  # none matches: the engine's word as it is


CRLF_PREFIX, CRLF_SUFFIX = "def f():\r\n    x = ", "\r\n    return x\r\n"


@pytest.mark.parametrize("raw, rules, expected", [
    ("1\r\ny = 2", Rules(multiline=False), Processed("1", CUT_NEWLINE)),  # single-line
    ("1\r\n    y = 2\r\nz = 3", Rules(indent=4), Processed("1\r\n    y = 2", CUT_INDENT)),  # n_indent
    ("1\r\nreturn x\r\n", Rules(suffix="\nreturn x\n"), Processed("1", CUT_SUFFIX)),  # a repeat of the suffix
    ("1\r\n    y = 2\r\n", Rules(suffix="\n    return x\n"), Processed("1\r\n    y = 2")),  # trailing line breaks
    ("1 \r\n\r\n", Rules(suffix="\nz"), Processed("1 ")),  # (spaces a partial may have shown stay)
])  # fmt: skip
def test_a_cut_at_a_crlf_the_model_wrote_takes_the_whole_line_break(raw, rules, expected):
    """In a CRLF or CR document (Rules.crlf) the model's "\r\n" is one line break: a rule that ends the text
    before a line break ended it between the two ("1\r", which the document reads as a line break of
    its own; helper-234). In an LF document the "\r" stays, as the model wrote it."""
    crlf = replace(rules, crlf=True)
    assert postprocess(raw, crlf, final=True) == expected
    assert postprocess(raw, rules, final=True).text == expected.text + "\r"  # an LF document: unchanged
    for end in range(len(raw) + 1):  # what a stream shows stays a prefix of the result
        assert expected.text.startswith(shown_partial(postprocess(raw[:end], crlf).text, crlf.suffix, crlf=True))


def test_a_blank_line_of_crlfs_is_blank_to_the_indent_rule():
    """n_indent read the "\r" of a blank line the model wrote ("\r\n\r\n") as a line at indentation 0 and
    cut the block there: "1\r\n    y = 2\r\n\r\n    z = 3" came back "1\r\n    y = 2" (helper-235)."""
    raw = "1\r\n    y = 2\r\n\r\n    z = 3"
    assert postprocess(raw, Rules(indent=4, crlf=True), final=True) == Processed(raw)  # as its LF form is kept
    assert postprocess(raw.replace("\r\n", "\n"), Rules(indent=4), final=True).cut is None
    assert postprocess(raw + "\r\nw", Rules(indent=4, crlf=True), final=True) == Processed(raw, CUT_INDENT)
    assert postprocess("1\r\n  \r", Rules(indent=4, crlf=True)) == Processed("1\r\n  \r")  # (may become blank)


def test_a_partial_holds_a_trailing_cr_in_a_crlf_document():
    assert shown_partial("x = 1\r", "", crlf=True) == "x = 1"  # a "\n" next would make it a line break
    assert shown_partial("x = 1\ry", "", crlf=True) == "x = 1\ry"  # a lone CR: as written
    assert shown_partial("x = 1\r", "") == "x = 1\r"  # an LF document: as the model wrote it


def test_a_lone_cr_is_one_character_and_a_last_one_is_read_at_the_end():
    """Rules.crlf joins a "\r\n" only: a lone "\r" before a cut is one character of the kept text (counted as
    a pair's, the cut's "\n" came back in the result), and at the end a "\r" last is read as an LF document's
    rules read it (no "\n" can follow it any more)."""
    assert postprocess("a\rb\nc", Rules(multiline=False, crlf=True), final=True) == Processed("a\rb", CUT_NEWLINE)
    assert shown_partial("\rx\n", "", crlf=True) == "\rx"
    assert postprocess("    a\n\r", Rules(indent=4, crlf=True)) == Processed("    a\n\r")  # (a "\n" may follow)
    assert postprocess("    a\n\r", Rules(indent=4, crlf=True), final=True) == Processed("    a", CUT_INDENT)
    assert postprocess("    a\n\r", Rules(indent=4), final=True) == Processed("    a", CUT_INDENT)


def test_a_replacement_character_before_a_waiting_cr_is_cut_at_once():
    """cut_invalid drops a U+FFFD last without a cut (the rest of its character may come); one before a "\r"
    has text after it (whatever a "\n" next makes of the "\r"): bytes that are no UTF-8, cut on the delta
    that brings the "\r". The "\r" waiting for its "\n" hid it: the cut came a delta later."""
    assert postprocess("x\ufffd", Rules(cut_invalid=True, crlf=True)) == Processed("x")
    for final in (False, True):
        assert postprocess("x\ufffd\r", Rules(cut_invalid=True, crlf=True), final) == Processed("x", CUT_INVALID)


class PieceTokenizer:
    """Each id is one piece of `pieces` (the text the engine streams as deltas, one id each)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def encode(self, text, add_special_tokens=False):
        assert text == "".join(self.pieces)
        return list(range(len(self.pieces)))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


async def test_the_runner_stops_on_the_delta_bringing_a_cr_after_invalid_bytes(bpe_tokenizer):  # noqa: F811
    """In a CRLF document the editor's completion stops (and cancels the candidate) on the delta whose "\r"
    follows a U+FFFD, as it stops on any other character after one; it read one more delta before."""
    client = FakeEngineClient(PieceTokenizer(["x", "\ufffd\r", "y", "\r\n", "z"]), default_text="x\ufffd\ry\r\nz",
                              delay_s=0)
    read, stream = [], client.stream

    async def reading(req):
        async for delta in stream(req):
            read.append(delta.text)
            yield delta

    client.stream = reading
    job = CompletionJob("t", build_infill_prompt(bpe_tokenizer, "def f():\r\n    x = ", ""), (32,),
                        Rules(cut_invalid=True))
    outcome = await run_completion(client, job, None)
    assert (outcome.text, outcome.stop_reason) == ("x", CUT_INVALID)
    assert read == ["x", "\ufffd\r"]


@pytest.mark.parametrize("line_ending", ["\r\n", "\r"])
async def test_at_the_end_of_a_crlf_or_cr_file_a_partial_waits_for_a_last_cr(bpe_tokenizer, line_ending):  # noqa: F811
    """No suffix holds a trailing "\r" back there: the runner's partials read it as Rules.crlf says (a partial
    "1\r" before the single-line cut took the "\r" away is no prefix of the result), and a CR-only document
    is crlf too (its cut left "1\r", a line break of that document)."""
    client = FakeEngineClient(bpe_tokenizer, default_text="1\r\ny = 2\r\n", delay_s=0)
    job = CompletionJob("t", build_infill_prompt(bpe_tokenizer, f"def f():{line_ending}    x = ", ""), (32,),
                        Rules(multiline=False))
    partials: list[str] = []

    async def on_partial(text: str, _token_ids: list[int]) -> None:
        partials.append(text)

    assert (await run_completion(client, job, on_partial)).text == "1"
    assert partials and all("1".startswith(p) for p in partials), partials


@pytest.mark.parametrize("multiline, expected", [(False, "1"), (True, "1\r\ny = 2")])
async def test_a_crlf_document_gets_one_line_break_for_the_models_crlf(bpe_tokenizer, multiline,  # noqa: F811
                                                                       expected):
    """The infill path end to end (fake engine): single-line mode and the trailing line break rule cut the
    model's "\r\n" whole (they left "1\r" and "...y = 2\r"), and every partial is a prefix of the result."""
    client = FakeEngineClient(bpe_tokenizer, default_text="1\r\ny = 2\r\n", delay_s=0)
    job = CompletionJob("t", build_infill_prompt(bpe_tokenizer, CRLF_PREFIX, CRLF_SUFFIX), (32,),
                        Rules(suffix=CRLF_SUFFIX, multiline=multiline))
    partials: list[str] = []

    async def on_partial(text: str, _token_ids: list[int]) -> None:
        partials.append(text)

    assert (await run_completion(client, job, on_partial)).text == expected
    assert all(expected.startswith(p) for p in partials), partials


def _completion(pieces: list[str], rules: Rules) -> tuple[str, str | None, list[str]]:
    """run_completion's rules over model text arriving in `pieces`, in a CRLF document: (the result, its cut,
    the partials shown), in the document's style."""
    style, raw, partials = DocumentStyle("\r\n", False), "", []
    for piece in pieces:
        raw += piece
        processed = postprocess(raw, rules)
        if processed.cut:
            break
        if (shown := shown_partial(processed.text, rules.suffix, crlf=rules.crlf)).strip(" \t"):
            partials.append(style.to_document(shown, at_indent=False))
    final = postprocess(raw, rules, final=True)
    return style.to_document(final.text, at_indent=False), final.cut, partials


@pytest.mark.parametrize("seed", range(300))
def test_the_models_crlf_gives_the_document_what_its_lf_gives(seed):
    """Against the reference, the same completion written with "\n": every rule reads the model's "\r\n" as
    that one line break, a "\r" last included while its "\n" may follow. The suffix's tail rule missed a
    repeat the model wrote with "\r\n" ("ab return x\r\n" before "\nreturn x" kept "return x"), and a blank
    line of CRLFs cut an indented block (helper-235)."""
    rng = random.Random(seed)
    pieces = [rng.choice(["\n", "x", "ab", " ", "    ", "return x", "y = 2", "}", "\n\n", " \n", "\t"])
              for _ in range(rng.randint(1, 15))]
    rules = Rules(multiline=rng.random() < 0.7, indent=rng.choice([0, 0, 4]), crlf=True,
                  suffix=rng.choice(["", "\n", "\n    return x\n", "\nreturn x\n", ")\n", " y = 2\nz", "\n}\n"]),
                  line_prefix=rng.choice(["", "    x = "]))
    crlf_pieces = []
    for piece in (p.replace("\n", "\r\n") for p in pieces):  # some "\r\n" split over two pieces
        split = piece.find("\r\n") + 1 if "\r\n" in piece and rng.random() < 0.5 else len(piece)
        crlf_pieces += [p for p in (piece[:split], piece[split:]) if p]
    text, cut, partials = _completion(crlf_pieces, rules)
    assert (text, cut) == _completion(pieces, rules)[:2], crlf_pieces
    assert all(text.startswith(p) for p in partials), partials
