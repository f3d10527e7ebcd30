"""serve_supervisor without Ray: which signals it forwards (relay_echoes, a pure function of the arrivals)
and the signal mask the server starts with. `refusion serve` under a relaying parent, for real:
test_serve_process.py, test_a_group_sigterm_a_parent_relays_drains."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from integrations.serve_supervisor import RELAY_WINDOW_S, Arrival, _take, relay_echoes

REPO = Path(__file__).resolve().parents[2]
PARENT, KILLER, OTHER = 100, 200, 300  # pids: the supervisor's parent (make, timeout), whoever signals the group
TERM, INT, HUP = signal.SIGTERM, signal.SIGINT, signal.SIGHUP


def forwarded(*arrivals: tuple[int, int, float]) -> list[bool]:
    """Whether each (signal, sender, seconds) arrival is forwarded to the server."""
    answers = relay_echoes([Arrival(*a) for a in arrivals], PARENT)
    return [answer is None for answer in answers]


def test_a_group_sigterm_relayed_by_the_parent_is_one_signal_in_either_order():
    """`kill -- -PGID` of `make serve`: the supervisor gets the group's copy and make's, milliseconds apart,
    in either order; the one that comes second repeats the first and is not forwarded (forwarded, it was
    the server's "stop now": drain cut short)."""
    assert forwarded((TERM, KILLER, 10.0), (TERM, PARENT, 10.003)) == [True, False]
    assert forwarded((TERM, PARENT, 10.0), (TERM, KILLER, 10.003)) == [True, False]
    answers = relay_echoes([Arrival(TERM, KILLER, 10.0), Arrival(TERM, PARENT, 10.003)], PARENT)
    assert answers == [None, Arrival(TERM, KILLER, 10.0)]  # (what the supervisor's line names)
    assert forwarded((TERM, 0, 10.0), (TERM, PARENT, 10.003)) == [True, False]  # a sender si_pid does not name


def test_a_deliberate_second_signal_is_forwarded():
    """Two from one sender (test_serve_process.py's two SIGTERMs from the test process, which is the
    supervisor's parent; a script's `kill` twice), two Ctrl-Cs (SIGINT: the kernel's, and the fixture's two
    back to back), a SIGHUP beside a relayed SIGTERM, and a relay after the window: each one is forwarded,
    so a second still stops at once."""
    assert forwarded((TERM, PARENT, 10.0), (TERM, PARENT, 10.001)) == [True, True]
    assert forwarded((TERM, KILLER, 10.0), (TERM, KILLER, 10.001)) == [True, True]
    assert forwarded((TERM, KILLER, 10.0), (TERM, OTHER, 10.001)) == [True, True]  # neither is the parent's
    assert forwarded((INT, 0, 10.0), (INT, 0, 10.001)) == [True, True]
    assert forwarded((INT, PARENT, 10.0), (INT, PARENT, 10.0)) == [True, True]
    assert forwarded((INT, KILLER, 10.0), (TERM, PARENT, 10.001)) == [True, True]  # only SIGTERM is relayed
    assert forwarded((HUP, 0, 10.0), (TERM, PARENT, 10.001)) == [True, True]
    assert forwarded((TERM, KILLER, 10.0), (TERM, PARENT, 10.0 + RELAY_WINDOW_S + 0.001)) == [True, True]
    assert forwarded((TERM, KILLER, 10.0), (TERM, PARENT, 10.0 + RELAY_WINDOW_S)) == [True, False]  # (the bound)


def test_each_sigterm_absorbs_one_relay_so_a_second_group_sigterm_stops():
    """A relay repeats one signal only: after a group SIGTERM and make's copy of it, a second group
    SIGTERM (its two copies) is forwarded once, the server's "stop now"; so is a SIGTERM the parent sends
    on its own in the window, or a third copy."""
    assert forwarded((TERM, KILLER, 10.0), (TERM, PARENT, 10.001), (TERM, KILLER, 10.3), (TERM, PARENT, 10.301)) \
        == [True, False, True, False]
    assert forwarded((TERM, KILLER, 10.0), (TERM, PARENT, 10.001), (TERM, PARENT, 10.5)) == [True, False, True]
    assert forwarded((TERM, PARENT, 10.0), (TERM, KILLER, 10.001), (TERM, OTHER, 10.002)) == [True, False, True]
    # two SIGTERMs of the parent's own, then the group's copy: it repeats the first of them
    assert forwarded((TERM, PARENT, 10.0), (TERM, PARENT, 10.1), (TERM, KILLER, 10.2)) == [True, True, False]


def test_the_answers_do_not_depend_on_later_arrivals():
    """The supervisor asks again with each new arrival appended: what it did with the earlier ones stands."""
    arrivals = [Arrival(TERM, KILLER, 10.0), Arrival(TERM, PARENT, 10.001), Arrival(INT, 0, 10.2),
                Arrival(TERM, PARENT, 10.4), Arrival(TERM, KILLER, 13.0), Arrival(TERM, PARENT, 13.5)]
    whole = relay_echoes(arrivals, PARENT)
    assert [relay_echoes(arrivals[:n], PARENT)[-1] for n in range(1, len(arrivals) + 1)] == whole
    assert [answer is None for answer in whole] == [True, False, True, True, True, False]


def test_a_sender_is_named_only_for_a_signal_a_process_sent():
    """si_pid names the sender for si_code <= 0 (SI_USER from kill(2), SI_TKILL, SI_QUEUE); a kernel
    signal's si_code is positive (a terminal's Ctrl-C, SI_KERNEL), its si_pid is no sender."""
    def info(code: int, pid: int) -> signal.struct_siginfo:  # (signo, code, errno, pid, uid, status, band)
        return signal.struct_siginfo((int(TERM), code, 0, pid, 0, 0, 0))

    assert (_take(info(0, PARENT)).signum, _take(info(0, PARENT)).sender) == (TERM, PARENT)
    assert _take(info(-6, PARENT)).sender == PARENT  # SI_TKILL
    assert _take(info(0x80, PARENT)).sender == 0  # SI_KERNEL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor runs on Linux only")
def test_the_server_starts_with_only_sigint_and_sigterm_blocked():
    """The supervisor blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD to take them with sigtimedwait; a child
    inherits its mask, so the server (and Ray under it, which never unblocks them) would start with SIGHUP
    and SIGCHLD blocked. _server_preexec sets the mask to SIGINT and SIGTERM, the two the server unblocks
    once its handlers are set."""
    code = ("import signal, subprocess\n"
            "from integrations.serve_supervisor import WATCHED, _server_preexec\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)\n"
            "status = subprocess.run(['cat', '/proc/self/status'], preexec_fn=_server_preexec, capture_output=True,\n"
            "                        text=True, check=True).stdout\n"
            "print(next(line.split()[1] for line in status.splitlines() if line.startswith('SigBlk:')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    blocked = {sig for sig in signal.Signals if int(out.stdout, 16) & (1 << (sig - 1))}
    assert blocked == {signal.SIGINT, signal.SIGTERM}
