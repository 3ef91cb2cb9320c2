"""Run one command in its own process group and stream its output as decoded text while it runs."""

from __future__ import annotations

import codecs
import os
import selectors
import signal
import subprocess
import time
from typing import Callable, Mapping, Optional, Sequence

from metaflow_sandbox import OutputCallback

POLL = 0.1  # how often a silent command is checked for having exited while leftovers hold its pipes
GRACE = 1.0  # how long output of such leftovers is still read after the command exited


class Timeout(Exception):
    pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group (under bwrap this takes its whole pid namespace down)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    timeout: Optional[float],
    on_stdout: Optional[OutputCallback],
    on_stderr: Optional[OutputCallback],
    preexec_fn: Optional[Callable[[], None]] = None,
    started: Optional[Callable[[subprocess.Popen], None]] = None,
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
    sel = selectors.DefaultSelector()
    streams = {proc.stdout: on_stdout, proc.stderr: on_stderr}
    decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in streams}
    for s in streams:
        sel.register(s, selectors.EVENT_READ)
    timed_out = False
    exited_at: Optional[float] = None
    try:
        while sel.get_map():
            wait = POLL if deadline is None else min(POLL, max(0.0, deadline - time.monotonic()))
            ready = sel.select(wait)
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                stream = key.fileobj
                text = decoders[stream].decode(data, final=not data)  # type: ignore[index]
                if text and streams[stream]:  # type: ignore[index]
                    streams[stream](text)  # type: ignore[index]
                if not data:
                    sel.unregister(stream)
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                kill_group(proc)
                deadline = None  # drain what is left, then report
            elif not ready and proc.poll() is not None:
                kill_group(proc)  # the command is done; leftovers holding its pipes go too
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > GRACE:
                    break  # a daemon that left the group (fallback mode only) keeps the pipes open
        code = proc.wait()
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    finally:
        sel.close()
        for s in streams:
            s.close()  # type: ignore[union-attr]
    if timed_out:
        raise Timeout()
    return code if code >= 0 else 128 - code
