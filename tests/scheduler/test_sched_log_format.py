"""An engine's process logs exceptions as plain tracebacks (scheduler/log_format.py), not rich's boxes
with every frame's locals: a request (its prompt) dumped into the log, and ~1 s of CPU per exception on
the engine loop, which ran a test past its 30 s bound under load (helper-141)."""

from __future__ import annotations

import structlog


def test_an_exception_logged_beside_an_engine_is_a_plain_traceback(capsys):
    import scheduler.engine  # noqa: F401 - the import sets the format

    secret = "the prompt of someone's request"  # a local of the failing frame

    def fail():
        raise ValueError(f"boom ({len(secret)})")

    try:
        fail()
    except ValueError:
        structlog.get_logger("test").exception("step_failed")
    out = capsys.readouterr().out
    assert "Traceback (most recent call last)" in out and "ValueError: boom (31)" in out, out
    assert secret not in out and "╭" not in out, out  # no locals, no rich box
