"""Stop strings of a CRLF or CR client, matched on the text as it reads it (TextStream's CrlfView): a
"\r\n" the model writes is one line break there (integrations/editor/document.py), which a stop string's
line break ("\n" in the model's form: DocumentStyle.model_stops) matches whole."""

from __future__ import annotations

import random

import pytest
from sched_fakes import NEWLINE, FakeRunner, FakeTokenizer, collect, ids_of, make_engine
from test_sched_cancel import NEVER_MS, clock  # noqa: F401 - clock is a fixture
from test_sched_tab_stops import PieceTokenizer, client_text

from scheduler.api import FinishReason, GenerationRequest, Mode
from scheduler.client_view import CrlfView, TabView, client_view
from scheduler.detokenizer import TextStream


def run(pieces, stop, tabs=None, per_step=1, cr_only=False):
    """Stream the pieces (each one token), `per_step` a step; (the texts sent, stopped, stop_word, stream)."""
    stream = TextStream(PieceTokenizer(pieces), stop=stop, view=CrlfView(tabs, cr_only))
    steps = range(per_step, len(pieces) + per_step, per_step)
    updates = [stream.update(list(range(min(k, len(pieces))))) for k in steps]
    updates.append(stream.finish())
    stopped = [u.stopped for u in updates if u.stopped]
    return [u.text for u in updates], stopped[0] if stopped else None, stream.stop_word, stream


def test_a_line_break_stop_cuts_before_the_models_crlf_whole():
    """The "\n" stop matched the "\n" of the model's "\r\n": the text came back "x = 1\r" (helper-234)."""
    for pieces in (["x = 1", "\r", "\n", "y"], ["x = 1\r\n", "y"], ["x = 1\r", "\ny"]):
        sent, stopped, word, stream = run(pieces, ["\n"])
        assert ("".join(sent), stopped, word) == ("x = 1", "stop", "\n"), pieces
        assert stream.text == "x = 1"
    assert run(["a", "\r\n", "\r\n", "b"], ["\n\n"])[:3][1:] == ("stop", "\n\n")  # a blank line of CRLFs
    assert "".join(run(["a", "\r\n", "\r\n", "b"], ["\n\n"])[0]) == "a"


def test_a_trailing_cr_waits_for_the_next_character():
    """A "\r" last may become half of a "\r\n" that a stop matches: it is not sent before that is known,
    so what was sent is always a prefix of the text (it went out, and the cut then fell before it)."""
    stream = TextStream(PieceTokenizer(["x", "\r", "y", "\r"]), stop=["\n"], view=CrlfView(None))
    assert stream.update([0, 1]).text == "x"
    assert stream.update([0, 1, 2]).text == "\ry"  # a lone CR: as the model wrote it
    assert stream.update([0, 1, 2, 3]).text == ""
    assert stream.finish().text == "\r" and stream.text == "x\ry\r"  # the end: the lone CR goes out


def test_under_tabs_the_crlf_is_one_line_break_too():
    sent, stopped, _, _ = run(["if x:", "\r\n", "    ", "y"], ["\n\t"], tabs=TabView(False))
    assert ("".join(sent), stopped) == ("if x:", "stop")


def test_a_tab_indented_crlf_client_gets_both_views():
    """client_view for tab_indent and crlf together: the tab view under the CRLF one, so that a "\n\t" stop
    matches the model's "\r\n" and four spaces (without the tab view it never matched)."""
    view = client_view(tab_indent=True, tab_indent_first_line=False, crlf=True)
    stream = TextStream(PieceTokenizer(["if x:", "\r\n", "    ", "y"]), stop=["\n\t"], view=view)
    sent = [stream.update(list(range(k))).text for k in range(1, 5)]
    assert ("".join(sent), stream.done, stream.stop_word) == ("if x:", True, "\n\t")
    assert isinstance(client_view(False, False, True), CrlfView) and client_view(False, False, True).tabs is None
    assert isinstance(client_view(True, True, False), TabView) and client_view(False, False, False) is None


