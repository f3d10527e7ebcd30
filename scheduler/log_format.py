"""structlog's default console output with plain Python tracebacks.

Unconfigured, structlog renders an exception with rich when rich is installed (Ray brings it), with
every frame's local variables: for an engine failure that is a ~150-line box dumping the request (its
prompt too) into the log, and about 1 s of CPU on the engine loop per logged exception on a 2-core
machine (helper-141 measured 1.15 s against 0.015 s plain; a test's 30 s bound ran out under load).
`plain_tracebacks` sets each ConsoleRenderer in structlog's configuration to print the standard
traceback; a JSON or other renderer someone configured is left alone.
"""

from __future__ import annotations

import structlog


def plain_tracebacks() -> None:
    """Make structlog's console renderers print plain tracebacks (idempotent)."""
    for processor in structlog.get_config()["processors"]:
        if isinstance(processor, structlog.dev.ConsoleRenderer):
            # (a settable property since structlog 25; the attribute behind it before)
            name = "exception_formatter" if hasattr(type(processor), "exception_formatter") else "_exception_formatter"
            setattr(processor, name, structlog.dev.plain_traceback)
