"""Pure infill logic: post-processing rules, gap planning, candidate choice, prompt building."""

from __future__ import annotations

import pytest
from test_editor_fakes import bpe_tokenizer  # noqa: F401 - fixture

from integrations.editor.infill import (
    Candidate,
    build_infill_prompt,
    choose_candidate,
    format_context,
    gap_params,
    plan_gaps,
)
from integrations.editor.postprocess import (
    CUT_INVALID,
    CUT_NEWLINE,
    Processed,
    Rules,
    min_indent,
    postprocess,
    shown_partial,
    single_line,
    trim_suffix_repeat,
)

SUFFIX = "\n    return total\n\n\ndef main():\n    pass\n"


# ---- single line ---------------------------------------------------------------------------------


def test_single_line_cuts_at_first_newline_after_text():
    assert single_line("a + b\n    c") == ("a + b", True)
    assert single_line("a + b") == ("a + b", False)


def test_single_line_keeps_a_leading_newline_and_the_next_line():
    assert single_line("\n    total = 0\n    x") == ("\n    total = 0", True)


def test_single_line_mid_line_never_splits_the_cursor_line():
    # Cursor in `print(|)`: a completion that starts a new line would break `)` onto the next line.
    assert single_line("\n    total = 0", mid_line=True) == ("", True)
    assert single_line("x, y\nz", mid_line=True) == ("x, y", True)
    out = postprocess("\n    total = 0\n", Rules(suffix=")\n", multiline=False), final=True)
    assert (out.text, out.cut) == ("", "newline")
    # At the end of a line of a CR-only or CRLF document: not mid-line (the suffix keeps the document's breaks)
    for suffix in ("\rfoo()\r", "\r\nfoo()\r\n"):
        out = postprocess("\n    x = 1\n", Rules(suffix=suffix, multiline=False))
        assert (out.text, out.cut) == ("\n    x = 1", "newline"), suffix
    # Only spaces after the cursor: not mid-line, the leading line break stays.
    out = postprocess("\n    total = 0\n", Rules(suffix="  \nx", multiline=False))
    assert (out.text, out.cut) == ("\n    total = 0", "newline")


# ---- indentation (llama.cpp n_indent) ------------------------------------------------------------


def test_min_indent_stops_before_a_dedented_line():
    text = "x = 1\n    y = 2\n  z = 3\n    w"
    assert min_indent(text, 4) == ("x = 1\n    y = 2", True)


def test_min_indent_ignores_blank_lines_and_the_first_line():
    assert min_indent("x\n\n    y\n", 4) == ("x\n\n    y\n", False)
    assert min_indent("x\nno indent", 0) == ("x\nno indent", False)


def test_min_indent_waits_until_a_line_has_visible_text():
    # "\n  " could still become "\n      deeper": not judged yet
    assert min_indent("x\n  ", 4) == ("x\n  ", False)


# ---- suffix repeat -------------------------------------------------------------------------------


def test_repeat_of_the_next_suffix_line_is_cut_while_streaming():
    text = "total = a + b\n    return total\n"
    assert trim_suffix_repeat(text, SUFFIX) == ("total = a + b", True)


def test_incomplete_line_is_not_judged_while_streaming_but_is_at_the_end():
    text = "total = a + b\n    return tot"
    assert trim_suffix_repeat(text, SUFFIX) == (text, False)
    assert trim_suffix_repeat(text, SUFFIX, final=True) == ("total = a + b", True)


def test_short_suffix_line_needs_the_following_line_too():
    suffix = "\n}\n\nint main() {\n"
    nested = "if (x) {\n  y();\n}\nz();\n"  # a "}" that closes an inner block is no repeat
    assert trim_suffix_repeat(nested, suffix) == (nested, False)
    repeat = "x = 1;\n}\n\nint main() {\n"
    assert trim_suffix_repeat(repeat, suffix) == ("x = 1;", True)


def test_rest_of_line_repeat_is_dropped_at_the_end():
    assert trim_suffix_repeat("a, b)", ")\n    x = 1\n", final=True) == ("a, b", True)


