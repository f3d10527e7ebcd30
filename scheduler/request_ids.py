"""Request ids in flight, with the ids derived from them.

The HTTP routes run one client request as several engine requests named `<id>.<i>` (`n` choices,
batched prompts) or `<id>.<suffix>` (/infill candidates), so "this id is already in flight" must see a
client's `X` among the `X.0`, `X.1` it became, and `X.0` among a running `X`'s requests: two ids
overlap when one is the other or a dotted prefix of it ("a" and "a.0", "a.b" and "a.b.c"; not "a" and
"ab"). Siblings ("a.0" and "a.1", or two /infill candidates) never overlap.
"""

from __future__ import annotations

from collections import Counter


class InFlightIds:
    """The ids in flight and a count of every dotted prefix of them; `overlap` is O(dots in the id)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._prefixes: Counter[str] = Counter()  # each dotted prefix of an id in flight, the id included

    @staticmethod
    def _dotted_prefixes(request_id: str) -> list[str]:
        parts = request_id.split(".")
        return [".".join(parts[: k + 1]) for k in range(len(parts))]

    def overlap(self, request_id: str) -> str | None:
        """An id in flight that `request_id` is, extends or is extended by; None when there is none."""
        if self._prefixes[request_id]:  # it is in flight, or ids derived from it are
            return request_id if request_id in self._ids else next(
                i for i in self._ids if i.startswith(request_id + "."))
        return next((p for p in self._dotted_prefixes(request_id) if p in self._ids), None)

    def add(self, request_id: str) -> None:
        self._ids.add(request_id)
        self._prefixes.update(self._dotted_prefixes(request_id))

    def discard(self, request_id: str) -> None:
        if request_id in self._ids:
            self._ids.remove(request_id)
            self._prefixes.subtract(self._dotted_prefixes(request_id))
            for prefix in self._dotted_prefixes(request_id):
                if self._prefixes[prefix] <= 0:
                    del self._prefixes[prefix]


def in_flight_message(request_id: str, running: str) -> str:
    """The 400's message for a request whose id overlaps `running`, an id in flight."""
    if running == request_id:
        return f"{request_id!r} is already in flight; use a unique id"
    return (f"{request_id!r} overlaps {running!r}, in flight (a request's choices and candidates run as "
            "<id>.<i>); use a unique id")
