"""The facade's deadline and cancellation, on real local sandboxes, real processes and real signals."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from metaflow_sandbox import Backend, SandboxCancelledError, SandboxTimeoutError

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")

BEATS = 'while :; do echo x >> "$1"; sleep 0.1; done & while :; do echo x >> "$1"; sleep 0.1; done'


class Interrupted(BaseException):
    """What the trampoline's SIGTERM handler raises (a BaseException, like KeyboardInterrupt)."""


@pytest.fixture
def sandbox():
    with Backend("local").create() as sb:
        yield sb


def _beats(sandbox) -> int:
    code, out, _ = sandbox.run(["sh", "-c", 'wc -c < "$1"', "sh", sandbox.handle.workdir + "/beats"], timeout=30)
    return int(out.strip()) if code == 0 else 0


def _assert_stopped(sandbox) -> None:
    time.sleep(0.5)
    before = _beats(sandbox)
    time.sleep(0.6)
    assert before > 0 and _beats(sandbox) == before, "the command's process group kept running"


def test_a_signal_in_the_waiting_thread_stops_the_command_and_propagates(sandbox) -> None:
    """SIGTERM turned into an exception (the trampoline's way) reaches exec at once; the command is killed, the sandbox kept."""
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Interrupted()))
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            sandbox.exec(["sh", "-c", BEATS, "sh", sandbox.handle.workdir + "/beats"], timeout=120)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 4.0
    _assert_stopped(sandbox)
    assert sandbox.run(["echo", "still here"], timeout=30)[:2] == (0, "still here\n")


def test_cancel_one_command_by_id_leaves_the_other_running(sandbox) -> None:
    results: dict[str, object] = {}

    def run(name: str, seconds: str) -> None:
        try:
            results[name] = sandbox.exec(["sleep", seconds], exec_id=name, timeout=60).exit_code
        except SandboxCancelledError as err:
            results[name] = err

    threads = [threading.Thread(target=run, args=("a", "30")), threading.Thread(target=run, args=("b", "2"))]
    for t in threads:
        t.start()
    time.sleep(0.7)
    assert sandbox.cancel("a") == 1
    for t in threads:
        t.join(30)
    assert isinstance(results["a"], SandboxCancelledError) and "still usable" in str(results["a"])
    assert results["b"] == 0


def test_timeout_is_an_error_never_an_exit_code(sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(SandboxTimeoutError) as info:
        sandbox.exec(["sh", "-c", "trap '' TERM; sleep 30"], timeout=0.5)
    assert time.monotonic() - start < 3
    assert "timeout of 0.5s" in str(info.value) and "raise timeout=" in str(info.value)


def test_bad_timeouts_are_refused_before_anything_runs(sandbox) -> None:
    for bad in (0, -1, float("nan"), float("inf"), "10", True):
        with pytest.raises(Exception, match="timeout"):
            sandbox.exec(["touch", sandbox.handle.workdir + "/ran"], timeout=bad)
    assert sandbox.run(["sh", "-c", 'test -e "$1" && echo ran || echo never', "sh", sandbox.handle.workdir + "/ran"])[1] == "never\n"