@pytest.mark.parametrize("line_prefix, text, suffix, expected", [
    # closers an editor auto-inserted, which the completion wrote again in part: dropped (helper-168:
    # `print(d['a']'])` went into the buffer)
    ("print(d['", "a']", "'])\n", ("a", True)),
    ("call(f(", "x)", "))\n", ("x", True)),
    # the line's brackets need the completion's own closer: kept (the rest-of-line rule dropped it too)
    ("f(g(x", ")", ")\n", (")", False)),
    ("f(g(x", "[0])", ")\n", ("[0])", False)),
    # as before: a repeat of the whole rest of the line, brackets or not, and no prefix to tell
    ("x = [1, 2", "]", "]\n", ("", True)),
    ("foo(", "x)", ")\n", ("x", True)),
    ("y = ", "x = 1", "= 1\n", ("x", True)),
    ("", "a)", ")\n", ("a", True)),
    # more than one line, or closers that do not start the rest of the line: untouched
    ("print(d['", "a']\nz", "'])\n", ("a']\nz", False)),
    ("print(d['", "a'] + 1", "'])\n", ("a'] + 1", False)),
])
def test_closers_the_rest_of_the_line_holds_are_not_written_twice(line_prefix, text, suffix, expected):
    assert trim_suffix_repeat(text, suffix, final=True, line_prefix=line_prefix) == expected
    # partials never show what the end drops
    shown = shown_partial(text, suffix)
    assert expected[0].startswith(shown), (shown, expected)


def test_text_without_repeat_is_untouched():
    text = "total = sum(values)"
    assert trim_suffix_repeat(text, SUFFIX, final=True) == (text, False)
    assert trim_suffix_repeat("anything", "", final=True) == ("anything", False)


def test_postprocess_applies_rules_in_order_and_reports_the_last_cut():
    rules = Rules(suffix=SUFFIX, multiline=True, indent=4)
    out = postprocess("    total = a\n    return total\n", rules)
    assert (out.text, out.cut) == ("    total = a", "suffix")
    out = postprocess("total = a\nprint(1)\n", rules)
    assert (out.text, out.cut) == ("total = a", "indent")
    out = postprocess("total = a\n", Rules(suffix=SUFFIX, multiline=False))
    assert (out.text, out.cut) == ("total = a", "newline")


# ---- gaps and candidates -------------------------------------------------------------------------


def test_plan_gaps_defaults_and_caps():
    assert plan_gaps(None, multiline=False) == (16,)
    assert plan_gaps(None, multiline=True) == (32, 64)
    assert plan_gaps(20, multiline=True) == (24,)
    assert plan_gaps(5, multiline=False) == (5,)
    assert plan_gaps(128, multiline=True) == (32, 64)
    # min_tokens: no gap shorter (it cannot hold the text), rounded up to whole slots, under the cap
    assert plan_gaps(64, multiline=True, min_tokens=40) == (40, 64)
    assert plan_gaps(None, multiline=True, min_tokens=41) == (48, 64)
    assert plan_gaps(None, multiline=True, min_tokens=100) == (104,)
    assert plan_gaps(41, multiline=True, min_tokens=41) == (48,)
    assert plan_gaps(5, multiline=False, min_tokens=3) == (5,)


@pytest.mark.parametrize("gap", [3, 8, 16, 24, 32, 64, 128, 256])
def test_gap_params_are_a_valid_refusion_span(gap):
    p = gap_params(gap)
    assert p["gen_length"] == gap
    per_block = p["gen_length"] // p["serial_num_blocks"]
    assert per_block * p["serial_num_blocks"] == gap and per_block % p["slot_size"] == 0


def test_choose_prefers_the_shortest_closed_gap():
    short_open = Candidate(16, "total = a +", "length")
    mid_closed = Candidate(32, "total = a + b", "suffix")
    long_closed = Candidate(64, "total = a + b + c", "stop")
    assert choose_candidate([long_closed, short_open, mid_closed]) is mid_closed


def test_choose_falls_back_to_the_longest_gap_and_skips_empty_text():
    a, b = Candidate(16, "x", "length"), Candidate(32, "x = 1", "deadline")
    assert choose_candidate([a, b]) is b
    empty_closed = Candidate(16, "  ", "stop")
    assert choose_candidate([empty_closed, b]) is b
    with pytest.raises(ValueError):
        choose_candidate([])


# ---- prompt building -----------------------------------------------------------------------------


