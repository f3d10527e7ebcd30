"""scheduler/request_ids.py: a client id overlaps the engine ids its request became (<id>.<i>), and the
reverse; siblings and ids that merely share characters do not."""

from __future__ import annotations

from scheduler.request_ids import InFlightIds, in_flight_message


def test_ids_overlap_when_one_is_a_dotted_prefix_of_the_other():
    ids = InFlightIds()
    for request_id in ("x.0", "x.1", "vim-7.a.3f2a1c-g32"):
        assert ids.overlap(request_id) is None
        ids.add(request_id)
    assert ids.overlap("x") in ("x.0", "x.1")  # a client's id among its choices
    assert ids.overlap("x.1") == "x.1" and ids.overlap("x.1.2") == "x.1"
    assert ids.overlap("x.2") is None and ids.overlap("xy") is None and ids.overlap("x.") is None
    assert ids.overlap("vim-7.a") == "vim-7.a.3f2a1c-g32" and ids.overlap("vim-7.a.3f2a1c-g64") is None
    ids.discard("x.0")
    assert ids.overlap("x") == "x.1"
    ids.discard("x.1")
    ids.discard("x.1")  # twice: nothing left to remove
    assert ids.overlap("x") is None and ids.overlap("x.0") is None
    ids.add("x")
    assert ids.overlap("x.0") == "x" and ids.overlap("x") == "x"


def test_the_message_names_both_ids():
    assert in_flight_message("a", "a") == "'a' is already in flight; use a unique id"
    assert "'a' overlaps 'a.0', in flight" in in_flight_message("a", "a.0")
