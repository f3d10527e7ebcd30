"""Stop strings of a tab-indented client, matched on the text as it reads it (TextStream's TabView):
the model writes indentation as spaces, the client's document has tabs (integrations/editor/document.py)."""

from __future__ import annotations

import random

import pytest
from sched_fakes import FakeRunner, FakeTokenizer, collect, ids_of, make_engine

from scheduler.api import FinishReason, GenerationRequest, Mode
from scheduler.client_view import TabView
from scheduler.detokenizer import TextStream, tabs_for_spaces


class PieceTokenizer:
    """Each id is one piece of text."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def client_text(text: str, first_line: bool) -> str:
    """The model's text as the tab-indented client reads it (DocumentStyle.to_document's tabs)."""
    if first_line:
        return tabs_for_spaces(text)
    head, newline, rest = text.partition("\n")
    return head + newline + tabs_for_spaces(rest)


def run(pieces, stop, first_line=False, per_step=1, min_tokens=0):
    """Stream the pieces (each one token), `per_step` a step; (sent text, stopped, stop_word, ids sent)."""
    stream = TextStream(PieceTokenizer(pieces), stop=stop, view=TabView(first_line), min_tokens=min_tokens)
    updates = [stream.update(list(range(min(k, len(pieces))))) for k in range(per_step, len(pieces) + per_step, per_step)]
    updates.append(stream.finish())
    stopped = [u.stopped for u in updates if u.stopped]
    return ("".join(u.text for u in updates), stopped[0] if stopped else None, stream.stop_word,
            [t for u in updates for t in u.token_ids])


def test_a_tab_stop_ends_the_text_at_an_indent_not_at_four_spaces_inside_a_line():
    """"\t" was matched as four spaces anywhere (model_stops converted it): the aligned comment's spaces
    stopped the text. Now it stops where the client's text has a tab: the next line's indentation."""
    pieces = ["x = 1", "    ", "# one", "\n", "    ", "y = 2"]
    text, stopped, word, ids = run(pieces, ["\t"])
    assert (text, stopped, word) == ("x = 1    # one\n", "stop", "\t")
    assert ids == [0, 1, 2, 3, 4]  # through the stop string's tokens (the indent written as spaces)


def test_a_space_indented_stop_never_matches_a_tab_client():
    """"\n    " is no text a tab-indented client ever gets (four spaces are a tab there): it stopped at
    every indented line."""
    pieces = ["if x:", "\n", "    ", "    y", "\n", "  z"]
    assert run(pieces, ["\n    "])[:2] == ("if x:\n        y\n  z", None)
    assert run(pieces, ["\n\t\ty"])[:3] == ("if x:", "stop", "\n\t\ty")
    assert run(pieces, ["\ty"])[:2] == ("if x:\n    ", "stop")  # the second tab: after the first's 4 spaces
    assert run(pieces, ["\n  z"])[:2] == ("if x:\n        y", "stop")  # a remainder stays spaces


def test_the_first_line_is_indentation_only_when_the_cursor_stood_in_it():
    pieces = ["    ", "pass"]
    assert run(pieces, ["\tpass"], first_line=True)[:2] == ("", "stop")
    assert run(pieces, ["\tpass"], first_line=False)[:2] == ("    pass", None)
    assert run(pieces, ["    pass"], first_line=False)[:2] == ("", "stop")


def test_a_stop_ending_inside_an_open_indent_counts_no_token_past_it():
    """The ids of an open indent wait with its text: they went out before a stop string ending inside it
    could match, and the answer counted a token more than its space-indented twin's (helper-223)."""
    assert run(["x", "\n  ", " "], ["  "])[:2] + (run(["x", "\n  ", " "], ["  "])[3],) == ("x\n", "stop", [0, 1])
    assert run(["x", "\n  ", " "], [])[3] == [0, 1, 2]


