"""SIGINT and SIGTERM, from ktrace's first line of Python to its exit.

Until a snapshot starts, a signal ends ktrace at once: Interrupted is raised
wherever the main thread is, and the CLI prints one line and exits 130 (SIGINT)
or 143 (SIGTERM), the status a shell shows for a process the signal ended.
From the moment a snapshot starts (defer()), a signal only sets a flag: an
exception raised while libbpf calls back into Python through ctypes would be
printed and swallowed there ("Exception ignored on calling ctypes callback
function"), so loading and attaching go on, the window ends at its first check
of the flag, and the bundle is written whole. Further signals change nothing.

This module imports nothing heavy: `python -m ktrace` installs it before the
rest of ktrace is imported. What comes before that line, the interpreter's own
start-up (tens of milliseconds), gets Python's default handling; a launcher
that must cover it too can start ktrace with SIGINT and SIGTERM blocked:
install() unblocks them, and a signal that came meanwhile is acted on then.
"""

from __future__ import annotations

import signal

from ktrace.errors import ExitStatus, KtraceError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_STATUS = {"SIGINT": ExitStatus.INTERRUPTED, "SIGTERM": ExitStatus.TERMINATED}


class Interrupted(KtraceError):
    """A signal that ended ktrace before it had anything to write."""

    def __init__(self, signame: str, when: str = "before the window started; nothing was recorded") -> None:
        super().__init__(f"interrupted by {signame} {when}")
        self.signame = signame
        self.status = EXIT_STATUS[signame]


class _State:
    received: str | None = None  # the first signal's name
    deferred = False


def _handle(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name
    if _State.received is None:
        _State.received = name
    if not _State.deferred:
        raise Interrupted(name)


def install() -> None:
    """Take SIGINT and SIGTERM over: until defer(), either one raises Interrupted."""
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # one held pending by a launcher is delivered now


def defer() -> None:
    """From now on a signal only sets the flag that received() returns (one-way: the snapshot has started)."""
    _State.deferred = True
    install()  # also when ktrace runs in-process, without `python -m ktrace` having installed it


def received() -> str | None:
    """The name of the first SIGINT or SIGTERM since defer() (or before it), else None."""
    return _State.received