def test_a_last_cr_waits_only_while_the_text_may_go_on():
    """The view stops before a "\r" last unless `final`: at the end no "\n" can follow it, and it is a lone
    "\r" that a stop string may match, as the model wrote it."""
    assert CrlfView(None).view("x\r", 0, final=False) == ("x", [0, 1])
    assert CrlfView(None).view("x\r", 0, final=True) == ("x\r", [0, 1, 2])
    stream = TextStream(PieceTokenizer(["x", "\r"]), stop=["\r"], view=CrlfView(None))
    assert stream.update([0, 1]).text == "x"
    end = stream.finish()
    assert (end.text, end.stopped, stream.text) == ("", "stop", "x")


def test_without_stop_strings_the_view_holds_nothing_back():
    """The view is read only to match stop strings: with none, a "\r" last (or an open indent under tabs)
    goes out with its ids at once, as the model's text does."""
    for view, pieces in ((CrlfView(None), ["x", "\r"]), (CrlfView(TabView(False)), ["x", "\r\n", "  "])):
        stream = TextStream(PieceTokenizer(pieces), stop=[], view=view)
        update = stream.update(list(range(len(pieces))))
        assert (update.text, update.token_ids) == ("".join(pieces), list(range(len(pieces)))), pieces


def fold(text: str, cr_only: bool = False) -> str:
    """The model's text as a CRLF client reads it, in the stop strings' form: "\r\n" as "\n"; a CR-only
    client's reads every "\r" left as a line break too."""
    text = text.replace("\r\n", "\n")
    return text.replace("\r", "\n") if cr_only else text


@pytest.mark.parametrize("seed", range(200))
def test_the_stream_stops_exactly_where_the_clients_text_has_a_stop(seed):
    """Against the reference: the client's whole text (CRLF read as "\n", tabs when tab-indented) cut before
    the earliest stop string in it; the text sent is a prefix of the result at every step."""
    rng = random.Random(seed)
    pieces = [rng.choice(["\r", "\n", "\r\n", "x", "ab", " ", "    ", "x\r"]) for _ in range(rng.randint(1, 30))]
    stops = [rng.choice(["\n", "\n\n", "x\n", "\nx", " \n", "\n\t", "\n    "]) for _ in range(rng.randint(1, 3))]
    tabs = rng.choice([None, TabView(False), TabView(True)])
    cr_only = tabs is None and rng.random() < 0.5  # (a CR-only client's lines after a lone "\r" keep their spaces)
    reader = (lambda t: fold(t, cr_only)) if tabs is None else (lambda t: client_text(fold(t), tabs.first_line))
    whole = reader("".join(pieces))
    hits = [whole.find(s) for s in stops if s in whole]
    for per_step in (1, 3):
        sent, stopped, word, stream = run(pieces, stops, tabs, per_step, cr_only)
        assert "".join(sent) == stream.text, (pieces, stops, per_step)  # nothing sent that the text lacks
        if not hits:
            assert (stream.text, stopped) == ("".join(pieces), None), (pieces, stops)
            continue
        assert reader(stream.text) == whole[:min(hits)] and stopped == "stop", (pieces, stops, per_step)
        assert not stream.text.endswith("\r") or not whole.startswith("\n", min(hits) - 1) or cr_only
        # (the cut never falls between a "\r" and its "\n")
        assert not (stream.text.endswith("\r") and "".join(pieces).startswith("\n", len(stream.text)))


class CrlfTokenizer(FakeTokenizer):
    """FakeTokenizer whose newline token is the model writing "\r\n"."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode(ids, skip_special_tokens).replace("\n", "\r\n")


async def test_the_engine_matches_a_crlf_requests_stops_on_its_line_breaks():
    """GenerationRequest.crlf (DocumentStyle.engine_fields sets it for a CRLF or CR document): the engine's
    stream ends before the model's "\r\n", and no delta sent its "\r" first."""
    engine, _ = make_engine(FakeRunner(newline_every=6), tokenizer=CrlfTokenizer())
    await engine.start()
    try:
        plain = await collect(engine, GenerationRequest("lf", [5, 6, 7], {"gen_length": 8}, mode=Mode.AR))
        whole = "".join(d.text for d in plain)
        assert "\r\n" in whole and NEWLINE in [t for d in plain for t in d.token_ids]
        req = GenerationRequest("crlf", [5, 6, 7], {"gen_length": 8}, mode=Mode.AR, stop=["\n"], crlf=True)
        deltas = await collect(engine, req)
        assert "".join(d.text for d in deltas) == whole[:whole.index("\r\n")]
        assert deltas[-1].stats.get("stop_word") == "\n"
    finally:
        await engine.stop()