def test_an_open_indent_waits_until_it_is_known():
    """Three spaces may become a tab with the fourth: a "\n   " stop must not match them yet, and they are
    not sent before the line says what they are."""
    stream = TextStream(PieceTokenizer(["a", "\n", "   ", " ", "b"]), stop=["\n   "], view=TabView(False))
    assert stream.update([0, 1, 2]).text == "a"  # "\n" and the open indent held
    update = stream.update([0, 1, 2, 3, 4])
    assert update.stopped is None and update.text == "\n    b"  # a tab: "\n   " never matched


@pytest.mark.parametrize("seed", range(200))
def test_the_stream_stops_exactly_where_the_clients_text_has_a_stop(seed):
    """Against the reference: the client's whole text cut before the earliest stop string in it; the text
    sent is the model's text whose client form is that, however the tokens arrive. Of two stops starting
    there ("\tx" and "\t"), the one complete first ends the text (as in a space-indented document, and
    vLLM), so the word is one of them."""
    rng = random.Random(seed)
    alphabet = [" ", "  ", "    ", "\n", "\t", "x", "ab", " # c"]
    pieces = [rng.choice(alphabet) for _ in range(rng.randint(1, 30))]
    stops = [rng.choice(["\t", "\n\t", "\tx", "\n  ", "  #", "x\n", "\t\t", "\n\n", " x", "\t "])
             for _ in range(rng.randint(1, 3))]
    first_line = rng.random() < 0.5
    whole = client_text("".join(pieces), first_line)
    hits = [whole.find(s) for s in stops if s in whole]
    for per_step in (1, 3):
        text, stopped, word, ids = run(pieces, stops, first_line, per_step)
        if not hits:
            assert (client_text(text, first_line), stopped) == (whole, None), (pieces, stops)
            continue
        at = min(hits)
        assert client_text(text, first_line) == whole[:at] and stopped == "stop", (pieces, stops, per_step)
        assert word in stops and whole.startswith(word, at)
        # the ids run through the stop string's end: the fewest whose client text holds it
        covered = client_text("".join(pieces[i] for i in ids), first_line)
        assert covered.startswith(whole[:at + len(word)])
        assert not client_text("".join(pieces[i] for i in ids[:-1]), first_line).startswith(whole[:at + len(word)])


def test_min_tokens_passes_over_a_stop_that_ends_in_its_text():
    pieces = ["a", "\n", "    ", "b", "\n", "    ", "c"]
    assert run(pieces, ["\n\t"])[:2] == ("a", "stop")
    assert run(pieces, ["\n\t"], min_tokens=4)[:2] == ("a\n    b", "stop")  # the first "\n\t" ends in 3 tokens


class SpaceTokenizer(FakeTokenizer):
    """FakeTokenizer whose letters are spaces: lines of indentation only."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(" " if c.isalpha() else c for c in super().decode(ids, skip_special_tokens))


async def test_a_stop_the_last_open_indent_completes_is_a_stop_not_the_token_cap():
    """The token cap ends the text on "\n   ", an open indent (a fourth space would make it a tab), held
    until the text is known to end: there the client's "\n   " stop matches, so the request ends on a stop
    string ("stop", its stop_word), not "length" (engine_output's reason at the stream's end)."""
    engine, _ = make_engine(FakeRunner(newline_every=6), tokenizer=SpaceTokenizer())
    await engine.start()
    try:  # (generated positions 3..9 of the [5, 6, 7] prompt: "   \n   "; position 6 is the newline)
        capped = await collect(engine, GenerationRequest("cap", [5, 6, 7], {"gen_length": 16}, mode=Mode.AR,
                                                         max_tokens=7, tab_indent=True))
        assert "".join(d.text for d in capped) == "   \n   " and capped[-1].finish_reason is FinishReason.LENGTH
        deltas = await collect(engine, GenerationRequest("stop", [5, 6, 7], {"gen_length": 16}, mode=Mode.AR,
                                                         max_tokens=7, tab_indent=True, stop=["\n   "]))
        assert "".join(d.text for d in deltas) == "   " and deltas[-1].finish_reason is FinishReason.STOP
        assert deltas[-1].stats.get("stop_word") == "\n   " and len(ids_of(deltas)) == 7
    finally:
        await engine.stop()
