"""Relays a sandbox's output to the runtime, live, as mflog-structured lines.

The task inside the sandbox persists its own logs (mflog tee + save_logs), so lines are echoed
as structured lines, which the runtime displays but does not store again (metaflow-internals 2.6).
If the sandbox dies before it saved them, ``flush(persist=True)`` re-emits what was streamed
marked for persistence, so nothing already shown is lost.
"""

import sys

from metaflow.mflog import TASK_LOG_SOURCE
from metaflow.mflog.mflog import decorate, set_should_persist

MAX_KEPT_BYTES = 64 * 1024 * 1024


class LogRelay:
    def __init__(self):
        self._pending = {"stdout": "", "stderr": ""}
        self._kept = []
        self._kept_bytes = 0

    def stdout(self, chunk):
        self._feed("stdout", chunk)

    def stderr(self, chunk):
        self._feed("stderr", chunk)

    def _feed(self, stream, chunk):
        text = self._pending[stream] + chunk
        *lines, self._pending[stream] = text.split("\n")
        for line in lines:
            self._emit(stream, line)

    def _emit(self, stream, line):
        line = line.rstrip("\r")
        if line.startswith("[save_logs]"):
            return  # save_logs' own diagnostics are not task output
        structured = decorate(TASK_LOG_SOURCE, line)
        if self._kept_bytes < MAX_KEPT_BYTES:
            self._kept.append((stream, structured))
            self._kept_bytes += len(structured)
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.buffer.write(structured + b"\n")
        out.flush()

    def flush(self, persist=False):
        """Emit partial last lines; with ``persist`` re-emit everything for the runtime to store."""
        for stream in ("stdout", "stderr"):
            if self._pending[stream]:
                self._emit(stream, self._pending[stream])
                self._pending[stream] = ""
        if persist:
            for stream, line in self._kept:
                out = sys.stdout if stream == "stdout" else sys.stderr
                out.buffer.write(set_should_persist(line) + b"\n")
            sys.stdout.flush()
            sys.stderr.flush()
            self._kept = []

    def system(self, message, err=False):
        """A message from the trampoline itself; persisted by the runtime as a runtime log line."""
        out = sys.stderr if err else sys.stdout
        out.write(message + "\n")
        out.flush()
