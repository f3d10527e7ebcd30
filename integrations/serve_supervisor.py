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

A group SIGTERM can reach the supervisor twice: directly, and again from its parent when that parent
passes SIGTERM on to its child (GNU make to a recipe's command, `make serve`; GNU `timeout` to its
command when the signal comes from outside). Forwarded both, the second was "stop now" and cut every
open stream (`drain cut short`). So the supervisor takes the signals with sigtimedwait(2), which names
the sender (si_pid, for one a process sent: si_code <= 0), and forwards a SIGTERM from its parent that
comes within RELAY_WINDOW_S of one from another sender, in either order, as one signal (`relay_echoes`).
A time window alone would also swallow a deliberate second signal; these still stop at once: two from
one sender (a script's, a test's, the parent's own), a second Ctrl-C (SIGINT, the kernel's), a second
group SIGTERM (each forwarded SIGTERM absorbs one relayed copy). Two of one signal sent before the
supervisor has taken the first reach it as one (the kernel holds one of each): so it was before.

Only on Linux, only for a local Ray (`--address` joins a cluster whose processes are not ours), and
only for the `refusion` process itself (`integrations.cli.main()` without arguments).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

CHILD_ENV = "REFUSION_SERVE_CHILD"
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WATCHED = {*FORWARDED, signal.SIGCHLD}  # blocked in the supervisor and taken with sigtimedwait
RELAY_WINDOW_S = 1.0  # a relayed SIGTERM within this of the group's own copy is one signal (make relays in ms)
WAIT_S = 1.0  # each sigtimedwait's bound: the server's exit is also found without a SIGCHLD


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
    forwarded during the server's Python start-up killed it with status 143 and no word. The mask is set,
    not added to: the supervisor's own (WATCHED blocked for sigtimedwait) would leave SIGHUP and SIGCHLD
    blocked in the server and in Ray's processes under it."""
    signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGINT, signal.SIGTERM})
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def unblock_signals() -> None:
    """In the server, once its SIGINT and SIGTERM handlers are set: take the signals the supervisor
    forwarded meanwhile (they were held pending, `_server_preexec`)."""
    if os.environ.get(CHILD_ENV):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@dataclass(frozen=True)
class Arrival:
    """One signal the supervisor took."""
    signum: int
    sender: int  # the process that sent it (si_pid); 0 when the kernel did (a terminal's Ctrl-C or hangup)
    at_s: float  # when it was taken, time.monotonic() seconds


def relay_echoes(arrivals: list[Arrival], parent: int, window_s: float = RELAY_WINDOW_S) -> list[Arrival | None]:
    """For each arrival, in order: the earlier one it repeats, or None when it is to be forwarded.

    A SIGTERM repeats an earlier forwarded SIGTERM that came at most `window_s` seconds before it when
    exactly one of the two is from `parent` (the supervisor's parent process, which relays what the group
    got: GNU make, GNU timeout) and that earlier one repeats nothing and is not repeated yet. Every other
    arrival is forwarded: SIGINT and SIGHUP, two from one sender, a third. Causal: an arrival's answer
    does not depend on later ones, so the supervisor calls it with each new arrival appended."""
    answers: list[Arrival | None] = []
    unpaired: list[Arrival] = []  # forwarded SIGTERMs no relay has repeated yet, oldest first
    for arrival in arrivals:
        repeated = None
        if arrival.signum == signal.SIGTERM:
            repeated = next((earlier for earlier in unpaired if arrival.at_s - earlier.at_s <= window_s
                             and (earlier.sender == parent) != (arrival.sender == parent)), None)
            if repeated is None:
                unpaired.append(arrival)
            else:
                unpaired.remove(repeated)
        answers.append(repeated)
    return answers


def _take(info) -> Arrival:
    """The Arrival of a struct_siginfo from sigtimedwait: si_pid names a sender only for a signal a process
    sent (si_code <= 0: SI_USER from kill(2), SI_QUEUE, SI_TKILL; the kernel's codes are positive)."""
    return Arrival(info.si_signo, info.si_pid if info.si_code <= 0 else 0, time.monotonic())


def supervise(argv: list[str]) -> int:
    """Run `python -m integrations.cli <argv>` as the server in a session of its own and forward signals to
    it until it exits; returns its exit status.

    The signals are blocked and taken with sigtimedwait, so one that comes before the server has started
    waits in the kernel and is forwarded once it has (two of one kind by then are one: the kernel
    holds one of each); SIGCHLD (blocked too) ends the wait when the server exits."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    # (close_fds off: the server gets what the command was given, as when it was one process)
    server = subprocess.Popen([sys.executable, "-m", "integrations.cli", *argv], env={**os.environ, CHILD_ENV: "1"},
                              start_new_session=True, preexec_fn=_server_preexec, close_fds=False)
    arrivals: list[Arrival] = []
    while server.poll() is None:
        info = signal.sigtimedwait(WATCHED, WAIT_S)  # (the timeout: a SIGCHLD a parent's SIG_IGN discards)
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        arrivals.append(_take(info))
        parent = os.getppid()
        repeated = relay_echoes(arrivals, parent)[-1]
        if repeated is not None:
            other = repeated.sender if arrivals[-1].sender == parent else arrivals[-1].sender
            print(f"refusion serve: SIGTERM from pid {other} and from the parent process (pid {parent}) "
                  f"within {RELAY_WINDOW_S:g} s: taken as one (the parent passes the group's signal on)",
                  file=sys.stderr, flush=True)
        elif server.poll() is None:
            server.send_signal(signal.SIGTERM if info.si_signo == signal.SIGHUP else info.si_signo)  # hangup: drain
    code = server.wait()
    if code < 0:  # (the server drains on SIGTERM and SIGINT and exits itself: this is a kill -9, an OOM kill)
        print(f"refusion serve: the server process was killed by signal {-code}", file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code
