"""Gaps a mutation audit of CR-only stop matching (GenerationRequest.cr_only, scheduler/client_view.py,
scheduler/validation.py) found: each test fails on a small change that test_sched_crlf_stops.py and
test_sched_admission.py let through."""

from __future__ import annotations

import pytest

from scheduler.api import GenerationRequest, InvalidRequestError
from scheduler.client_view import CrlfView, client_view
from scheduler.validation import validate_request


def test_cr_only_alone_reads_a_lone_cr_as_a_line_break():
    """GenerationRequest.cr_only is a field of its own (DocumentStyle.engine_fields sets crlf with it, a
    direct caller may not): cr_only without crlf still gets the view that reads a lone "\r" as "\n". Only
    crlf chose that view, so such a request matched its "\n" stops on the model's own text."""
    view = client_view(False, False, False, cr_only=True)
    assert isinstance(view, CrlfView)
    assert view.view("a\rb\r\nc", 0, True) == ("a\nb\nc", [0, 1, 2, 3, 5, 6])


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_cr_only_that_is_not_a_bool_is_refused_naming_it(value):
    spec = GenerationRequest("r", [5, 6], {"gen_length": 4}, cr_only=value)
    with pytest.raises(InvalidRequestError) as err:
        validate_request(spec, None, 24)
    assert err.value.field == "cr_only" and "must be true or false" in str(err.value)