def test_build_infill_prompt_places_context_before_prefix(bpe_tokenizer):  # noqa: F811
    tok = bpe_tokenizer
    ctx = [{"path": "util.py", "text": "def helper():\n    pass"}]
    p = build_infill_prompt(tok, "def f(x):\n    ", "\n    return y\n", ctx, "python")
    context_text = format_context(ctx, "python")
    assert context_text.startswith("# util.py\n")
    assert tok.decode(p.prompt_ids) == context_text + "def f(x):\n" and p.healed == "    "
    assert p.context_tokens == len(tok.encode(context_text, add_special_tokens=False))
    assert tok.decode(p.suffix_ids) == "\n    return y\n"
    assert not p.truncated


def test_a_context_chunk_over_the_budget_keeps_its_path_and_last_lines(bpe_tokenizer):  # noqa: F811
    """The newest chunk that crosses the context budget keeps its path line and its last whole lines (it
    used to drop every chunk, small older ones included, leaving the prompt without context)."""
    tok = bpe_tokenizer
    big = "".join(f"value_{i} = {i}\n" for i in range(2_000))
    ctx = [{"path": "small.py", "text": "SMALL = 1\n"}, {"path": "big.py", "text": big}]
    p = build_infill_prompt(tok, "x = ", "", ctx, "python", max_context_tokens=100)
    context = tok.decode(p.prompt_ids[:p.context_tokens])
    assert p.truncated and 50 < p.context_tokens <= 100
    assert context.startswith("# big.py\nvalue_") and context.endswith("value_1999 = 1999\n\n")
    assert "SMALL" not in context and context.split("\n")[1] in big.split("\n")  # whole lines only
    one_line = build_infill_prompt(tok, "x = ", "", ctx[:1] + [{"path": "long.py", "text": "y = " + "abc_" * 2_000}],
                                   "python", max_context_tokens=100)  # no line of the newest fits: skipped
    assert one_line.truncated and tok.decode(one_line.prompt_ids).startswith("# small.py\nSMALL = 1\n\nx =")
    fits = build_infill_prompt(tok, "x = ", "", ctx[:1] + [{"path": "b.py", "text": big[:40]}], "python",
                               max_context_tokens=100)
    assert tok.decode(fits.prompt_ids).startswith("# small.py\nSMALL = 1\n\n# b.py\n") and not fits.truncated


def test_build_infill_prompt_truncates_prefix_from_its_start_and_suffix_from_its_end(bpe_tokenizer):  # noqa: F811
    tok = bpe_tokenizer
    prefix = "".join(f"line_{i} = {i}\n" for i in range(200))
    suffix = "".join(f"after_{i} = {i}\n" for i in range(200))
    p = build_infill_prompt(tok, prefix, suffix, max_prefix_tokens=50, max_suffix_tokens=40)
    assert p.truncated and len(p.prompt_ids) == 50 and len(p.suffix_ids) == 40
    assert tok.decode(p.prompt_ids).endswith("line_199 = 199\n")
    assert tok.decode(p.suffix_ids).startswith("after_0 = 0\n")


def test_empty_suffix_means_plain_completion(bpe_tokenizer):  # noqa: F811
    p = build_infill_prompt(bpe_tokenizer, "x = ", "")
    assert p.suffix_ids is None and p.prompt_ids
    assert build_infill_prompt(bpe_tokenizer, "", "").prompt_ids  # never an empty prompt


def test_partial_holds_back_a_line_that_may_become_a_suffix_repeat():
    from integrations.editor.postprocess import shown_partial

    assert shown_partial("total = a + b\n    return to", SUFFIX) == "total = a + b"
    assert shown_partial("total = a + b\n    print(", SUFFIX) == "total = a + b\n    print("
    assert shown_partial("a, b", ")\n") == "a, b"  # mid-line: the first line is never a repeat


def test_token_healing_leaves_trailing_spaces_to_the_model(bpe_tokenizer):  # noqa: F811
    from integrations.editor.infill import heal_text

    p = build_infill_prompt(bpe_tokenizer, "x = ", "")
    assert bpe_tokenizer.decode(p.prompt_ids) == "x =" and p.healed == " "
    assert heal_text(" 1", " ") == "1"  # the model's " 1" token: the space is already in the buffer
    assert heal_text("     return x", "    ") == " return x"  # never more than the healed amount
    assert heal_text("\n    y", "    ") == "\n    y"  # a newline first: kept as is
    assert build_infill_prompt(bpe_tokenizer, "x = 1", "").healed == ""