class CrTokenizer(FakeTokenizer):
    """FakeTokenizer whose newline token is the model writing a lone "\r"."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode(ids, skip_special_tokens).replace("\n", "\r")


async def test_a_stop_the_deadline_completes_at_a_last_cr_is_a_stop_not_the_deadline(clock):
    """The step that writes a lone "\r" (position 6: "abc" before it) ends past the deadline and its grace:
    the engine ends the request there with DEADLINE, and the "\r" it held back (a "\n" next would have
    joined it into a line break) is read at the text's end, where the "\r" stop matches. So the request
    ends on a stop string ("stop", its stop_word), not "deadline" (engine_output's reason at the stream's
    end, the deadline twin of test_sched_tab_stops' token-cap case). The clock moves on in the forward
    that writes it, whatever the machine's speed."""
    async def ask(rid, stop):
        clock.skew_s = 0.0  # (the last request's deadline passed: this one's is an hour ahead)
        runner = FakeRunner(newline_every=6)
        execute = runner.execute

        def execute_then_expire(segments, tables):
            results = execute(segments, tables)
            if any(NEWLINE in r.tokens for r in results):
                clock.advance(2 * NEVER_MS / 1000)  # past the deadline and its grace
            return results

        runner.execute = execute_then_expire
        engine, _ = make_engine(runner, tokenizer=CrTokenizer(), deadline_grace_ms=NEVER_MS)
        await engine.start()
        try:
            return await collect(engine, GenerationRequest(rid, [5, 6, 7], {"gen_length": 16}, mode=Mode.AR,
                                                           max_time_ms=NEVER_MS, stop=stop, crlf=True))
        finally:
            await engine.stop()

    expired = await ask("deadline", [])  # the deadline ends it at the "\r"
    text = "".join(d.text for d in expired)
    assert text.endswith("\r") and "\r" not in text[:-1] and len(ids_of(expired)) == 4
    assert expired[-1].finish_reason is FinishReason.DEADLINE
    stopped = await ask("stop", ["\r"])
    assert "".join(d.text for d in stopped) == text[:-1] and stopped[-1].finish_reason is FinishReason.STOP
    assert stopped[-1].stats.get("stop_word") == "\r" and ids_of(stopped) == ids_of(expired)


@pytest.mark.parametrize("tokenizer", [CrTokenizer(), CrlfTokenizer(), FakeTokenizer()], ids=["cr", "crlf", "lf"])
async def test_a_cr_only_documents_cr_stop_ends_at_every_line_break_it_reads(tokenizer):
    """A CR-only document (old Mac line endings) reads each of "\r", "\r\n" and "\n" the model writes as one
    line break ("\r": DocumentStyle.to_document leaves a lone "\r" as written, and "\r" is that document's
    line break). Its client's stop "\r" goes to the engine as "\n" (model_stops) with the document's
    engine_fields, and the text ends before the first of them. A lone "\r" was read as text (the view
    joined "\r\n" only): the stop was passed over and the client's text held line breaks past it."""
    from integrations.editor.document import DocumentStyle

    style = DocumentStyle.of("a = 1\rb = 2\r")
    assert style.line_ending == "\r"
    engine, _ = make_engine(FakeRunner(newline_every=6), tokenizer=tokenizer)
    await engine.start()
    try:
        plain = await collect(engine, GenerationRequest("plain", [5, 6, 7], {"gen_length": 16}, mode=Mode.AR))
        whole = "".join(d.text for d in plain)
        first_break = min(whole.index(b) for b in ("\r", "\n") if b in whole)
        req = GenerationRequest("cr", [5, 6, 7], {"gen_length": 16}, mode=Mode.AR, stop=style.model_stops(["\r"]),
                                **style.engine_fields(at_indent=False))
        deltas = await collect(engine, req)
    finally:
        await engine.stop()
    text = "".join(d.text for d in deltas)
    assert text == whole[:first_break] and deltas[-1].finish_reason is FinishReason.STOP, (whole, text)
    assert style.client_stop(["\r"], deltas[-1].stats.get("stop_word")) == "\r"
    assert "\r" not in style.to_document(text, at_indent=False)
