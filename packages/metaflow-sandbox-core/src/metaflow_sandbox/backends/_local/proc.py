"""Run one command in its own process group and stream its output as decoded text while it runs."""

from __future__ import annotations

import codecs
import os
import selectors
import signal
import subprocess
import time
from typing import Callable, Mapping, Sequence

from metaflow_sandbox import OutputCallback

POLL = 0.1  # how often a silent command is checked for having exited while leftovers hold its pipes
GRACE = 1.0  # how long output of such leftovers is still read after the command exited


class Timeout(Exception):
    pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group (under bwrap this takes its whole pid namespace down)."""
    if proc.returncode is not None:
        return  # reaped: its group id may belong to someone else by now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _exited(pid: int, deadline: float | None) -> bool:
    """Wait until ``pid`` exits WITHOUT reaping it (so its process group id cannot be reused yet)."""
    delay = 0.0001  # it usually exits as its output closes: poll fast first
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:  # reaped by destroy() in another thread
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    timeout: float | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    preexec_fn: Callable[[], None] | None = None,
    started: Callable[[subprocess.Popen], None] | None = None,
) -> int:
    """Return the exit code (128+N when killed by signal N); raise Timeout after killing the group."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    if started:
        started(proc)
    deadline = None if timeout is None else time.monotonic() + timeout
    assert proc.stdout is not None and proc.stderr is not None
    pipes = (proc.stdout, proc.stderr)
    callbacks: dict[int, OutputCallback | None] = {proc.stdout.fileno(): on_stdout, proc.stderr.fileno(): on_stderr}
    decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in callbacks}
    sel = selectors.DefaultSelector()
    for fd in callbacks:
        sel.register(fd, selectors.EVENT_READ)
    timed_out = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            wait = POLL if deadline is None else min(POLL, max(0.0, deadline - time.monotonic()))
            ready = sel.select(wait)
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                text = decoders[key.fd].decode(data, final=not data)
                callback = callbacks[key.fd]
                if text and callback:
                    callback(text)
                if not data:
                    sel.unregister(key.fd)
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                kill_group(proc)
                deadline = None  # drain what is left, then report
            elif not ready and proc.poll() is not None:
                kill_group(proc)  # the command is done; leftovers holding its pipes go too
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > GRACE:
                    break  # a daemon that left the group (fallback mode only) keeps the pipes open
        if not _exited(proc.pid, deadline):  # it closed its output but kept running
            timed_out = True
        kill_group(proc)  # leftovers in its group end with it (under bwrap the pid namespace saw to that)
        code = proc.wait()
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    finally:
        sel.close()
        for pipe in pipes:
            pipe.close()
    if timed_out:
        raise Timeout()
    return code if code >= 0 else 128 - code
