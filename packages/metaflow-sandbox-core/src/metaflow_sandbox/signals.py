"""SIGTERM, handled one way everywhere a sandbox may be alive: the trampoline, ``metaflow-sandbox exec``,
and a program that only uses the API.

SIGTERM becomes ``Terminated`` (a BaseException, like KeyboardInterrupt) raised in the main thread, so
the facade stops a running command (``Sandbox.exec`` waits in that thread) and ``finally`` blocks destroy
the sandbox. A program that installed no handler of its own still gets its sandboxes destroyed before
it dies of the signal (``cleanup_on_sigterm``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that ``finally`` blocks destroy the sandbox."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises ``Terminated`` in the main thread (the trampoline, for its whole life)."""
    if _main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises ``Terminated``; the previous handler is back afterwards."""
    if not _main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_sigterm() -> None:
    """During teardown: a second SIGTERM must not interrupt the destroy that is running."""
    if _main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def cleanup_on_sigterm(cleanup: Callable[[], Any]) -> None:
    """For a program with no SIGTERM handler of its own: run ``cleanup``, then die of the signal as before."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def handler(signum: int, frame: Any) -> None:
        cleanup()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
