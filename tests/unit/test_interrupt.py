"""ktrace.interrupt: a signal raises Interrupted until the snapshot starts, then only sets the flag."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from ktrace import interrupt
from ktrace.errors import ExitStatus


@pytest.fixture(autouse=True)
def _restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in interrupt.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    interrupt._State.received, interrupt._State.deferred = None, False


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, ExitStatus.INTERRUPTED),
                                                (signal.SIGTERM, ExitStatus.TERMINATED)])
def test_before_the_snapshot_a_signal_raises_one_line_with_its_exit_status(signum, status):
    interrupt.install()
    with pytest.raises(interrupt.Interrupted) as caught:
        os.kill(os.getpid(), signum)
    assert caught.value.status == status == 128 + signum
    assert caught.value.message == (f"interrupted by {signal.Signals(signum).name} before the window started; "
                                    "nothing was recorded")


def test_once_deferred_a_signal_only_sets_the_flag_and_the_first_one_is_kept():
    interrupt.install()
    interrupt.defer()
    assert interrupt.received() is None
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert interrupt.received() == "SIGTERM"


def test_a_signal_held_blocked_by_a_launcher_is_delivered_when_installed():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    # to this thread: sent to the process, the kernel would hand it to any other thread of the test run that
    # does not block it (threads earlier tests left), and Python would raise it wherever the main thread is then
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # pending, not delivered
    with pytest.raises(interrupt.Interrupted):
        interrupt.install()
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