def test_rules_read_a_bounded_window_of_a_huge_suffix(bpe_tokenizer):  # noqa: F811
    """The rules run on every delta; a 200,000-character suffix is cut as the prompt's is (they read its
    first lines and a completion's length of it), with the same outcome as on the whole suffix."""
    from integrations.editor.infill import MAX_CHARS_PER_TOKEN, MAX_SUFFIX_TOKENS
    from integrations.editor.postprocess import Rules, postprocess
    from integrations.editor.runner import CompletionJob

    suffix = "\n    return total\n" + "x = 1\n" * 40_000
    job = CompletionJob("t", build_infill_prompt(bpe_tokenizer, "def f():\n    ", suffix), (32,), Rules(suffix=suffix))
    rules = job.model_rules()
    assert len(rules.suffix) == MAX_SUFFIX_TOKENS * MAX_CHARS_PER_TOKEN and suffix.startswith(rules.suffix)
    raw = "total = 1\n    return total\nx = 1\n"
    assert postprocess(raw, rules, final=True) == postprocess(raw, Rules(suffix=suffix), final=True)


def test_n_indent_of_a_tab_document_is_counted_in_the_models_spaces(bpe_tokenizer):  # noqa: F811
    """n_indent counts characters (llama.cpp): in a tab-indented document a tab is one, and the model
    writes MODEL_TAB_WIDTH spaces for it, so the rules on the model's text read n_indent x that width."""
    from integrations.editor.document import MODEL_TAB_WIDTH
    from integrations.editor.postprocess import Rules
    from integrations.editor.runner import CompletionJob

    tabs = CompletionJob("t", build_infill_prompt(bpe_tokenizer, "def f():\n\tif x:\n\t\t", "\n\treturn x\n"),
                         (32,), Rules(indent=2))
    spaces = CompletionJob("t", build_infill_prompt(bpe_tokenizer, "def f():\n    if x:\n        ", "\n"),
                           (32,), Rules(indent=2))
    assert tabs.prompt.style.tabs and tabs.model_rules().indent == 2 * MODEL_TAB_WIDTH
    assert spaces.model_rules().indent == 2


@pytest.mark.parametrize("raw, suffix, final", [
    ("total = a + b\n", "\n    return total\n", "total = a + b"),  # would insert a blank line
    ("\n    helper()\n\n  \n", "\n", "\n    helper()"),
    ("x = 1  \n", "\nprint(x)", "x = 1  "),  # spaces a partial may have shown stay
    ("x = 1\n", "", "x = 1\n"),  # end of the file: as generated
    ("x = 1\n", " + y\n", "x = 1\n"),  # mid-line cursor: not this rule's business
])
def test_trailing_line_breaks_before_a_line_break_are_dropped(raw, suffix, final):
    from integrations.editor.postprocess import Rules, postprocess, shown_partial

    assert postprocess(raw, Rules(suffix=suffix), final=True).text == final
    assert final.startswith(shown_partial(raw, suffix))  # what a stream showed stays a prefix


def test_invalid_bytes_end_the_completion_unless_the_document_holds_them():
    raw = "name = 'caf\ufffd\ufffd'\nnext line"
    assert postprocess(raw, Rules(cut_invalid=True)) == Processed("name = 'caf", CUT_INVALID)
    assert postprocess(raw, Rules()) == Processed(raw, None)  # off unless asked (/infill keeps the model's text)
    # an earlier cut by a later rule names that rule
    assert postprocess("x = 1\n\ufffd!", Rules(multiline=False, cut_invalid=True)) == Processed("x = 1", CUT_NEWLINE)
    # a lone U+FFFD last (a character a token cap cut short) is dropped with no cut reported: the text
    # keeps the reason it ended for (`length` at a cap); two, or text after it: bytes that are no UTF-8.
    # The same whether the text is final or not (helper-161: the label followed how deltas arrived)
    for final in (False, True):
        assert postprocess("caf\ufffd", Rules(cut_invalid=True), final=final) == Processed("caf", None)
        assert postprocess("caf\ufffd\ufffd", Rules(cut_invalid=True), final=final) == Processed("caf", CUT_INVALID)
