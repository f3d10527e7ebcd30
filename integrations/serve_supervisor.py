"""`refusion serve` as two processes, so that a signal to its process group drains the service.

A local Ray's GCS server and raylet are children of the `refusion serve` process, in its process group.
A SIGTERM sent to the group (`kill -- -PGID`, a shell's `kill %1`, GNU `timeout`) reached them too: they
exited at once, the drain could not reach the replicas, which went on answering (/health 200) until
Ray's 60 s GCS timeout ended them and cut every open stream without an error line, and the command
exited with 1 (a break-test). So the `refusion serve` process a user or a service manager sees is a
small supervisor: it starts the real server (the same command, `REFUSION_SERVE_CHILD=1`) in a session of
its own, with Ray under it, and forwards SIGINT, SIGTERM and SIGHUP (as SIGTERM) to it, so a signal to
the group reaches the server once, through the supervisor: the first drains, a second stops at once, as
before. The server gets SIGTERM if the supervisor dies (Linux `PR_SET_PDEATHSIG`), so it drains then
too. Its exit status is the server's (128 + N when signal N ended it). systemd's default
`KillMode=control-group` signals every process of the service's cgroup, sessions regardless: there,
`KillMode=mixed` (README, "Readiness, failures and shutdown").

Only on Linux, only for a local Ray (`--address` joins a cluster whose processes are not ours), and
only for the `refusion` process itself (`integrations.cli.main()` without arguments).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

CHILD_ENV = "REFUSION_SERVE_CHILD"
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def wanted(argv: list[str]) -> bool:
    """Whether `refusion <argv>` should run as supervisor + server: `serve` with a local Ray (no --address
    and no RAY_ADDRESS, or "local", ray.init's word for one), on Linux, not already the server, and not
    just asking for help."""
    if not (sys.platform.startswith("linux") and argv and argv[0] == "serve" and CHILD_ENV not in os.environ):
        return False
    rest = argv[1:]
    if any(a in ("-h", "--help") for a in rest):
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()  # the flag wins over it
    for i, a in enumerate(rest):
        if a == "--address":
            address = rest[i + 1] if i + 1 < len(rest) else ""
        elif a.startswith("--address="):
            address = a.split("=", 1)[1]
    return address in ("", "local")


def _server_preexec() -> None:
    """In the server, before it runs: SIGTERM when the supervisor dies (even by SIGKILL), so it drains; and
    SIGINT and SIGTERM blocked until `integrations.cli.main` has its handlers (`unblock_signals`): one
    forwarded during the server's Python start-up killed it with status 143 and no word."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def unblock_signals() -> None:
    """In the server, once its SIGINT and SIGTERM handlers are set: take the signals the supervisor
    forwarded meanwhile (they were held pending, `_server_preexec`)."""
    if os.environ.get(CHILD_ENV):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def supervise(argv: list[str]) -> int:
    """Run `python -m integrations.cli <argv>` as the server in a session of its own and forward signals to
    it until it exits; returns its exit status."""
    pending: list[int] = []  # signals that came before the server started
    server: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum  # the terminal went away: drain
        if server is None:
            pending.append(sent)
        elif server.poll() is None:
            server.send_signal(sent)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    # (close_fds off: the server gets what the command was given, as when it was one process)
    server = subprocess.Popen([sys.executable, "-m", "integrations.cli", *argv], env={**os.environ, CHILD_ENV: "1"},
                              start_new_session=True, preexec_fn=_server_preexec, close_fds=False)
    for sent in pending:
        server.send_signal(sent)
    code = server.wait()  # (the handlers above forward every signal that would end this process early)
    if code < 0:  # (the server drains on SIGTERM and SIGINT and exits itself: this is a kill -9, an OOM kill)
        print(f"refusion serve: the server process was killed by signal {-code}", file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code
